"""Kernel ops that take the graph's own weight tensors and find their prepacked form at run time.

* ``qcompile_triton::w4_linear_codes(x, codes, scale, zero_point, fmt, granularity, in_features,
  act_fmt, bias, next0=None, next1=None, next2=None)``: the lowering of
  ``linear(qdq_activation(x), dequantize_weight(codes, ...))``; ``next0..2``: the next linear's codes, whose
  packed weights the decode GEMV may prefetch into L2 (``l2_chain.py``; a hint, same outputs);
* ``qcompile_triton::w4_linear_rtn(x, weight, fmt, granularity, act_fmt, bias)``: a float weight,
  quantized round-to-nearest (``formats.quantize``) on first use (``lowbit``'s ``options["recipe"]``);
* ``qcompile_triton::w4_linear_codes_shared(x, [codes], [scale], [zero_point], fmt, granularity,
  in_features, act_fmt, [bias], next0..2)``: several ``w4_linear_codes`` of one input (q/k/v, gate/up) with the
  int8 per-token quantization of ``x`` done once (``share_quant.py``); same numbers, fewer launches;
* ``qcompile_triton::w4_linear_qcodes(xq, x_scale, x_zp, [codes], [scale], [zero_point], fmt, in_features,
  act_fmt, [bias], out_dtype)``: the same on activations already quantized per token in int8 (codes
  ``q - 128``, fp32 scales, int32 zero-points ``z - 128``), by torch ops Inductor fuses into the
  producer (``inductor_quant.py``).

Both look the ``PackedWeight`` up in a cache keyed by the identity (and version counter) of the weight
tensors they are given, packing on a miss. Why not bake the packed weights into the compiled graph
as constants: dynamo reuses one compiled graph for every module instance with the same code (module
parameters and buffers are unguarded graph inputs), e.g. two quantized models of one architecture,
or a decoder layer compiled once for all layers; baked weights would then silently belong to the
first instance. A lookup is a dict access on the host; under CUDA graphs it costs nothing. Packing
needs a host sync, so the first call for a weight must not be inside a CUDA graph capture (warm up
first; the error says so).

The activation format picks the kernel: int8 -> ``w4a8_linear``, int4 -> ``w4a4_linear``
(per group of the weight's group size, per token for per-channel weights). Backward: straight-through
for ``x`` (``dx = dy @ dequant(W)``), as the reference ``qdq_activation``.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from qcompile import formats as F
from qcompile import ops as _qops  # noqa: F401  (registers qcompile::dequantize_weight)

from .ops import _act_spec, _check_x, _linear_impl, _use_triton, w4a4_linear, w4a8_linear
from .packing import PackedWeight, _parse_format, prepack

__all__ = ["cached_packed_weights", "packed_for_codes", "packed_for_weight"]

# id(first tensor) -> (weak ref to it, key, PackedWeight); an entry is dropped with its tensor.
_CACHE: dict[int, tuple] = {}


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change in place)
        return 0


def _live_entry(anchor: torch.Tensor):
    """The cache entry of ``anchor`` (this very tensor, still alive), else None."""
    hit = _CACHE.get(id(anchor))
    return hit if hit is not None and hit[0]() is anchor else None


def _lookup(anchor: torch.Tensor, key: tuple, make) -> PackedWeight:
    hit = _live_entry(anchor)
    if hit is not None and hit[1] == key:
        return hit[2]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("qcompile_triton: a weight is packed on its first use, which needs a host sync and "
                           "cannot run inside a CUDA graph capture; run the compiled model once before capturing")
    pw = make()
    if hit is None:
        weakref.finalize(anchor, _CACHE.pop, id(anchor), None)
    _CACHE[id(anchor)] = (weakref.ref(anchor), key, pw)
    return pw


def packed_for_codes(codes, scale, zero_point, fmt: str, granularity: str, in_features: int) -> PackedWeight:
    """The cached ``prepack`` of ``qcompile::dequantize_weight``'s inputs (codes two per byte for 4 bits)."""
    key = ("codes", _version(codes), scale.data_ptr(), _version(scale), zero_point.data_ptr(),
           _version(zero_point), fmt, granularity, in_features)
    return _lookup(codes, key, lambda: prepack(codes, scale, zero_point, fmt, granularity, in_features=in_features))


