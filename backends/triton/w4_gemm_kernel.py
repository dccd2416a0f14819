"""W4A8 / W4A4 GEMM kernel: int8 activation codes x 4-bit packed weights -> fp16/bf16/fp32 output.

    y[m, n] = sum_g  sx[m, g] * u[n, g] * ( sum_{k in g} xq[m, k] * t[n, k]  -  zx[m, g] * T[n, g] )
              `-- fp32 --'   `--------------- int32, int8 x int8 tl.dot ---------------'

``xq`` signed activation codes, ``zx`` their zero-point (``quantize_kernel``); ``t`` integer weight
values unpacked in registers from the chunk-halves layout (``packing.py``), ``u`` the weight unit
scale and ``T`` the per-group code sums. Per-channel weights with per-token activations have one
"group" (all of K): the whole K loop accumulates in int32 and scales are applied once in the
epilogue. Per-group weights (and W4A4's per-group activations) close each group's int32 partial
into an fp32 accumulator.

Each loop step handles ``UNITS_PER_ITER`` units (a unit is one chunk of ``PACK_K`` codes per
channel, or one group of ``CHUNKS_PER_UNIT`` chunks); each chunk is two ``tl.dot`` of K = PACK_K/2,
one per nibble plane. Hopper: int8 ``tl.dot`` becomes wgmma when BLOCK_M % 64 == 0 and
num_warps % 4 == 0 (prefill configs), mma.sync otherwise (the unswapped decode configs, BLOCK_M = 16).
``SWAP_AB`` (per-channel weights) swaps them: y^T = W x^T, the weight tile
[BLOCK_N, K] is the dot's A (wgmma's M side, from registers) and the activation tile its B (N = BLOCK_M, 16 at
decode): the prefill tiles, and the decode tiles with split-K, whose SPLIT_K slices restore the programs that
BLOCK_N >= 64 takes away.

``PDL`` (programmatic dependent launch, Hopper): launched while the kernel before it (``quantize_rows(pdl=True)``)
runs; waits for it before the first read of the activation, and lets the next kernel launch once its loop is
done.

``FUSE_QUANT`` (decode, per-token activations): the kernel reads the fp16/bf16 ``x`` itself, reduces
each row's min/max (from L2, every program) and quantizes its tiles in registers — one launch
instead of two. ``W_KIND == 2`` reads a pre-expanded int8 ``[C, N, PACK_K]`` weight (see
``expand_weight``) instead of unpacking: the large-M variant where the unpack cost is amortized.

File order (Triton tutorial): configs -> kernels -> launch wrappers (``w4_linear.py`` dispatches).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._common import act_qparams, act_quantize, unpack

__all__ = [
    "DECODE_CONFIGS",
    "DEEP_DECODE_CONFIGS",
    "FUSED_DECODE_CONFIGS",
    "PREFILL_CONFIGS",
    "SPLITK_DECODE_CONFIGS",
    "SWAP_DECODE_CONFIGS",
    "SWAP_PREFILL_CONFIGS",
    "expand_kernel",
    "w4_gemm_kernel",
]


# ----------------------------------------------------------------------------------------------- configs
def _cfg(bm, bn, upi, warps, stages, group_m=8, split_k=1, swap_ab=False):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "UNITS_PER_ITER": upi, "GROUP_M": group_m, "SPLIT_K": split_k}
    if swap_ab:
        kw["SWAP_AB"] = True
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# M <= 16: a GEMV in disguise. Small BLOCK_N gives >= 1 wave of programs at N = 4096; several
# chunks per step keep >= 16 KB of weights in flight per SM (Little's law at ~3 TB/s).
DECODE_CONFIGS = [
    _cfg(16, bn, upi, warps, stages, 1)
    for bn, upi, warps, stages in [
        (16, 4, 4, 3), (16, 8, 4, 3), (16, 8, 2, 3), (32, 4, 4, 3), (32, 8, 4, 2), (64, 2, 4, 4),
        (64, 4, 4, 3), (128, 2, 8, 3),
    ]
]
# Decode with the activation quantization fused in: its in-register division per activation element
# makes wide unrolls slow to compile (~30 s at UNITS_PER_ITER=4), so fewer, shallower configs.
FUSED_DECODE_CONFIGS = [
    _cfg(16, bn, upi, warps, stages, 1) for bn, upi, warps, stages in [(32, 2, 4, 3), (64, 2, 4, 3), (128, 1, 8, 3)]
]
# Decode, split-K (per-channel weights, activations quantized by quantize_rows first): N / BLOCK_N tiles
# leave most SMs idle and each program's K loop long (at N = K = 4096, BLOCK_N = 32: 128 programs on 132
# SMs, 32 serial steps); SPLIT_K programs per tile each take a slice of K and add their int32 partial
# sums into a workspace, the last one applies the epilogue (exact: integer adds commute).
SPLITK_DECODE_CONFIGS = [
    _cfg(16, bn, upi, warps, stages, 1, sk)
    for bn, upi, warps, stages, sk in [
        (32, 2, 4, 3, 4), (32, 2, 4, 3, 8), (64, 2, 4, 3, 4), (64, 2, 4, 3, 8), (64, 2, 4, 3, 16),
        (128, 1, 4, 3, 8), (128, 2, 8, 3, 8), (128, 1, 4, 3, 16),
    ]
]
# Decode with the operands swapped (``SWAP_AB``; per-channel weights, quantized activations): the weight tile
# on wgmma's M side (BLOCK_N >= 64, from registers; offline sm_90 PTX: wgmma m64n16k32, A from registers), the
# M <= 16 activation rows its N = 16 side, split-K for programs. Sweep only: on the H100 (2026-12-06, M = 1, 4,
# 16, four shapes, codes given, ``bench_w4a8_linear.py --variants --gemm-sweep``) the best of them beat the best
# unswapped decode tile on 3 of 12 cases by 0.4-3.4 % (4096x11008 at M = 1: 14.4 vs 14.9 us) and lost on 9 by
# 1-34 % (14336x4096 at M = 16: 22.5 vs 16.8 us); no GEMM tile reached the dp4a GEMV at M = 1.
SWAP_DECODE_CONFIGS = [
    _cfg(16, bn, upi, warps, stages, 1, sk, swap_ab=True)
    for bn, upi, warps, stages, sk in [
        (64, 2, 4, 4, 4), (64, 1, 4, 4, 8), (128, 1, 4, 4, 4), (128, 2, 4, 3, 4), (64, 2, 4, 3, 8),
        (128, 1, 4, 4, 8), (64, 4, 4, 3, 2), (128, 1, 4, 3, 2),
    ]
]
# Decode with deep pipelines. Sweep only. Every decode tile above keeps at most 2-3 stages of weights in shared
# memory (~8-16 KB of weights in flight per SM), so the bytes in flight looked like the cap at M <= 16 (>= 9.4 us
# for 8.4 MB). These keep 4-9 buffers (offline sm_90: 37-82 KB of shared memory). H100, 2026-12-06, codes given
# (``bench_gemv_pieces.py --deep``, four shapes at M = 4 and 16): the best of them ran 0.88-1.01x as fast as the
# best autotuned tile (unsplit or split-K), so bytes in flight were not the cap; one warp per scheduler on a
# dependent chain per step is (Nsight Compute; ``w4_ksplit_kernel``'s docstring).
DEEP_DECODE_CONFIGS = [
    _cfg(16, bn, upi, warps, stages, 1, sk)
    for bn, upi, warps, stages, sk in [
        (32, 4, 4, 5, 1), (32, 4, 4, 6, 1), (32, 2, 4, 6, 1), (32, 2, 4, 8, 1), (32, 1, 4, 10, 1), (16, 4, 2, 6, 1),
        (16, 8, 2, 4, 1), (64, 2, 4, 6, 1), (32, 2, 4, 5, 2), (64, 2, 4, 6, 2),
    ]
]
# With the operands swapped (``SWAP_AB``): the unpacked weight tile [BLOCK_N, K] is wgmma's A operand, which
# stays in registers (offline sm_90 PTX: A from registers, 0-5 shared stores in the kernel instead of 22),
# instead of B, which must be stored to shared memory after the unpack; the activation tile becomes B.
# Per-channel weights only (the autotuner prunes them for groups). H100, 2026-12-06, M = 4096, codes given
# (``bench_w4a8_linear.py --variants --gemm-sweep``): the best unswapped config (256 x 128, 8 warps) 460.8 us
# at 4096x11008 and 178.4 at 4096x4096; swapped 128 x 128 on 4 warps 359.8 and 149.0, 256 x 128 on 8 warps
# 398.8 and 164.2, also ahead of the best on pre-expanded int8 weights (366.1 and 149.6, without the expansion).
# The first two are autotuned; all of them are in the sweep.
SWAP_PREFILL_CONFIGS = [
    _cfg(bm, bn, upi, warps, stages, swap_ab=True)
    for bm, bn, upi, warps, stages in [
        (128, 128, 1, 4, 3), (256, 128, 1, 8, 3), (64, 128, 1, 4, 4), (128, 64, 1, 4, 4), (128, 128, 1, 8, 3),
        (128, 256, 1, 8, 3), (256, 64, 1, 4, 3), (256, 128, 1, 4, 3),
    ]
]
# M > 16: tiled GEMM; BLOCK_M % 64 == 0 and num_warps % 4 == 0 for wgmma. Narrow tiles (BLOCK_N 32,
# 64) keep all SMs streaming weights while M is small (M = 64: one row of tiles).
PREFILL_CONFIGS = [
    _cfg(bm, bn, upi, warps, stages)
    for bm, bn, upi, warps, stages in [
        (64, 32, 2, 4, 3), (64, 64, 2, 4, 3), (64, 128, 1, 4, 4), (64, 256, 1, 8, 3), (128, 64, 1, 4, 4),
        (128, 128, 1, 8, 3), (128, 128, 2, 8, 3), (128, 256, 1, 8, 3), (256, 128, 1, 8, 3),
    ]
] + SWAP_PREFILL_CONFIGS[:2]


def prune_configs(configs, named_args, **meta):
    """Drop tiles much taller than M, and tiles whose accumulators would spill (two of them when grouped)."""
    m_bucket = named_args["M_BUCKET"]
    grouped = meta.get("GROUPED", False)
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm > max(64, m_bucket) or bm * bn // (32 * c.num_warps) > (64 if grouped else 128):
            continue
        if m_bucket >= 512 and bn < 64:  # compute-bound: narrow tiles only re-read activations
            continue
        if c.kwargs.get("SWAP_AB") and (grouped or meta.get("X_GROUPED") or meta.get("FUSE_QUANT")):
            continue  # SWAP_AB: per-channel weights, quantized activations
        kept.append(c)
    return kept or configs[:1]


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _load_x_plane(x_ptr, offs_m, k, stride_xm, M, K, x_scale, x_zpf,
                  FUSE_QUANT: tl.constexpr, X_QMAX: tl.constexpr):
    """int8 activation codes [BLOCK_M, HALF] at columns ``k`` (zero outside [0, M) x [0, K))."""
    mask = (offs_m[:, None] < M) & (k[None, :] < K)
    ptrs = x_ptr + offs_m[:, None] * stride_xm + k[None, :]
    if FUSE_QUANT:
        xv = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        q = act_quantize(xv, x_scale[:, None], x_zpf[:, None], X_QMAX) - (X_QMAX + 1) // 2
        xq = tl.where(mask, q, 0).to(tl.int8)
    else:
        xq = tl.load(ptrs, mask=mask, other=0)
    return xq


@triton.jit
def _load_w_planes(w_ptr, chunk, n_chunks, offs_j, offs_n, N, zb,
                   W_KIND: tl.constexpr, DINT_R: tl.constexpr, PACK_K: tl.constexpr, USE_ASM: tl.constexpr,
                   TRANS: tl.constexpr = False):
    """int8 weight values [HALF, BLOCK_N] ([BLOCK_N, HALF] if TRANS; ``zb`` shaped to match) for the
    chunk's first and second halves of K."""
    HALF: tl.constexpr = PACK_K // 2
    if TRANS:
        n_idx = offs_n[:, None]
        j_idx = offs_j[None, :]
    else:
        n_idx = offs_n[None, :]
        j_idx = offs_j[:, None]
    # Masks are built from full-shape index tensors: the interpreter mishandles 0-d comparisons.
    mask = (chunk * PACK_K + j_idx < n_chunks * PACK_K) & (n_idx < N)
    if W_KIND == 2:
        ptrs = w_ptr + chunk * N * PACK_K + n_idx * PACK_K + j_idx
        lo = tl.load(ptrs, mask=mask, other=0)
        hi = tl.load(ptrs + HALF, mask=mask, other=0)
    else:
        b = tl.load(w_ptr + chunk * N * HALF + n_idx * HALF + j_idx, mask=mask, other=0)
        lo, hi = unpack(b, zb, W_KIND == 1, DINT_R, USE_ASM)
    return lo, hi


