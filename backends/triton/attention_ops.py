"""``qcompile_triton::decode_attention``: one query token per sequence against a KV cache, and its Python API.

    decode_attention(q [B, H, 1, D], k [B, Hkv, L, D], v [B, Hkv, L, D], mask=None, scale=None) -> [B, H, 1, D]

the ``scaled_dot_product_attention`` of a decode step (no dropout, not causal: the mask says which cache
slots count), on ``decode_attention_kernel`` for CUDA tensors (and CPU tensors under
``TRITON_INTERPRET=1``); other CPU tensors run ``torch.nn.functional.scaled_dot_product_attention`` in
fp32, the reference. ``lower_attention.py`` puts it into a graph. Bad input gets a ``ValueError`` /
``TypeError`` naming what is wrong, never a Triton error.
"""
from __future__ import annotations

from typing import Optional

import torch

from .ops import _use_triton

__all__ = ["check_decode_attention", "decode_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_decode_attention(q, k, v, mask) -> None:
    """Raise a clear error unless the inputs are what the kernel takes (see the module docstring)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"decode_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"decode_attention: {name} must be 4-D [B, heads, len, D]; got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.dtype not in _DTYPES:
            raise TypeError(f"decode_attention: q, k, v must share one of float16 / bfloat16 / float32; got "
                            f"{q.dtype}, {k.dtype}, {v.dtype}")
        if t.device != q.device:
            raise ValueError(f"decode_attention: q, k, v must be on one device; got {q.device}, {k.device}, "
                             f"{v.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name}'s last dim must be contiguous (stride 1)")
    bsz, heads, q_len, dim = q.shape
    if q_len != 1:
        raise ValueError(f"decode_attention takes one query token per sequence; q has {q_len} query tokens")
    if k.shape != v.shape or k.shape[0] != bsz or k.shape[3] != dim or k.shape[2] < 1:
        raise ValueError(f"decode_attention: k and v must be [B={bsz}, Hkv, L >= 1, D={dim}]; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] < 1 or heads % k.shape[1]:
        raise ValueError(f"decode_attention: the {heads} query heads must be a multiple of the {k.shape[1]} KV heads")
    if dim < 16 or dim > 256 or dim & (dim - 1):
        raise ValueError(f"decode_attention: head dim must be a power of two in [16, 256]; got {dim}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.device != q.device:
            raise ValueError("decode_attention: mask must be a tensor on q's device (or None)")
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            raise TypeError(f"decode_attention: mask must be boolean or {q.dtype} (additive); got {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, (bsz, heads, 1, k.shape[2]))
        except RuntimeError:
            raise ValueError(f"decode_attention: mask {tuple(mask.shape)} does not broadcast to "
                             f"{(bsz, heads, 1, k.shape[2])}") from None
        if mask.dim() == 4 and mask.shape[2] != 1:
            raise ValueError("decode_attention: mask must have one query row")


def _reference(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]
    kf, vf = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    m = mask if mask is None or mask.dtype == torch.bool else mask.float()
    return torch.nn.functional.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=m, scale=scale).to(q.dtype)


@torch.library.custom_op("qcompile_triton::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                         scale: Optional[float]) -> torch.Tensor:
    # scale None: 1 / sqrt(D), from the kernel wrapper or SDPA (the reference), as SDPA defines it
    check_decode_attention(q, k, v, mask)
    if _use_triton(q):
        from .decode_attention_kernel import decode_attention as kernel

        return kernel(q, k, v, mask, scale)
    return _reference(q, k, v, mask, scale)


@_decode_attention_op.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """``softmax(scale q K^T + mask) V`` for one query token per sequence (module docstring); ``scale``
    defaults to ``1 / sqrt(D)``. Grouped-query attention: ``k`` / ``v`` may have fewer heads than ``q``."""
    return torch.ops.qcompile_triton.decode_attention(q, k, v, mask, None if scale is None else float(scale))