def packed_for_weight(weight: torch.Tensor, fmt: str, granularity: str) -> PackedWeight:
    """The cached RTN quantization (``formats.quantize``) + ``prepack`` of a float weight ``[N, K]``."""
    key = ("rtn", _version(weight), weight.data_ptr(), fmt, granularity)

    def make():
        spec, gran = F.FormatSpec.parse(fmt), F.Granularity.parse(granularity)
        return prepack(*F.quantize(weight.detach(), spec, gran), spec, gran)

    return _lookup(weight, key, make)


def cached_packed_weights() -> list[PackedWeight]:
    """Every packed weight alive in the cache (to count their bytes)."""
    return [entry[2] for entry in _CACHE.values() if entry[0]() is not None]


def _run(x, pw, act_fmt, bias):
    fn = w4a8_linear if _parse_format(act_fmt).bits == 8 else w4a4_linear
    return fn(x, pw, bias, act_fmt)


def _next_weights(next_codes) -> list | None:
    """The packed weights already made for ``next_codes`` (the next linear's codes, ``next0..2`` of the ops,
    ``l2_chain.py``; None where unused), to prefetch into L2: cache hits only (a hint never packs, so it never
    syncs or allocates)."""
    hits = [_live_entry(c) for c in next_codes if c is not None]
    return [hit[2].qweight for hit in hits if hit is not None] or None


@torch.library.custom_op("qcompile_triton::w4_linear_codes", mutates_args=())
def w4_linear_codes(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str,
                    granularity: str, in_features: int, act_fmt: str, bias: Optional[torch.Tensor],
                    next0: Optional[torch.Tensor] = None, next1: Optional[torch.Tensor] = None,
                    next2: Optional[torch.Tensor] = None) -> torch.Tensor:
    pw = packed_for_codes(codes, scale, zero_point, fmt, granularity, in_features)
    spec = _parse_format(act_fmt)
    nxt = _next_weights((next0, next1, next2))
    if nxt is None or spec.bits != 8 or pw.group_size > 0:
        return _run(x, pw, act_fmt, bias)
    # the w4a8_linear op's body, with the next weights to prefetch
    return _linear_impl(x, pw.qweight, pw.unit_scale, pw.code_sum, pw.zero_byte, pw.fmt, pw.group_size,
                        pw.in_features, _act_spec(act_fmt, 8), 0, bias, "w4_linear_codes", l2_next=nxt)


