"""Fused residual add + RMSNorm + per-token activation quantization (decode rows: one token each).

For a row ``x`` (and optionally the residual ``r`` added to it) of length ``K`` with the norm's weight ``w``::

    h   = x + r                                   (x's dtype; stored: the residual stream goes on with it)
    v   = w * (h32 * rsqrt(mean(h32^2) + eps))    (the normalized row rounded to x's dtype, times w, rounded)
    codes, scale, zp = quantize(v)                (as ``quantize_kernel``: same qparams and rounding)

which is HF LLaMA's ``residual + hidden_states`` followed by ``LlamaRMSNorm`` and the q/k/v (or gate/up)
projections' activation quantization, in one launch instead of an Inductor kernel and ``quantize_rows``.
The roundings to x's dtype are where torch puts them; the mean's summation order is the kernel's own (and
``rsqrt`` is libdevice's), so ``v`` can differ from eager torch (and from Inductor's kernel) in the last
bit of the variance: codes then move by one step at most, rarely (tests bound it).

Rows up to 16384 long, in registers. Like ``quantize_rows`` at decode, ``SPLIT`` programs share a long row:
each one reduces the whole row (the same sums in the same order, so the same scale), and stores its
``SLICE`` of ``h`` and of the codes. File order (Triton tutorial): kernel -> wrapper.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._common import act_qparams, act_quantize, interpreting, pdl_launch, recip_div
from .quantize_kernel import launch_config

__all__ = ["MAX_ROW", "rmsnorm_quantize_rows"]

MAX_ROW = 16384  # longest row held in registers


@triton.jit
def _rmsnorm_quantize_kernel(
        x_ptr, r_ptr, w_ptr, h_ptr,  # x, residual [R, K] (x's dtype), norm weight [K], h = x + r [R, K]
        codes_ptr, scale_ptr, zp_ptr,  # int8 [R, K], fp32 [R], int32 [R] (signed convention)
        row_len, eps,
        QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, RECIP_DIV: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr, SPLIT: tl.constexpr, SLICE: tl.constexpr, PDL: tl.constexpr,
        INTERPRETED: tl.constexpr):
    OFFSET: tl.constexpr = (QMAX + 1) // 2
    if PDL:  # as quantize_rows: let the GEMV after it launch, wait for the kernel writing x
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    part = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < row_len
    base = row.to(tl.int64) * row_len
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    mine = mask
    if SPLIT > 1:
        mine = mask & (cols >= part * SLICE) & (cols < (part + 1) * SLICE)
    if HAS_RESIDUAL:
        tl.store(h_ptr + base + cols, x, mask=mine)
    h32 = x.to(tl.float32)
    var = tl.math.div_rn(tl.sum(h32 * h32, axis=0), row_len.to(tl.float32))
    if INTERPRETED:  # no libdevice in the interpreter
        inv = 1.0 / tl.sqrt(var + eps)
    else:
        inv = libdevice.rsqrt(var + eps)
    y = (h32 * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    v = (w * y).to(x.dtype).to(tl.float32)
    lo = tl.minimum(tl.min(v, axis=0), 0.0)
    hi = tl.maximum(tl.max(v, axis=0), 0.0)
    scale, zp = act_qparams(lo, hi, QMAX, SYMMETRIC, RECIP_DIV)
    if part == 0:
        tl.store(scale_ptr + row, scale)
        tl.store(zp_ptr + row, zp.to(tl.int32) - OFFSET)
    q = act_quantize(v, scale, zp, QMAX) - OFFSET
    tl.store(codes_ptr + base + cols, q.to(tl.int8), mask=mine)


def rmsnorm_quantize_rows(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                          bits: int, symmetric: bool, pdl: bool = False):
    """``x``, ``residual``: contiguous ``[M, K]`` (same dtype; ``residual`` None: no add), ``weight`` ``[K]``
    of x's dtype, ``K <= MAX_ROW``. Returns ``(h [M, K] or an empty tensor without residual, codes int8 [M, K],
    scale fp32 [M, 1], zp int32 [M, 1])``; ``pdl`` as ``quantize_rows``'s."""
    m, k = x.shape
    if k > MAX_ROW:
        raise ValueError(f"rmsnorm_quantize_rows: rows of at most {MAX_ROW}, got {k}")
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    zp = torch.empty((m, 1), dtype=torch.int32, device=x.device)
    if m == 0:
        return h, codes, scale, zp
    cfg = launch_config(m, k, prefill_one_pass=False)  # its warps as timed; it holds more than x a row
    pdl = pdl_launch(pdl, x.device)
    _rmsnorm_quantize_kernel[(m, cfg["SPLIT"])](
        x, x if residual is None else residual, weight, h if residual is not None else x, codes, scale, zp, k,
        float(eps), QMAX=(1 << bits) - 1, SYMMETRIC=symmetric, RECIP_DIV=recip_div(x.device),
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(k), SPLIT=cfg["SPLIT"],
        SLICE=cfg["SLICE"] or k, PDL=pdl, INTERPRETED=interpreting(), num_warps=cfg["num_warps"],
        **({"launch_pdl": True} if pdl else {}))
    return h, codes, scale, zp