@triton.jit
def _row_qparams(x_ptr, offs_m, stride_xm, M, K, X_QMAX: tl.constexpr, X_SYMMETRIC: tl.constexpr,
                 X_RECIP_DIV: tl.constexpr, BLOCK_M: tl.constexpr, STAT_BLOCK: tl.constexpr):
    """FUSE_QUANT prologue: per-token scale / zero-point of the program's rows (reads x over all of K)."""
    # Element-wise running min / max, reduced once after the loop (fewer dependent L2 round trips).
    lo_t = tl.zeros([BLOCK_M, STAT_BLOCK], tl.float32)
    hi_t = tl.zeros([BLOCK_M, STAT_BLOCK], tl.float32)
    cols = tl.arange(0, STAT_BLOCK)
    for k0 in range(0, K, STAT_BLOCK):
        mask = (offs_m[:, None] < M) & (k0 + cols[None, :] < K)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + k0 + cols[None, :], mask=mask, other=0.0)
        lo_t = tl.minimum(lo_t, xv.to(tl.float32))
        hi_t = tl.maximum(hi_t, xv.to(tl.float32))
    lo = tl.min(lo_t, axis=1)
    hi = tl.max(hi_t, axis=1)
    return act_qparams(lo, hi, X_QMAX, X_SYMMETRIC, X_RECIP_DIV)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # M = 1 needs no separate compile