@torch.library.custom_op("qcompile_triton::w4_linear_rtn", mutates_args=())
def w4_linear_rtn(x: torch.Tensor, weight: torch.Tensor, fmt: str, granularity: str, act_fmt: str,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _run(x, packed_for_weight(weight, fmt, granularity), act_fmt, bias)


@torch.library.custom_op("qcompile_triton::w4_linear_codes_shared", mutates_args=())
def w4_linear_codes_shared(x: torch.Tensor, codes: list[torch.Tensor], scale: list[torch.Tensor],
                           zero_point: list[torch.Tensor], fmt: str, granularity: str, in_features: int,
                           act_fmt: str, bias: list[Optional[torch.Tensor]], next0: Optional[torch.Tensor] = None,
                           next1: Optional[torch.Tensor] = None,
                           next2: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    if not (len(codes) == len(scale) == len(zero_point) == len(bias)):
        raise ValueError("w4_linear_codes_shared: codes, scale, zero_point and bias lists differ in length")
    pws = [packed_for_codes(c, s, z, fmt, granularity, in_features) for c, s, z in zip(codes, scale, zero_point)]
    spec = _parse_format(act_fmt)
    if spec.bits != 8 or any(pw.group_size > 0 for pw in pws) or not _use_triton(x):
        return [_run(x, pw, act_fmt, b) for pw, b in zip(pws, bias)]  # the per-site ops (reference on CPU)
    from .w4_linear import w4_linear_2d_shared

    _check_x(x, in_features, "w4_linear_codes_shared")
    x2 = x.reshape(-1, in_features).contiguous()
    ys = w4_linear_2d_shared(x2, pws, spec.bits, spec.symmetric, bias, l2_next=_next_weights((next0, next1, next2)))
    return [y.reshape(*x.shape[:-1], pw.out_features) for y, pw in zip(ys, pws)]


@torch.library.custom_op("qcompile_triton::w4_linear_qcodes", mutates_args=())
def w4_linear_qcodes(xq: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor, codes: list[torch.Tensor],
                     scale: list[torch.Tensor], zero_point: list[torch.Tensor], fmt: str, in_features: int,
                     act_fmt: str, bias: list[Optional[torch.Tensor]], out_dtype: torch.dtype) -> list[torch.Tensor]:
    if not (len(codes) == len(scale) == len(zero_point) == len(bias)) or not codes:
        raise ValueError("w4_linear_qcodes: codes, scale, zero_point and bias lists differ in length or are empty")
    if xq.dtype != torch.int8 or x_scale.dtype != torch.float32 or x_zp.dtype != torch.int32:
        raise ValueError(f"w4_linear_qcodes: activation codes int8, scales float32, zero-points int32; got "
                         f"{xq.dtype}, {x_scale.dtype}, {x_zp.dtype}")
    lead = xq.shape[:-1]
    if xq.shape[-1] != in_features or x_scale.shape != (*lead, 1) or x_zp.shape != (*lead, 1):
        raise ValueError(f"w4_linear_qcodes: codes [..., {in_features}] with scales and zero-points [..., 1]; got "
                         f"{tuple(xq.shape)}, {tuple(x_scale.shape)}, {tuple(x_zp.shape)}")
    spec = _parse_format(act_fmt)
    if spec.bits != 8:
        raise ValueError(f"w4_linear_qcodes takes int8 activations, not {act_fmt!r}")
    pws = [packed_for_codes(c, s, z, fmt, "channel", in_features) for c, s, z in zip(codes, scale, zero_point)]
    q = (xq.reshape(-1, in_features).contiguous(), x_scale.reshape(-1, 1).contiguous(),
         x_zp.reshape(-1, 1).contiguous())
    if _use_triton(xq):
        from .w4_linear import w4_linear_2d_codes

        ys = w4_linear_2d_codes(*q, pws, spec.bits, spec.symmetric, bias, out_dtype)
    else:
        from .reference import gemm_reference

        ys = [gemm_reference(*q, pw, out_dtype, b) for pw, b in zip(pws, bias)]
    return [y.reshape(*lead, pw.out_features) for y, pw in zip(ys, pws)]


@w4_linear_qcodes.register_fake
def _(xq, x_scale, x_zp, codes, scale, zero_point, fmt, in_features, act_fmt, bias, out_dtype):
    return [xq.new_empty((*xq.shape[:-1], c.shape[0]), dtype=out_dtype) for c in codes]


@w4_linear_codes_shared.register_fake
def _(x, codes, scale, zero_point, fmt, granularity, in_features, act_fmt, bias, next0=None, next1=None,
      next2=None):
    return [x.new_empty((*x.shape[:-1], c.shape[0])) for c in codes]


@w4_linear_codes.register_fake
def _(x, codes, scale, zero_point, fmt, granularity, in_features, act_fmt, bias, next0=None, next1=None,
      next2=None):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@w4_linear_rtn.register_fake
def _(x, weight, fmt, granularity, act_fmt, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_codes(ctx, inputs, output):
    x, codes, scale, zp, fmt, gran, k, act_fmt, bias = inputs[:9]
    ctx.save_for_backward(codes, scale, zp)
    ctx.meta = (fmt, gran, k, x.dtype, bias is not None)


def _backward_codes(ctx, grad):
    codes, scale, zp = ctx.saved_tensors
    fmt, gran, k, dtype, has_bias = ctx.meta
    w = torch.ops.qcompile.dequantize_weight(codes, scale, zp, fmt, gran, k, "float32")
    db = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias else None
    return (grad.float() @ w).to(dtype), None, None, None, None, None, None, None, db, None, None, None


def _setup_rtn(ctx, inputs, output):
    x, weight, fmt, gran, act_fmt, bias = inputs
    ctx.save_for_backward(weight)
    ctx.meta = (fmt, gran, x.dtype, bias is not None)


def _backward_rtn(ctx, grad):
    (weight,) = ctx.saved_tensors
    fmt, gran, dtype, has_bias = ctx.meta
    w = F.fake_quantize(weight.float(), F.FormatSpec.parse(fmt), F.Granularity.parse(gran))
    db = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias else None
    return (grad.float() @ w).to(dtype), None, None, None, None, db


w4_linear_codes.register_autograd(_backward_codes, setup_context=_setup_codes)
w4_linear_rtn.register_autograd(_backward_rtn, setup_context=_setup_rtn)
