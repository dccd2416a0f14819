"""Dynamic activation quantization in ONNX ops, equal to ``qcompile.formats`` bit for bit.

The reference (``formats.choose_qparams`` / ``quantize_with_qparams``) for INT-b, per block:
    asymmetric: lo = min(min(x), 0), hi = max(max(x), 0), s = max((hi - lo) / (2^b - 1), 1e-8),
                z = clip(round(-lo / s), 0, 2^b - 1)
    symmetric:  s = max(max|x| / (2^(b-1) - 1), 1e-8), z = 2^(b-1)
    codes q = clip(round(x / s) + z, 0, 2^b - 1);   x_hat = (q - z) * s
Every step is one IEEE float32 operation (min/max exact, one division, round-half-even) in both
PyTorch and onnxruntime, so the codes and values are identical, not just close.

Blocks: ``token`` reduces over K, ``group<g>`` over g consecutive channels of K (both computed on a
``[-1, G, g]`` view); ``vchannel`` (attention V) over the tokens T of ``[..., T, C]``. Token and group
at 4 or 8 bits use standard ``QuantizeLinear``/``DequantizeLinear`` with blocked quantization
(``axis=-1, block_size=g``, a run-time scale ``[M, G, 1]``); V and other widths use the same maths in
float ops (QuantizeLinear's block size must be static, and T is not).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import formats as F
from qcompile.backends.onnx.builder import GraphEdit
from qcompile.errors import ExportError

__all__ = ["check_activation_format", "emit_qdq", "emit_quantize_per_token"]

_EPS = 1e-8
_CONTAINERS = {4: ir.DataType.UINT4, 8: ir.DataType.UINT8}


def check_activation_format(fmt: str, granularity: str) -> tuple[F.FormatSpec, F.Granularity]:
    """Parse an activation format; only INT (asymmetric or symmetric) can be expressed in-graph."""
    spec, gran = F.FormatSpec.parse(fmt), F.Granularity.parse(granularity)
    if spec.kind != "int":
        raise ExportError(f"activation format {fmt} ({granularity}) cannot be exported to ONNX: only INT "
                          "activations (int<b>, int<b>_sym) are computed in-graph; use an INT activation recipe")
    if gran.kind not in ("token", "group", "vchannel"):
        raise ExportError(f"activation granularity {granularity!r} cannot be exported; expected token, "
                          "group<g> or vchannel")
    return spec, gran


def _qparams(ed: GraphEdit, xb: ir.Value, spec: F.FormatSpec, axis: int):
    """Scale and (float, integer-valued) zero-point of ``xb`` reduced over ``axis``, kept as size 1."""
    axes = ed.small([axis], np.int64)
    p = float(spec.n_steps)
    if spec.symmetric:
        amax = ed.op("ReduceMax", ed.op("Abs", xb), axes, keepdims=1)
        scale = ed.op("Max", ed.op("Div", amax, ed.small(float(spec.n_steps // 2))), ed.small(_EPS))
        # the fixed zero-point, broadcast to the scale's shape (blocked QuantizeLinear wants equal shapes)
        return scale, ed.op("Expand", ed.small(float(1 << (spec.bits - 1))), ed.op("Shape", scale))
    zero = ed.small(0.0)
    lo = ed.op("Min", ed.op("ReduceMin", xb, axes, keepdims=1), zero)
    hi = ed.op("Max", ed.op("ReduceMax", xb, axes, keepdims=1), zero)
    scale = ed.op("Max", ed.op("Div", ed.op("Sub", hi, lo), ed.small(p)), ed.small(_EPS))
    zp = ed.op("Clip", ed.op("Round", ed.op("Div", ed.op("Neg", lo), scale)), zero, ed.small(p))
    return scale, zp


def _float_qdq(ed: GraphEdit, xb, scale, zp, spec: F.FormatSpec):
    top = ed.small(float(spec.n_codes - 1))
    q = ed.op("Clip", ed.op("Add", ed.op("Round", ed.op("Div", xb, scale)), zp), ed.small(0.0), top)
    return ed.op("Mul", ed.op("Sub", q, zp), scale)


def emit_qdq(ed: GraphEdit, x: ir.Value, k: int, fmt: str, granularity: str) -> ir.Value:
    """Quantize-dequantize ``x [..., K]`` as ``qcompile::qdq_activation(x, fmt, granularity)`` does."""
    spec, gran = check_activation_format(fmt, granularity)
    if gran.kind == "vchannel":
        scale, zp = _qparams(ed, x, spec, axis=-2)
        return _float_qdq(ed, x, scale, zp, spec)
    g = gran.group_size if gran.kind == "group" else k
    if k % g:
        raise ExportError(f"activation group size {g} does not divide K={k}")
    xb = ed.op("Reshape", x, ed.small([-1, k // g, g], np.int64))  # [M, G, g]
    scale, zp = _qparams(ed, xb, spec, axis=-1)
    if spec.bits in _CONTAINERS:
        zq = ed.op("Cast", zp, to=_CONTAINERS[spec.bits])
        q = ed.op("QuantizeLinear", xb, scale, zq, axis=-1, block_size=g)
        yb = ed.op("DequantizeLinear", q, scale, zq, axis=-1, block_size=g)
    else:
        yb = _float_qdq(ed, xb, scale, zp, spec)
    return ed.op("Reshape", yb, ed.op("Shape", x))


def emit_quantize_per_token(ed: GraphEdit, x: ir.Value, k: int, fmt: str):
    """Per-token uint8 codes of ``x [..., K]`` for an integer GEMM: ``(x_q, s_x [..., 1], z_x int32 [..., 1])``.

    The same codes as the reference's ``int8``/``int8_sym`` per-token quantizer.
    """
    spec, _ = check_activation_format(fmt, "token")
    if spec.bits != 8:
        raise ExportError(f"per-token integer GEMM needs 8-bit activations, got {fmt}")
    scale, zp = _qparams(ed, x, spec, axis=-1)
    zq = ed.op("Cast", zp, to=ir.DataType.UINT8)
    xq = ed.op("QuantizeLinear", x, scale, zq, axis=-1, block_size=k)
    return xq, scale, ed.op("Cast", zp, to=ir.DataType.INT32)