def w4_gemm_kernel(
        # activations: int8 codes [M, K] (fp16/bf16/fp32 values if FUSE_QUANT); qparams [M, Gx]
        x_ptr, x_scale_ptr, x_zp_ptr, stride_xm, stride_xg,
        # weights: codes [C, N, PACK_K // 2] uint8 (int8 [C, N, PACK_K] if W_KIND == 2); tables [G, N]
        w_ptr, w_scale_ptr, w_sum_ptr, w_zero_ptr,
        bias_ptr, y_ptr, stride_ym,
        ws_ptr, lock_ptr,  # split-K: int32 [16, N] partial sums and int32 [tiles] arrival counters, both kept zero
        M, N, K, n_units, M_BUCKET,
        W_KIND: tl.constexpr, DINT_R: tl.constexpr, PACK_K: tl.constexpr, CHUNKS_PER_UNIT: tl.constexpr,
        GROUPED: tl.constexpr, X_GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr,
        USE_ASM: tl.constexpr, FUSE_QUANT: tl.constexpr, X_QMAX: tl.constexpr, X_SYMMETRIC: tl.constexpr,
        X_RECIP_DIV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNITS_PER_ITER: tl.constexpr, GROUP_M: tl.constexpr,
        SPLIT_K: tl.constexpr,
        SWAP_AB: tl.constexpr = False,  # accumulate y^T = W x^T ([BLOCK_N, BLOCK_M]), transposed at the end
        PDL: tl.constexpr = False):  # launched as a programmatic dependent (see the module docstring)
    HALF: tl.constexpr = PACK_K // 2
    if SWAP_AB:
        tl.static_assert(not GROUPED, "SWAP_AB takes per-channel weights")
    # Grouped launch order (tutorial 03): GROUP_M row-blocks share each weight tile while it is in L2.
    # Split-K: program ids [k_slice * tiles, (k_slice + 1) * tiles) take slice k_slice of the K units.
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    k_slice = pid // tiles
    pid = pid % tiles
    units_per_slice = tl.cdiv(n_units, SPLIT_K)
    unit_lo = k_slice * units_per_slice
    unit_hi = min(n_units, unit_lo + units_per_slice)
    k_end = min(K, unit_hi * (CHUNKS_PER_UNIT * PACK_K))
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % size_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    m_ok = offs_m < M
    n_ok = offs_n < N
    n_chunks = tl.cdiv(K, PACK_K)

    if PDL:  # nothing above reads what the kernel before this one writes; everything below may
        gdc_wait()
    # Per-token activation qparams (the per-group ones are read per unit below).
    x_scale = tl.zeros([BLOCK_M], tl.float32)
    x_zpf = tl.zeros([BLOCK_M], tl.float32)
    x_zp = tl.zeros([BLOCK_M], tl.int32)
    if FUSE_QUANT:
        x_scale, x_zpf = _row_qparams(x_ptr, offs_m, stride_xm, M, K, X_QMAX, X_SYMMETRIC, X_RECIP_DIV,
                                      BLOCK_M, 256)
        x_zp = x_zpf.to(tl.int32) - (X_QMAX + 1) // 2
    elif not X_GROUPED:
        x_scale = tl.load(x_scale_ptr + offs_m * stride_xg, mask=m_ok, other=0.0)
        x_zp = tl.load(x_zp_ptr + offs_m * stride_xg, mask=m_ok, other=0)

    zb = tl.load(w_zero_ptr + offs_n, mask=n_ok, other=128)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
        zb = zb[:, None]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        zb = zb[None, :]
    acc_f = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for it in range(tl.cdiv(unit_hi - unit_lo, UNITS_PER_ITER)):
        for uu in tl.static_range(UNITS_PER_ITER):
            unit = unit_lo + it * UNITS_PER_ITER + uu
            unit_ok_n = offs_n * 0 + unit < unit_hi
            unit_ok_m = offs_m * 0 + unit < unit_hi
            if GROUPED:
                zb = tl.load(w_zero_ptr + unit * N + offs_n, mask=n_ok & unit_ok_n, other=128)[None, :]
            for cc in tl.static_range(CHUNKS_PER_UNIT):
                chunk = unit * CHUNKS_PER_UNIT + cc
                k_lo = chunk * PACK_K + offs_j
                w_lo, w_hi = _load_w_planes(w_ptr, chunk, n_chunks, offs_j, offs_n, N, zb,
                                            W_KIND, DINT_R, PACK_K, USE_ASM, SWAP_AB)
                # Activations are zero past the slice's (and the matrix's) last unit: masked weight bytes
                # unpack to -z, not 0, so the x side is what keeps padding out of the sums.
                x_lo = _load_x_plane(x_ptr, offs_m, k_lo, stride_xm, M, k_end, x_scale, x_zpf, FUSE_QUANT, X_QMAX)
                x_hi = _load_x_plane(x_ptr, offs_m, k_lo + HALF, stride_xm, M, k_end, x_scale, x_zpf,
                                     FUSE_QUANT, X_QMAX)
                if SWAP_AB:
                    acc = tl.dot(w_lo, tl.trans(x_lo), acc, out_dtype=tl.int32)
                    acc = tl.dot(w_hi, tl.trans(x_hi), acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(x_lo, w_lo, acc, out_dtype=tl.int32)
                    acc = tl.dot(x_hi, w_hi, acc, out_dtype=tl.int32)
            if GROUPED:
                # Close the group: integer zero-point correction, then into fp32 with its scales.
                w_sum = tl.load(w_sum_ptr + unit * N + offs_n, mask=n_ok & unit_ok_n, other=0)
                w_scale = tl.load(w_scale_ptr + unit * N + offs_n, mask=n_ok & unit_ok_n, other=0.0)
                if X_GROUPED:
                    x_zp = tl.load(x_zp_ptr + offs_m * stride_xg + unit, mask=m_ok & unit_ok_m, other=0)
                    x_scale = tl.load(x_scale_ptr + offs_m * stride_xg + unit, mask=m_ok & unit_ok_m,
                                      other=0.0)
                corr = acc - x_zp[:, None] * w_sum[None, :]
                if INT_OUT:
                    acc_t += corr
                if X_GROUPED:
                    acc_f += corr.to(tl.float32) * (x_scale[:, None] * w_scale[None, :])
                else:
                    acc_f += corr.to(tl.float32) * w_scale[None, :]
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)

    if PDL:  # the weights are read: the next kernel may launch (it waits for this one before reading y)
        gdc_launch_dependents()
    # Epilogue.
    if SWAP_AB:
        acc = tl.trans(acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:  # (per-channel weights only) add the partial sums; the last slice to arrive finishes
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=y_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before this tile's arrival is counted
        arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.atomic_xchg(ws_ptrs, tl.zeros_like(acc), mask=y_mask, sem="acquire")  # read + re-zero
            tl.atomic_xchg(lock_ptr + pid, 0)
            _epilogue(acc, acc_f, acc_t, x_scale, x_zp, w_scale_ptr, w_sum_ptr, bias_ptr, y_ptrs, y_mask, offs_n,
                      n_ok, GROUPED, X_GROUPED, HAS_BIAS, INT_OUT)
    else:
        _epilogue(acc, acc_f, acc_t, x_scale, x_zp, w_scale_ptr, w_sum_ptr, bias_ptr, y_ptrs, y_mask, offs_n, n_ok,
                  GROUPED, X_GROUPED, HAS_BIAS, INT_OUT)


@triton.jit
def _epilogue(acc, acc_f, acc_t, x_scale, x_zp, w_scale_ptr, w_sum_ptr, bias_ptr, y_ptrs, y_mask, offs_n, n_ok,
              GROUPED: tl.constexpr, X_GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr):
    """Zero-point correction, scales, bias, store (int32 accumulator when INT_OUT)."""
    if INT_OUT:
        if GROUPED:
            out_i = acc_t
        else:
            out_i = acc - x_zp[:, None] * tl.load(w_sum_ptr + offs_n, mask=n_ok, other=0)[None, :]
        tl.store(y_ptrs, out_i, mask=y_mask)
    else:
        if GROUPED:
            y = acc_f
            if not X_GROUPED:
                y = y * x_scale[:, None]
        else:
            w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
            w_sum = tl.load(w_sum_ptr + offs_n, mask=n_ok, other=0)
            corr = acc - x_zp[:, None] * w_sum[None, :]
            y = corr.to(tl.float32) * (x_scale[:, None] * w_scale[None, :])
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=y_mask)


