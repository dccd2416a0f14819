"""CPU reference for the Triton ops: the same integer maths in plain torch (no triton import).

Used as the ops' fallback for CPU tensors outside ``TRITON_INTERPRET=1``, and by the tests. Activation
codes come from ``qcompile.formats.quantize`` itself; weight values from ``packing.unpack_values``
(which tests check against ``formats.code_values``). Integer sums are exact in float64 (|sum| < 2^53).
"""
from __future__ import annotations

import torch

from qcompile import formats as F

from .packing import PackedWeight, unpack_values

__all__ = ["gemm_reference", "linear_reference", "quantize_rows_reference"]


def quantize_rows_reference(x: torch.Tensor, bits: int, symmetric: bool, group_size: int = 0):
    """``formats.quantize`` per token / per group -> ``(codes int8, scale fp32 [M, G], zp int32 [M, G])``,
    codes and zero-points shifted by ``-2^(b-1)`` (the kernels' signed convention)."""
    spec = F.FormatSpec("int", bits, symmetric)
    gran = F.Granularity("group", group_size) if group_size else F.Granularity("token")
    codes, scale, zp = F.quantize(x, spec, gran)
    off = 1 << (bits - 1)
    return (codes.to(torch.int16) - off).to(torch.int8), scale[..., 0].contiguous(), \
        (zp[..., 0] - off).to(torch.int32).contiguous()


def gemm_reference(xq: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor, pw: PackedWeight,
                   out_dtype: torch.dtype = torch.float32, bias: torch.Tensor | None = None,
                   int_out: bool = False) -> torch.Tensor:
    """``sum_g sx * u * (sum_k xq t - zx T)`` in float64 (exact integer part); ``int_out``: the integer part."""
    m, k = xq.shape
    n, g_count = pw.out_features, pw.n_groups
    t = unpack_values(pw).double().view(n, g_count, k // g_count)
    acc = torch.einsum("mgk,ngk->mng", xq.double().view(m, g_count, k // g_count), t)  # [M, N, G]
    corr = acc - x_zp.double()[:, None, :] * pw.code_sum.t().double()[None]
    if int_out:
        return corr.sum(-1).to(torch.int32)
    y = (corr * pw.unit_scale.t().double()[None] * x_scale.double()[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def linear_reference(x: torch.Tensor, pw: PackedWeight, act_bits: int, act_sym: bool, act_group: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The ops' CPU fallback: reference activation quantization + ``gemm_reference``; ``x [M, K]``."""
    xq, xs, xz = quantize_rows_reference(x, act_bits, act_sym, act_group)
    return gemm_reference(xq, xs, xz, pw, x.dtype, bias)
