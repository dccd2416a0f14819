"""``qcompile_triton::`` custom ops and their Python API (triton is imported only when a kernel runs).

* ``w4a8_linear(x, packed, bias=None, act_fmt="int8")``: per-token int8 activation quantization (inside)
  x 4-bit packed weight -> ``x.dtype``. Op ``qcompile_triton::w4a8_linear``.
* ``w4a4_linear(x, packed, bias=None, act_fmt="int4")``: activations quantized to 4 bits per group of the
  weight's group size (per token for a per-channel weight: one group of all of K). Op ``qcompile_triton::w4a4_linear``.
* ``quantize_per_token(x, fmt="int8")`` / ``quantize_per_group(x, group_size, fmt="int4")``: the
  activation quantizer alone -> ``(codes int8, scale fp32, zp int32)``, codes and zero-points in the
  signed convention ``formats_code - 2^(b-1)``. Ops ``qcompile_triton::quantize_per_token|group``.
* op ``qcompile_triton::swiglu_quantize_per_token(gate, up, fmt)``: the same per token of ``silu(gate) * up``
  computed inside the quantization kernel (``swiglu_quant.py`` lowers a SwiGLU MLP's down-projection input to it).
* op ``qcompile_triton::rmsnorm_quantize_per_token(x, residual, weight, eps, fmt)``: ``h = x + residual`` (if
  given), LLaMA's RMSNorm of ``h`` and its per-token int8 quantization in one kernel
  (``rmsnorm_quant_kernel.py``; ``norm_quant.py`` lowers the norms before the q/k/v and gate/up projections).

Each op runs the Triton kernel for CUDA tensors, the Triton interpreter for CPU tensors under
``TRITON_INTERPRET=1``, and the pure-torch integer reference (``reference.py``) for other CPU tensors.
Each has a fake implementation, so it traces through ``torch.export`` / ``torch.compile``; the linears
have a straight-through backward for ``x`` (as the reference ``qdq_activation``), so a graph that
requires grad still compiles.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

from qcompile import formats as F

from .packing import PackedWeight, unpack_values
from .reference import linear_reference, quantize_rows_reference

__all__ = ["quantize_per_group", "quantize_per_token", "w4a4_linear", "w4a8_linear"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------- validation
@functools.lru_cache(maxsize=1)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(t: torch.Tensor) -> bool:
    if t.device.type == "cuda":
        if not _have_triton():
            raise RuntimeError("CUDA tensors need triton for qcompile_triton ops: pip install triton")
        return True
    if t.device.type != "cpu":
        raise ValueError(f"qcompile_triton ops run on CUDA (or CPU as reference); got device {t.device}")
    return os.environ.get("TRITON_INTERPRET") == "1" and _have_triton()


@functools.lru_cache(maxsize=64)
def _act_spec(act_fmt: str, bits: int) -> F.FormatSpec:
    spec = F.FormatSpec.parse(act_fmt)
    if spec.kind != "int" or spec.bits != bits:
        raise ValueError(f"activation format must be int{bits} or int{bits}_sym here; got {act_fmt!r}")
    return spec


def _check_x(x: torch.Tensor, k: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what}: x must be float16, bfloat16 or float32; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{what}: x has shape {tuple(x.shape)}; its last dim must be in_features={k}")


def _check_packed(x, qweight, unit_scale, code_sum, zero_byte, group_size, in_features, what):
    if qweight.dtype != torch.uint8 or qweight.dim() != 3:
        raise ValueError(f"{what}: qweight must be the uint8 [C, N, PACK_K/2] tensor from prepack(); got "
                         f"{qweight.dtype} of shape {tuple(qweight.shape)} (unpacked or formats.pack_int4 "
                         "codes? call backends.triton.prepack(codes, scale, zp, fmt, gran) first)")
    c, n, half = qweight.shape
    g_count = in_features // group_size if group_size else 1
    if half not in (32, 64) or c != -(-in_features // (2 * half)):
        raise ValueError(f"{what}: qweight shape {tuple(qweight.shape)} does not hold in_features={in_features} "
                         "in the prepack layout")
    for name, t, dt in (("unit_scale", unit_scale, torch.float32), ("code_sum", code_sum, torch.int32),
                        ("zero_byte", zero_byte, torch.uint8)):
        if t.dtype != dt or tuple(t.shape) != (g_count, n):
            raise ValueError(f"{what}: {name} must be {dt} of shape {(g_count, n)}; got {t.dtype} "
                             f"{tuple(t.shape)}")
    for t in (qweight, unit_scale, code_sum, zero_byte):
        if t.device != x.device:
            raise ValueError(f"{what}: x is on {x.device} but the packed weight is on {t.device}; move one "
                             "(PackedWeight.to(device))")


def _packed(qweight, unit_scale, code_sum, zero_byte, fmt, group_size, in_features) -> PackedWeight:
    return PackedWeight(qweight, unit_scale, code_sum, zero_byte, fmt, group_size, in_features,
                        qweight.shape[1], 2 * qweight.shape[2])


def _linear_impl(x, qweight, unit_scale, code_sum, zero_byte, fmt, group_size, in_features, act_spec,
                 act_group, bias, what, l2_next=None):
    """Check, then run the kernel path (``l2_next``: weights its decode GEMV may prefetch into L2) or the
    reference."""
    _check_x(x, in_features, what)
    _check_packed(x, qweight, unit_scale, code_sum, zero_byte, group_size, in_features, what)
    if bias is not None and (bias.shape != (qweight.shape[1],) or bias.device != x.device):
        raise ValueError(f"{what}: bias must be [{qweight.shape[1]}] on {x.device}; got "
                         f"{tuple(bias.shape)} on {bias.device}")
    pw = _packed(qweight, unit_scale, code_sum, zero_byte, fmt, group_size, in_features)
    x2 = x.reshape(-1, in_features).contiguous()
    if _use_triton(x):
        from .w4_linear import w4_linear_2d

        y = w4_linear_2d(x2, pw, act_spec.bits, act_spec.symmetric, act_group, bias, l2_next=l2_next)
    else:
        y = linear_reference(x2, pw, act_spec.bits, act_spec.symmetric, act_group, bias)
    return y.reshape(*x.shape[:-1], pw.out_features)


# ----------------------------------------------------------------------------------------------- ops
@torch.library.custom_op("qcompile_triton::w4a8_linear", mutates_args=())
def _w4a8_linear_op(x: torch.Tensor, qweight: torch.Tensor, unit_scale: torch.Tensor, code_sum: torch.Tensor,
                    zero_byte: torch.Tensor, fmt: str, group_size: int, in_features: int, act_fmt: str,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _linear_impl(x, qweight, unit_scale, code_sum, zero_byte, fmt, group_size, in_features,
                        _act_spec(act_fmt, 8), 0, bias, "w4a8_linear")


@torch.library.custom_op("qcompile_triton::w4a4_linear", mutates_args=())
def _w4a4_linear_op(x: torch.Tensor, qweight: torch.Tensor, unit_scale: torch.Tensor, code_sum: torch.Tensor,
                    zero_byte: torch.Tensor, fmt: str, group_size: int, in_features: int, act_fmt: str,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    # Activations per group of the weight's group size; a per-channel weight is one group of all of K,
    # so its activations are quantized per token (the same thing as one group of K).
    return _linear_impl(x, qweight, unit_scale, code_sum, zero_byte, fmt, group_size, in_features,
                        _act_spec(act_fmt, 4), max(group_size, 0), bias, "w4a4_linear")


@_w4a8_linear_op.register_fake
@_w4a4_linear_op.register_fake
def _(x, qweight, unit_scale, code_sum, zero_byte, fmt, group_size, in_features, act_fmt, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def _linear_setup(ctx, inputs, output):
    x, qweight, unit_scale, code_sum, zero_byte, fmt, group_size, in_features, act_fmt, bias = inputs
    ctx.save_for_backward(qweight, unit_scale, zero_byte)
    ctx.meta = (fmt, group_size, in_features, x.dtype, bias is not None)


def _linear_backward(ctx, grad):
    """Straight-through estimator for the activation quantizer (as ``qcompile::qdq_activation``):
    ``dx = dy @ dequant(W)``; the weight codes get no gradient, the bias ``sum(dy)``."""
    qweight, unit_scale, zero_byte = ctx.saved_tensors
    fmt, group_size, in_features, dtype, has_bias = ctx.meta
    pw = _packed(qweight, unit_scale, unit_scale, zero_byte, fmt, group_size, in_features)
    g = group_size or in_features
    w = unpack_values(pw).float() * unit_scale.t().repeat_interleave(g, dim=1)  # [N, K]
    dx = (grad.float() @ w).to(dtype)
    db = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias else None
    return dx, None, None, None, None, None, None, None, None, db


_w4a8_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)
_w4a4_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _quantize_impl(x: torch.Tensor, spec: F.FormatSpec, group_size: int, what: str):
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what}: x must be a float16/bfloat16/float32 tensor; got {getattr(x, 'dtype', x)}")
    k = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or (group_size and (group_size < 2 or k % group_size)):
        raise ValueError(f"{what}: group size {group_size} must divide the last dim of x {tuple(x.shape)}")
    x2 = x.reshape(-1, k).contiguous()
    if _use_triton(x):
        from .quantize_kernel import quantize_rows

        codes, scale, zp = quantize_rows(x2, spec.bits, spec.symmetric, group_size)
    else:
        codes, scale, zp = quantize_rows_reference(x2, spec.bits, spec.symmetric, group_size)
    lead = x.shape[:-1]
    return codes.reshape(x.shape), scale.reshape(*lead, -1), zp.reshape(*lead, -1)


@torch.library.custom_op("qcompile_triton::quantize_per_token", mutates_args=())
def _quantize_per_token_op(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize_impl(x, _act_spec(fmt, F.FormatSpec.parse(fmt).bits), 0, "quantize_per_token")


@torch.library.custom_op("qcompile_triton::quantize_per_group", mutates_args=())
def _quantize_per_group_op(x: torch.Tensor, fmt: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    return _quantize_impl(x, _act_spec(fmt, F.FormatSpec.parse(fmt).bits), group_size, "quantize_per_group")


@torch.library.custom_op("qcompile_triton::swiglu_quantize_per_token", mutates_args=())
def _swiglu_quantize_op(gate: torch.Tensor, up: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    spec = _act_spec(fmt, 8)
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor) or gate.dtype not in _FLOAT_DTYPES:
        raise TypeError("swiglu_quantize_per_token: gate and up must be float16/bfloat16/float32 tensors")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device or gate.dim() < 1:
        raise ValueError(f"swiglu_quantize_per_token: gate and up must match in shape, dtype and device; got "
                         f"{tuple(gate.shape)} {gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    k = gate.shape[-1]
    g2, u2 = gate.reshape(-1, k).contiguous(), up.reshape(-1, k).contiguous()
    if _use_triton(gate):
        from .quantize_kernel import quantize_rows

        codes, scale, zp = quantize_rows(g2, spec.bits, spec.symmetric, 0, up=u2)
    else:
        codes, scale, zp = quantize_rows_reference(torch.nn.functional.silu(g2) * u2, spec.bits, spec.symmetric, 0)
    lead = gate.shape[:-1]
    return codes.reshape(gate.shape), scale.reshape(*lead, 1), zp.reshape(*lead, 1)


@_swiglu_quantize_op.register_fake
def _(gate, up, fmt):
    return _fake_quantize(gate, 1)


@torch.library.custom_op("qcompile_triton::rmsnorm_quantize_per_token", mutates_args=())
def _rmsnorm_quantize_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                         fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _act_spec(fmt, 8)
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or x.dim() < 1:
        raise TypeError("rmsnorm_quantize_per_token: x must be a float16/bfloat16/float32 tensor")
    k = x.shape[-1]
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"rmsnorm_quantize_per_token: residual must match x {tuple(x.shape)} {x.dtype}; got "
                         f"{tuple(residual.shape)} {residual.dtype} on {residual.device}")
    if weight.shape != (k,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"rmsnorm_quantize_per_token: weight must be [{k}] {x.dtype} on {x.device}; got "
                         f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
    x2 = x.reshape(-1, k).contiguous()
    r2 = residual.reshape(-1, k).contiguous() if residual is not None else None
    if _use_triton(x):
        from .rmsnorm_quant_kernel import rmsnorm_quantize_rows

        h, codes, scale, zp = rmsnorm_quantize_rows(x2, r2, weight.contiguous(), eps, spec.bits, spec.symmetric)
    else:  # LlamaRMSNorm after the residual add, as torch computes it
        h = x2 + r2 if r2 is not None else x2
        h32 = h.float()
        v = weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        codes, scale, zp = quantize_rows_reference(v, spec.bits, spec.symmetric, 0)
        h = h if r2 is not None else x.new_empty(0)
    lead = x.shape[:-1]
    return (h.reshape(x.shape) if residual is not None else h, codes.reshape(x.shape), scale.reshape(*lead, 1),
            zp.reshape(*lead, 1))


@_rmsnorm_quantize_op.register_fake
def _(x, residual, weight, eps, fmt):
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return (h, *_fake_quantize(x, 1))


def _fake_quantize(x, g_count):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*lead, g_count), dtype=torch.float32),
            x.new_empty((*lead, g_count), dtype=torch.int32))


@_quantize_per_token_op.register_fake
def _(x, fmt):
    return _fake_quantize(x, 1)


@_quantize_per_group_op.register_fake
def _(x, fmt, group_size):
    return _fake_quantize(x, x.shape[-1] // group_size)


# ------------------------------------------------------------------------------------------ Python API
def _require_packed(packed, what: str) -> PackedWeight:
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"{what} takes a PackedWeight from backends.triton.prepack(codes, scale, zp, fmt, "
                        f"gran); got {type(packed).__name__}")
    return packed


def w4a8_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                act_fmt: str = "int8") -> torch.Tensor:
    """``linear(qdq_int8_per_token(x), dequant(W))``: fp16/bf16/fp32 ``x [..., K]`` -> ``[..., N]`` in x's dtype.

    Args:
        x: activation; quantized per token inside (``act_fmt``: ``"int8"`` min-max or ``"int8_sym"``).
        packed: weight from ``prepack``.
        bias: optional ``[N]``, added in fp32 before the output cast.
    """
    pw = _require_packed(packed, "w4a8_linear")
    return torch.ops.qcompile_triton.w4a8_linear(x, pw.qweight, pw.unit_scale, pw.code_sum, pw.zero_byte,
                                                  pw.fmt, pw.group_size, pw.in_features, act_fmt, bias)


def w4a4_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                act_fmt: str = "int4") -> torch.Tensor:
    """W4A4: ``x`` quantized to 4 bits per group of ``packed.group_size`` along K, then the W4 GEMM."""
    pw = _require_packed(packed, "w4a4_linear")
    return torch.ops.qcompile_triton.w4a4_linear(x, pw.qweight, pw.unit_scale, pw.code_sum, pw.zero_byte,
                                                  pw.fmt, pw.group_size, pw.in_features, act_fmt, bias)


def quantize_per_token(x: torch.Tensor, fmt: str = "int8"):
    """Per-token INT quantization -> ``(codes int8 [..., K], scale fp32 [..., 1], zp int32 [..., 1])``."""
    return torch.ops.qcompile_triton.quantize_per_token(x, fmt)


def quantize_per_group(x: torch.Tensor, group_size: int, fmt: str = "int4"):
    """Per-group INT quantization along the last dim -> ``(codes, scale [..., G], zp [..., G])``."""
    return torch.ops.qcompile_triton.quantize_per_group(x, fmt, group_size)