@triton.jit
def expand_kernel(w_ptr, w_zero_ptr, out_ptr, N, GROUPED: tl.constexpr, CHUNKS_PER_UNIT: tl.constexpr,
                  W_KIND: tl.constexpr, DINT_R: tl.constexpr, PACK_K: tl.constexpr, USE_ASM: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Unpack codes [C, N, HALF] to int8 values [C, N, PACK_K] (natural k order within a chunk)."""
    HALF: tl.constexpr = PACK_K // 2
    chunk = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    n_ok = offs_n < N
    if GROUPED:
        zb = tl.load(w_zero_ptr + (chunk // CHUNKS_PER_UNIT) * N + offs_n, mask=n_ok, other=128)[:, None]
    else:
        zb = tl.load(w_zero_ptr + offs_n, mask=n_ok, other=128)[:, None]
    b = tl.load(w_ptr + chunk * N * HALF + offs_n[:, None] * HALF + offs_j[None, :], mask=n_ok[:, None])
    lo, hi = unpack(b, zb, W_KIND == 1, DINT_R, USE_ASM)
    out = out_ptr + chunk * N * PACK_K + offs_n[:, None] * PACK_K + offs_j[None, :]
    tl.store(out, lo, mask=n_ok[:, None])
    tl.store(out + HALF, hi, mask=n_ok[:, None])
