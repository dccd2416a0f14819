"""Triton backend: W4A8 / W4A4 GEMM kernels for Hopper, exposed as ``qcompile_triton::`` custom ops.

    from qcompile.backends.triton import prepack, w4a8_linear
    packed = prepack(codes, scale, zp, "dint4", "channel")  # offline, from formats.quantize output
    y = w4a8_linear(x_fp16, packed)                          # quantizes x per token inside

Modules: ``packing`` (offline layout, no triton), ``reference`` (CPU integer maths), ``ops`` (custom ops
and the Python API), ``quantize_kernel`` / ``w4_gemm_kernel`` / ``w4_linear`` (Triton; imported only
when a kernel runs, so importing this package does not import triton). Decode attention (one query token
over a KV cache, split over the keys): ``attention_ops`` (op and API) and ``decode_attention_kernel``.
"""
from .attention_ops import decode_attention
from .ops import quantize_per_group, quantize_per_token, w4a4_linear, w4a8_linear
from .packing import PackedWeight, prepack, unpack_values

__all__ = [
    "PackedWeight",
    "decode_attention",
    "prepack",
    "quantize_per_group",
    "quantize_per_token",
    "unpack_values",
    "w4a4_linear",
    "w4a8_linear",
]
