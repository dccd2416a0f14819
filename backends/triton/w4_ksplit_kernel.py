"""Decode GEMM (M <= 16, and up to 64 rows) with K split across warps: int8 activation codes x 4-bit packed weights on
mma.sync.

    y[m, n] = sx[m] * u[n] * ( sum_s sum_{k in chunks of slice s} xq[m, k] * t[n, k]  -  zx[m] * T[n] )
                              `--------- int32: S independent tl.dot, summed once ---------'

Why. At decode a linear is a weight stream, and at N = 4096 the tiled kernel (``w4_gemm_kernel``, BLOCK_N 32) has
128 programs of 4 warps: one warp per scheduler on each SM. Each step is a dependent chain (shared-memory load,
unpack, ldmatrix, mma), so one warp issues an instruction every ~3.6 cycles and the SM waits (Nsight Compute on the
H100, M = 16, 4096x4096: 0.98 active warps per scheduler, 0.28 instructions issued per cycle, 9.6 us for 8.4 MB;
``examples/results/ncu_decode_m16_h100.txt``). Split-K over programs adds warps but repeats each program's
prologue and epilogue and adds a workspace round trip (1024 programs: 6.6 warps per scheduler, yet 14.6 cycles per
instruction and no faster).

Here one program keeps its BLOCK_N channels and the whole K, but each step takes S chunks at once as a batch
dimension: the weight tile is ``[S, PACK_K / 2, BLOCK_N]`` per nibble plane, the activation tile
``[S, 16, PACK_K / 2]``, and ``tl.dot`` on the 3-D tiles is S independent products (offline sm_90 TTGIR: mma
``warpsPerCTA = [S, 1, 1]``: with ``num_warps = S`` warp s owns slice s). Every warp streams its own chunks (chunk
``it * S + s`` at step ``it``) into its own [16, BLOCK_N] sums, and the S partial sums are added once after the loop
(``tl.sum`` over the batch; integer adds, so the result is exactly the tiled kernel's):

    program n-block, step it:    warp 0: chunk it*S + 0    warp 1: chunk it*S + 1   ...   warp S-1: chunk it*S + S-1
                                 acc[0] += x[:, c] w[c]    acc[1] += ...                  acc[S-1] += ...
    after the loop:              y = epilogue( acc[0] + acc[1] + ... + acc[S-1] )

Measured (H100, 2026-12-06, codes given, ``bench_gemv_pieces.py --ksplit``): 1.20x the tiled kernel at 4096x4096
(M = 1-16), 1.37x at 4096x11008, 1.03-1.06x at 11008x4096, 0.98x at 14336x4096. The best config was S = 4 on 4
warps everywhere: the same warps per SM as the tiled kernel, and 8 or 16 warps were no faster, so the gain is not
more warps per scheduler. It is fewer instructions per chunk. Offline sm_90 SASS (Triton 3.6, BLOCK_N 32, 3 stages):
the tiled kernel's loop issues 248 instructions per warp per step of 2 chunks shared by its 4 warps, 496 warp
instructions per chunk, 20 of them ``LDSM``: every warp loads the whole activation tile for its slice of N. This
loop issues 382 per warp per step, one chunk per warp, so 382 per chunk, 8 of them ``LDSM``. That is 23 % fewer on
a latency-bound warp.

``LUT`` (dINT weights; on by default, ``DISPATCH.ksplit_lut``) swaps the arithmetic unpacker (``_common.unpack``,
17 SASS instructions per 8 codes) for a table one (``_common.unpack_bytes_lut``, 11): each fragment register of four
code bytes becomes two registers of values in the nibble order (k = j, H+j, j+1, H+j+1 and j+2, ...), and the
activation planes are interleaved to match with two ``prmt`` per register pair (``interleave_planes``). Offline
sm_90 SASS: 298 instructions per warp and chunk instead of 382. H100 (2026-12-06, ``bench_gemv_pieces.py
--ksplit-lut``): 1.04-1.15x on every config at 4096x4096 and 4096x11008, 1.01-1.05x at 11008x4096 and 14336x4096.
Same int32 sums, so the output is still bitwise the tiled kernel's. An unmasked K loop for shapes that divide
evenly (276 instructions) timed 1-8 % slower and was dropped (``examples/results/ksplit_even_ab_h100.txt``).

Rows. ``BLOCK_M`` is 16 (mma.sync's M) up to M = 16, and 32 or 64 above (``ksplit_block_m``, M <= 64): the
activation tile is ``[S, BLOCK_M, PACK_K / 2]`` and each unpacked weight fragment meets 2 or 4 row tiles of 16, so
the unpack, most of the loop's instructions, is paid once for up to 64 rows. Two accumulators (one per nibble plane,
``TWO_ACC``) at BLOCK_M 16; wider tiles keep one, as two would not fit in the registers.

The loop is software-pipelined by the launch's ``num_stages`` (cp.async of the packed weights and the activation
codes into shared memory, ``num_stages - 1`` steps ahead). Per-channel weights (dINT or INT), per-token int8
activations quantized beforehand (``quantize_rows``); the output is bitwise that of ``w4_gemm_kernel`` on the same
codes (same integer sum, same epilogue arithmetic).

File order (Triton tutorial): configs -> kernel (``w4_linear.py`` launches and dispatches).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._common import interleave_planes, lut_words, unpack, unpack_bytes_lut
from .w4_gemv_kernel import _gemv_store, channel_tables

__all__ = ["KSPLIT_CONFIGS", "KSPLIT_WIDE_CONFIGS", "ksplit_block_m", "ksplit_config", "prune_ksplit_configs",
           "w4_ksplit_kernel"]


# ----------------------------------------------------------------------------------------------- configs
def ksplit_config(block_n: int, s: int, warps: int, stages: int) -> triton.Config:
    """A config: ``block_n`` channels per program, ``s`` chunks per step (one per warp when ``warps == s``)."""
    return triton.Config({"BLOCK_N": block_n, "S": s}, num_warps=warps, num_stages=stages)


# (BLOCK_N, S, warps, stages). On the H100 (``bench_gemv_pieces.py --ksplit``, four shapes, M = 1, 4, 16, 14 configs;
# ``examples/results/ksplit_h100.txt`` and ``ksplit_extra_h100.txt``) (32, 4, 4, 3) won at 4096x4096; (32, 2, 2, 3)
# (two warps, so more programs per SM) at 11008x4096 and 14336x4096 (by 5-13 %); (32, 4, 4, 4) at 4096x11008 (by
# 3-4 %). (64, 4, 4, 3) had won 14336x4096 in the first run, before (32, 2, 2, 3) was timed, and came 10 % behind it
# in the second; it left the autotuner with S = 8 and S = 16 (1.2-3.8x the best's time), which never won. All stay in
# the benchmark's sweep. Offline sm_90 (Triton 3.6): BLOCK_N 32, S 4, 3 stages: 32 KB of shared memory; with the table
# unpacker 128 registers, 163 since the channel tables load before the loop (``channel_tables``; 2026-12-07).
KSPLIT_CONFIGS = [ksplit_config(bn, s, w, st) for bn, s, w, st in [
    (32, 4, 4, 3), (32, 2, 2, 3), (32, 4, 4, 4),
]]
# M = 17-64 (BLOCK_M 32 or 64, one accumulator). Offline sm_90 (Triton 3.6, 3 stages), registers at BLOCK_M 32 / 64:
# (32, 4, 4) 168 / 255 and spilling (pruned at 64), (32, 2, 2) 168 / 249, (16, 4, 4) 125 / 195, (16, 2, 2) 126 / 150.
KSPLIT_WIDE_CONFIGS = [ksplit_config(bn, s, w, st) for bn, s, w, st in [
    (32, 4, 4, 3), (32, 2, 2, 3), (16, 4, 4, 3), (16, 2, 2, 3),
]]


def ksplit_block_m(m: int) -> int:
    """The row tile for ``m`` rows: 16 (mma.sync's M) up to 16 rows, else the next power of two (32 or 64)."""
    return max(16, triton.next_power_of_2(m))


def prune_ksplit_configs(configs, named_args, **meta):
    """Keep the configs whose S slices fit K's chunks at least once (no step entirely past K), and at BLOCK_M 64
    those that do not spill (offline sm_90: 32 channels on 4 warps does)."""
    n_chunks = triton.cdiv(named_args["K"], meta.get("PACK_K", named_args.get("PACK_K", 128)))
    wide = meta.get("BLOCK_M", 16) >= 64
    kept = [c for c in configs if c.kwargs["S"] <= max(n_chunks, 4)
            and not (wide and c.kwargs["BLOCK_N"] >= 32 and c.num_warps >= 4)]
    return kept or configs[-1:]


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit(do_not_specialize=["M"])
def w4_ksplit_kernel(
        # activations: int8 codes [M, K] (signed convention), per-token fp32 scale and int32 zero-point [M]
        x_ptr, x_scale_ptr, x_zp_ptr, stride_xm,
        # weights: codes [C, N, PACK_K // 2] uint8; tables [1, N]
        w_ptr, w_scale_ptr, w_sum_ptr, w_zero_ptr,
        bias_ptr, y_ptr, stride_ym,
        M, N, K, M_BUCKET,
        DINT: tl.constexpr, DINT_R: tl.constexpr, PACK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        INT_OUT: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr, LUT: tl.constexpr,
        BLOCK_N: tl.constexpr, S: tl.constexpr, BLOCK_M: tl.constexpr = 16):
    HALF: tl.constexpr = PACK_K // 2
    TWO_ACC: tl.constexpr = BLOCK_M == 16  # one accumulator per nibble plane where they fit in the registers
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    offs_s = tl.arange(0, S)
    m_ok = offs_m < M
    n_ok = offs_n < N
    n_chunks = tl.cdiv(K, PACK_K)
    zb = tl.load(w_zero_ptr + offs_n, mask=n_ok, other=128)[None, None, :]
    w_tile = offs_n[None, None, :] * HALF + offs_j[None, :, None]  # [1, HALF, BLOCK_N] within a chunk
    if LUT:  # the rows' 16 values as four table words
        t0, t1, t2, t3 = lut_words(zb.to(tl.int32), DINT, DINT_R, 0)
    w_sum, w_scale, bias = channel_tables(w_sum_ptr, w_scale_ptr, bias_ptr, offs_n, n_ok, HAS_BIAS, INT_OUT)
    if PDL:  # launched as a programmatic dependent: the activation codes are read from here on
        gdc_wait()
    x_scale = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)  # before the loop too (channel_tables)
    x_zp = tl.load(x_zp_ptr + offs_m, mask=m_ok, other=0)

    # Rows past M are masked to zero and never stored. With TWO_ACC the two nibble planes sum into two accumulators
    # (a chain of 8 instead of 16 dependent mma per warp and chunk): H100, codes given, 1-3 % faster on all 12
    # (shape, M) cases (2026-12-06, bench_gemv_pieces.py --ksplit-pdl "codes given" vs "2acc",
    # examples/results/ksplit_pdl_h100.txt). Integer sums: same result either way.
    acc = tl.zeros([S, BLOCK_M, BLOCK_N], tl.int32)
    if TWO_ACC:
        acc_hi = tl.zeros([S, BLOCK_M, BLOCK_N], tl.int32)
    for it in range(tl.cdiv(n_chunks, S)):
        chunk = (it * S + offs_s)[:, None, None]  # [S, 1, 1]: warp s's chunk this step
        # Masks from full-shape index tensors (the interpreter mishandles 0-d comparisons). Chunks past the
        # last read nothing: their weights are 0 and so are their activations.
        w_mask = (chunk < n_chunks) & (offs_n[None, None, :] < N) & (offs_j[None, :, None] < HALF)
        b = tl.load(w_ptr + chunk * (N * HALF) + w_tile, mask=w_mask, other=0)
        if LUT:
            w_lo, w_hi = unpack_bytes_lut(b, t0, t1, t2, t3, DINT, DINT_R, zb, USE_ASM)  # nibble order
        else:
            w_lo, w_hi = unpack(b, zb, DINT, DINT_R, USE_ASM)  # [S, HALF, BLOCK_N] int8 each
        # Activation columns past K are zero: masked weight bytes (and a chunk's padding) unpack to -z, not 0.
        k_lo = chunk * PACK_K + offs_j[None, None, :]  # [S, 1, HALF]
        x_mask = (offs_m[None, :, None] < M) & (k_lo < K)
        x_ptrs = x_ptr + offs_m[None, :, None] * stride_xm + k_lo
        x_lo = tl.load(x_ptrs, mask=x_mask, other=0)
        x_hi = tl.load(x_ptrs + HALF, mask=x_mask & (k_lo + HALF < K), other=0)
        if LUT:
            x_lo, x_hi = interleave_planes(x_lo, x_hi, USE_ASM)  # the same order
        acc = tl.dot(x_lo, w_lo, acc, out_dtype=tl.int32)
        if TWO_ACC:
            acc_hi = tl.dot(x_hi, w_hi, acc_hi, out_dtype=tl.int32)
        else:
            acc = tl.dot(x_hi, w_hi, acc, out_dtype=tl.int32)
    if TWO_ACC:
        acc += acc_hi

    if PDL:  # the weights are read: the next kernel may launch (it waits for this one before reading y)
        gdc_launch_dependents()
    # Epilogue (the per-channel arithmetic of ``w4_gemm_kernel`` and the GEMV): zero-point correction, scales, bias.
    _gemv_store(tl.sum(acc, axis=0), offs_m, offs_n, m_ok[:, None] & n_ok[None, :], x_scale, x_zp, w_sum, w_scale,
                bias, y_ptr, stride_ym, HAS_BIAS, INT_OUT)
