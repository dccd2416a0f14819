"""``qcompile::`` custom ops: the reference quantize-dequantize entry points as graph nodes.

They wrap ``qcompile.formats`` (the one reference implementation) and carry fake (meta) kernels, so
they survive ``torch.export`` and Inductor as opaque nodes that backends pattern-match and lower.

* ``qcompile::dequantize_weight(codes, scale, zero_point, fmt, granularity, in_features, dtype)``
  unpacks 4-bit codes (``codes`` is ``[N, ceil(K/2)]`` uint8 when ``bits <= 4``, else ``[N, K]``)
  and returns the dequantized ``[N, K]`` weight.
* ``qcompile::qdq_activation(x, fmt, granularity)`` dynamic quantize-dequantize of an activation
  (per-token, per-group or V-channel): qparams are chosen from ``x`` itself at run time.
"""
from __future__ import annotations

import torch

from qcompile import formats as F

__all__ = ["dequantize_weight", "pack_weight_codes", "qdq_activation"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pack_weight_codes(codes: torch.Tensor, fmt: F.FormatSpec) -> torch.Tensor:
    """Store codes as the graph holds them: two per byte when the format has at most 4 bits."""
    return F.pack_int4(codes) if fmt.bits <= 4 else codes


def _check_weight_args(codes, scale, zero_point, spec, gran, in_features, dtype) -> None:
    """Wrong dtype, device or shape: a FormatError saying what was expected (not a broadcast error later)."""
    what = "qcompile::dequantize_weight"
    if dtype not in _DTYPES:
        raise F.FormatError(f"{what}: dtype {dtype!r} is not allowed; allowed: {', '.join(_DTYPES)}")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise F.FormatError(f"{what}: codes must be a uint8 [N, K'] tensor; got {codes.dtype} {tuple(codes.shape)}")
    packed = spec.bits <= 4
    width = (in_features + 1) // 2 if packed else in_features
    if in_features < 1 or codes.shape[1] != width:
        raise F.FormatError(f"{what}: codes {tuple(codes.shape)} do not hold in_features={in_features} {spec.name} "
                            f"codes (expected last dim {width}{', two codes per byte' if packed else ''})")
    expected = F.block_shape(torch.Size((codes.shape[0], in_features)), gran)[:-1] + (1,)
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not t.is_floating_point() or tuple(t.shape) != expected or t.device != codes.device:
            raise F.FormatError(f"{what}: {name} must be a float tensor of shape {expected} on {codes.device} "
                                f"for {gran.name}; got {t.dtype} {tuple(t.shape)} on {t.device}")


@torch.library.custom_op("qcompile::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str,
                      granularity: str, in_features: int, dtype: str) -> torch.Tensor:
    spec, gran = F.FormatSpec.parse(fmt), F.Granularity.parse(granularity)
    _check_weight_args(codes, scale, zero_point, spec, gran, in_features, dtype)
    full = F.unpack_int4(codes, in_features) if spec.bits <= 4 else codes
    return F.dequantize(full, scale, zero_point, spec, gran, dtype=_DTYPES[dtype])


@dequantize_weight.register_fake
def _(codes, scale, zero_point, fmt, granularity, in_features, dtype):
    return codes.new_empty((*codes.shape[:-1], in_features), dtype=_DTYPES[dtype])


@torch.library.custom_op("qcompile::qdq_activation", mutates_args=())
def qdq_activation(x: torch.Tensor, fmt: str, granularity: str) -> torch.Tensor:
    spec, gran = F.FormatSpec.parse(fmt), F.Granularity.parse(granularity)
    if not x.is_floating_point() or x.dim() < 1:
        raise F.FormatError(f"qcompile::qdq_activation: x must be a floating-point tensor with at least one "
                            f"dimension; got {x.dtype} of shape {tuple(x.shape)}")
    return F.fake_quantize(x, spec, gran)


@qdq_activation.register_fake
def _(x, fmt, granularity):
    return torch.empty_like(x)


def _qdq_setup(ctx, inputs, output):
    pass


def _qdq_backward(ctx, grad):
    # Straight-through estimator: lets users fine-tune through fake-quantized activations.
    return grad, None, None


qdq_activation.register_autograd(_qdq_backward, setup_context=_qdq_setup)
