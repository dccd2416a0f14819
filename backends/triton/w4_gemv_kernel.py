"""Decode GEMV (M <= 16): int8 activation codes x 4-bit packed weights on the integer ALUs (``dp4a``).

    y[m, n] = sx[m] * u[n] * ( sum_k xq[m, k] * t[n, k]  -  zx[m] * T[n] )        (per-channel weights)
                              `------ int32: dp4a on 32-bit words ------'

At a handful of tokens a linear is a weight stream: every weight byte is used M times. The tiled
kernel (``w4_gemm_kernel``) pads M to 16 for ``tl.dot`` and moves each unpacked weight tile through
shared memory into the MMA operand layout; here the unpacked weights never leave registers:

    qweight (packing.py), chunk c, rows n0..n0+BLOCK_N, read as 32-bit words:
      word w of row n = bytes 4w..4w+3 = codes k = 4w..4w+3 (low nibbles) and HALF+4w..HALF+4w+3 (high)
          |  unpack_words: ~10 integer instructions -> two words of four int8 values t
          v
      lo word  . x word (codes k = 4w..4w+3, the int8 activation row read as int32)        --dp4a--> acc
      hi word  . x word (codes k = HALF+4w..+3)                                            --dp4a--> acc

One program owns BLOCK_N output channels and the whole K (no split-K: BLOCK_N of 8-32 already gives
hundreds of programs at N = 4096), streams its weights BLOCK_W words per row per step with the next
step's tile already in flight (registers, double-buffered by hand; ``PREFETCH = 2``: the next two
tiles), and keeps an int32 accumulator per (row, channel, word lane) reduced once at the end: no
shuffles inside the K loop. At M = 1 every thread reads the activation words its weight words meet
(``X_DIRECT``: the same words for all BLOCK_N rows, from L1), so nothing changes layout inside the loop
(``gemv_occupancy.py --sass``). At M = 2-4 the same holds with one accumulator per row (``ROWS``, where
``DISPATCH.gemv_direct_rows`` sets X_DIRECT for them); else those rows share a broadcast accumulator. ``FUSE_QUANT``
quantizes the fp16/bf16 activation in the kernel, one launch instead of two: after its first weight loads,
every program reduces the rows' min / max (from L2), codes its own K slice into a codes buffer ``xq`` with one
reciprocal per row (``_common.act_quantize_rcp``, bitwise ``quantize_rows``'s codes), waits at a CTA barrier
and then streams exactly as on given codes (X_WORDS, X_DIRECT). Programs that share a K slice write the same
bytes. (Before, each step quantized its words inside the loop with an IEEE division per element, repeated
by every thread that holds the word.) Still slower than two launches on the H100 (2026-12-07, ``bench_gemv_pieces.py
--fused``: 8.3 vs 6.3 us at 4096x4096, M = 1; 14.4 vs 11.3 at 11008x4096): every one of the N / BLOCK_N programs
codes the whole row, so the dispatch times it (``gemv_fused``) and keeps the two launches.

``PIPELINE`` > 1 leaves the prefetch to the compiler: every step loads its own tile inside a
``tl.range(num_stages=PIPELINE)`` loop, which Triton's software pipeliner turns into cp.async copies through
shared memory, PIPELINE - 1 tiles ahead, with no registers held for them (the hand-made register buffer
above caps the bytes in flight; the launch option ``num_stages`` alone pipelines nothing here, offline
sm_90 compiles show no cp.async with it, only with the loop's own ``num_stages``).
Same arithmetic, bitwise the same outputs.

``PDL`` (programmatic dependent launch, Hopper): the launch may start while the previous kernel (the
activation quantization, which lets it go at its start) still runs; each program issues its first weight
loads and waits (``gdc_wait``) only before it reads the activation. Hides a launch and a kernel tail per
linear; same outputs.

``LUT`` swaps the arithmetic dINT unpacker for a table one (``_common._ASM_LUT``: 12 instead of 19
instructions per 8 codes); on the H200 both timed the same, so the dispatch leaves it off.

Per-channel weights with per-token int8 activations only (the decode case of W4A8); grouped weights and
W4A4 stay on ``w4_gemm_kernel``. File order (Triton tutorial): configs -> kernel (``w4_linear.py``
launches and dispatches).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._common import LUT_BIAS, dp4a, l2_prefetch, lut_words, prmt, recip_rn, stream_load, unpack_words, unpack_words_lut
from .quantize_kernel import _codes
from .w4_gemm_kernel import _row_qparams

__all__ = ["GEMV_CONFIGS", "GEMV_PIPELINED_CONFIGS", "GEMV_PREFETCH2_CONFIGS", "GEMV_SPLITK_CONFIGS",
           "accumulator_fits", "channel_tables", "even", "prune_gemv_configs", "stat_block", "w4_gemv_group_kernel",
           "w4_gemv_kernel"]


# ----------------------------------------------------------------------------------------------- configs
def _cfg(bn, bw, warps, split_k=1, pipeline=0, prefetch=1):
    return triton.Config({"BLOCK_N": bn, "BLOCK_W": bw, "SPLIT_K": split_k, "PIPELINE": pipeline,
                          "PREFETCH": prefetch}, num_warps=warps, num_stages=1)


# BLOCK_W words per row and step = BLOCK_W / 16 chunks of 128 codes. A step's weight tile is
# BLOCK_N * BLOCK_W * 4 bytes. PIPELINE = 0: the next tile is prefetched into registers (one in flight
# per program, next to the accumulator and the unpacked tile: ~120 registers at 8 KB tiles, so at most
# ~32 KB in flight per SM on every config). SPLIT_K > 1 cuts K into that many slices, one program each,
# summed in an int32 workspace (more programs, shorter streams). The autotuner sees these; on the H100
# at M = 1 the smallest tiles won (8 x 64 words, 2 warps: most programs per SM), so three smaller ones
# joined (``bench_gemv_pieces.py --pipeline`` prints the best of each list per shape).
GEMV_CONFIGS = [_cfg(bn, bw, warps) for bn, bw, warps in [
    (4, 256, 4), (8, 128, 4), (8, 256, 4), (16, 64, 4), (16, 128, 4), (16, 128, 8), (32, 64, 4), (32, 128, 8),
    (8, 64, 2), (16, 32, 4), (4, 128, 2), (8, 32, 2), (4, 64, 1),
]]
# PIPELINE = s > 1: the compiler pipelines the stream through shared memory (cp.async), s - 1 tiles in
# flight at ~50 registers: 2-5x the bytes in flight per SM (``examples/gemv_occupancy.py``, offline
# sm_90 compiles), yet on the H100 the best of these timed 0.79-1.02x the best register config at
# M = 1 and 4 and 0.40-0.59x at M = 16 (2026-12-05), so the autotuner does not see them (each one
# only lengthened a cold compile); kept, bitwise equal and tested, for the comparison on other GPUs.
GEMV_PIPELINED_CONFIGS = [_cfg(bn, bw, warps, pipeline=stages) for bn, bw, warps, stages in [
    (4, 256, 4, 4), (8, 256, 4, 3), (4, 512, 4, 3), (8, 128, 4, 6), (16, 128, 4, 4), (8, 64, 4, 6),
]]
# PREFETCH = 2: the register buffer holds the next two tiles (twice the bytes in flight of PREFETCH = 1 at
# the same tile, for 8 more registers per thread at 8 words). At N = 4096 the grid, not the registers, caps
# the programs per SM (512 programs of 8 rows), so only a deeper buffer adds bytes in flight there. On the
# H100 they timed 0.94-0.97x the one-tile configs on given codes on 7 of 8 shapes (``bench_gemv_pieces.py
# --direct``), but behind the quantization (PDL: both tiles load before the wait) the best of them won at M = 1
# on three of four shapes (``--pdl-configs``); the autotuner sees them while ``DISPATCH.gemv_prefetch2`` is on
# (the default).
GEMV_PREFETCH2_CONFIGS = [_cfg(bn, bw, warps, prefetch=2) for bn, bw, warps in [
    (8, 64, 2), (4, 64, 1), (4, 128, 2), (16, 64, 4),
]]
# Split-K only pays where K is long (down_proj, K = 11008: 18.5 us with 2 slices vs 19.9 unsplit on the
# H200 at M = 1); at K = 4096 every split timed slower (``bench_gemv_pieces.py --splitk``).
GEMV_SPLITK_CONFIGS = [_cfg(16, 128, 4, 2), _cfg(8, 128, 4, 2), _cfg(16, 128, 4, 4)]
SPLITK_MIN_K = 8192


def accumulator_fits(config, block_m: int) -> bool:
    """Whether ``config``'s int32 accumulator (BLOCK_M x BLOCK_N x BLOCK_W) stays within ~64 registers per
    thread: the configs the autotuner keeps at this BLOCK_M (``config`` a ``triton.Config``)."""
    return block_m * config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_W"] <= 64 * 32 * config.num_warps


def stat_block(k: int, block_m: int) -> int:
    """``STAT_BLOCK``: columns per step of the fused quantization's row min / max (``FUSE_QUANT``): the whole
    row up to 256-4096 columns, fewer as more rows share the registers."""
    return min(triton.next_power_of_2(k), max(256, 4096 // block_m))


def even(ns, k: int, pack_k: int, block_n: int, block_w: int, split_k: int) -> bool:
    """``EVEN``: every program's rows and steps lie inside its weight, so the K loop needs no mask: each N
    of ``ns`` a multiple of BLOCK_N, K a whole number of steps (BLOCK_W / (PACK_K / 8) chunks of PACK_K
    codes), one K slice."""
    chunks_per_step = block_w // (pack_k // 8)
    return (split_k == 1 and k % pack_k == 0 and (k // pack_k) % chunks_per_step == 0
            and all(n % block_n == 0 for n in ns))


def prune_gemv_configs(configs, named_args, **meta):
    """Keep the configs whose accumulator fits (``accumulator_fits``), split-K configs only for
    K >= SPLITK_MIN_K, and PREFETCH = 2 only for M <= 4."""
    bm = meta.get("BLOCK_M", named_args.get("BLOCK_M", 1))
    kept = [c for c in configs if accumulator_fits(c, bm) and (c.kwargs.get("PREFETCH", 1) == 1 or bm <= 4)
            and (c.kwargs.get("SPLIT_K", 1) == 1 or named_args.get("K", 0) >= SPLITK_MIN_K)]
    return kept or [c for c in configs if c.kwargs.get("SPLIT_K", 1) == 1][-1:]


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _x_words(x_ptr, offs_m, m_ok, k_base, stride_xm, K, X_WORDS: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_W: tl.constexpr):
    """Activation codes as int32 words ``[BLOCK_M, BLOCK_W]``: word j holds the signed int8 codes of
    columns ``k_base[j] + 0..3`` (byte b = column k_base[j] + b); zero outside [0, M) x [0, K)."""
    if X_WORDS:  # int8 codes with K % 4 == 0: the row is already a word array
        x32 = x_ptr.to(tl.pointer_type(tl.int32))
        mask = m_ok[:, None] & (k_base[None, :] < K)
        words = tl.load(x32 + offs_m[:, None] * (stride_xm // 4) + k_base[None, :] // 4, mask=mask, other=0)
    else:
        words = tl.zeros([BLOCK_M, BLOCK_W], tl.int32)
        for b in tl.static_range(4):
            k = k_base[None, :] + b
            mask = m_ok[:, None] & (k < K)
            q = tl.load(x_ptr + offs_m[:, None] * stride_xm + k, mask=mask, other=0).to(tl.int32)
            words = words | ((q & 255) << (8 * b))
    return words


@triton.jit
def _quantize_slice(x_ptr, stride_xm, xq_ptr, offs_m, m_ok, k_begin, k_end, K, x_scale, x_zpf,
                    X_QMAX: tl.constexpr, BLOCK_M: tl.constexpr, STAT_BLOCK: tl.constexpr):
    """FUSE_QUANT: signed int8 codes of columns [k_begin, k_end) of the rows into ``xq [M, K]`` (contiguous), with
    the rows' scale / zero-point: ``quantize_rows``'s own ``_codes`` with one reciprocal per row (``DIV_RCP``),
    so bitwise its codes."""
    rcp = recip_rn(x_scale)[:, None]
    cols = tl.arange(0, STAT_BLOCK)
    for k0 in range(k_begin, k_end, STAT_BLOCK):
        mask = m_ok[:, None] & (k0 + cols[None, :] < k_end)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + k0 + cols[None, :], mask=mask, other=0.0)
        q = _codes(xv.to(tl.float32), x_scale, x_zpf, rcp, X_QMAX, True)
        tl.store(xq_ptr + offs_m[:, None] * K + k0 + cols[None, :], q, mask=mask)


@triton.jit
def _tile(t, DIRECT: tl.constexpr):
    """A weight tile's ``[BLOCK_N, BLOCK_W]`` offsets, mask or per-row values as the loop holds them."""
    if DIRECT:
        t = t[None, :, :]
    return t


@triton.jit
def _w_tile(w32, i, w_off, step, n_ok, c_begin, c_end, chunk_of, n_steps, CH: tl.constexpr, DIRECT: tl.constexpr,
            EVEN: tl.constexpr, W_LOAD: tl.constexpr):
    """Weight words of step ``i`` (``[BLOCK_N, BLOCK_W]``, or ``[1, ...]`` when DIRECT). EVEN (every row and
    step of every program inside the weight): no mask; a prefetch past the last step re-reads the last one
    (an L1 / L2 hit, never used). Else masked, zero outside. ``W_LOAD``: the loads' cache hints
    (``stream_load``)."""
    if EVEN:
        words = stream_load(w32 + tl.minimum(i, n_steps - 1) * step + w_off, None, W_LOAD)
    else:
        ok = n_ok[:, None] & (c_begin + i * CH + chunk_of[None, :] < c_end)
        words = stream_load(w32 + i * step + w_off, _tile(ok, DIRECT), W_LOAD)
    return words


@triton.jit
def _gemv_block(
        pid_n, pid_k, x_ptr, x_scale_ptr, x_zp_ptr, stride_xm, xq_ptr,
        w_ptr, w_scale_ptr, w_sum_ptr, w_zero_ptr, bias_ptr, y_ptr, stride_ym, ws_ptr, cnt_ptr,
        M, N, K,
        DINT: tl.constexpr, DINT_R: tl.constexpr, PACK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        INT_OUT: tl.constexpr, USE_ASM: tl.constexpr, FUSE_QUANT: tl.constexpr, X_WORDS: tl.constexpr,
        LUT: tl.constexpr,
        X_QMAX: tl.constexpr, X_SYMMETRIC: tl.constexpr, X_RECIP_DIV: tl.constexpr, STAT_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
        PIPELINE: tl.constexpr, PDL: tl.constexpr, X_DIRECT: tl.constexpr, PREFETCH: tl.constexpr,
        EVEN: tl.constexpr, W_LOAD: tl.constexpr):
    """Output channels ``pid_n * BLOCK_N + [0, BLOCK_N)`` of one weight, all M rows, the ``pid_k``-th of
    ``SPLIT_K`` slices of K (whole steps of CH chunks; the whole K when SPLIT_K == 1)."""
    WPC: tl.constexpr = PACK_K // 8  # 32-bit code words per (chunk, row)
    # DIRECT (X_DIRECT, where it applies: M = 1, int8 words, arithmetic unpacker): weight tiles
    # [1, BLOCK_N, BLOCK_W] and activation words loaded straight into the accumulator's layout (see the
    # loop); else [BLOCK_N, BLOCK_W] and [BLOCK_M, BLOCK_W], broadcast. Not with PIPELINE > 1: the
    # pipeliner would stage those words through shared memory too, halving the programs per SM.
    # At BLOCK_M = 2 or 4 (X_DIRECT set for them: ``DISPATCH.gemv_direct_rows``) each row keeps its own
    # [1, BLOCK_N, BLOCK_W] accumulator (ROWS): the weight tile stays in the M = 1 layout, met by each row's
    # words in turn, instead of a [BLOCK_M, ...] accumulator the weights must be broadcast (converted) into.
    DIRECT: tl.constexpr = (X_DIRECT and PIPELINE <= 1) and ((X_WORDS and not LUT) and BLOCK_M <= 4)
    ROWS: tl.constexpr = DIRECT and BLOCK_M > 1
    CH: tl.constexpr = BLOCK_W // WPC  # chunks per step
    HALF: tl.constexpr = PACK_K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    jw = tl.arange(0, BLOCK_W)
    n_ok = offs_n < N
    m_ok = offs_m < M
    n_chunks = tl.cdiv(K, PACK_K)
    # this program's chunks [c_begin, c_end): slices are whole steps, so a step never straddles two
    # slices and only the last slice reaches past K (where the activation words are zero)
    per_split = tl.cdiv(tl.cdiv(n_chunks, SPLIT_K), CH) * CH
    c_begin = pid_k * per_split
    c_end = tl.minimum(c_begin + per_split, n_chunks)
    chunk_of = jw // WPC  # chunk (within the step) and word of each lane
    word_of = jw % WPC
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    w_off = _tile((c_begin + chunk_of[None, :]) * (N * WPC) + offs_n[:, None] * WPC + word_of[None, :], DIRECT)
    step = CH * N * WPC
    n_steps = tl.cdiv(c_end - c_begin, CH)
    zb = _tile(tl.load(w_zero_ptr + offs_n, mask=n_ok, other=128).to(tl.int32)[:, None], DIRECT)
    if LUT:
        t0, t1, t2, t3 = lut_words(zb, DINT, DINT_R)

    if PIPELINE <= 1:  # hand-made double buffer in registers: the first tile goes out before the activation
        # prologue (PIPELINE > 1: each step loads its own tile; the pipeliner keeps PIPELINE - 1 in flight)
        w_next = _w_tile(w32, 0, w_off, step, n_ok, c_begin, c_end, chunk_of, n_steps, CH, DIRECT, EVEN,
                         W_LOAD)
        if PREFETCH == 2:  # and the one after it
            w_next2 = _w_tile(w32, 1, w_off, step, n_ok, c_begin, c_end, chunk_of, n_steps, CH, DIRECT, EVEN,
                              W_LOAD)
    w_sum, w_scale, bias = channel_tables(w_sum_ptr, w_scale_ptr, bias_ptr, offs_n, n_ok, HAS_BIAS, INT_OUT)
    if PDL:  # launched as a programmatic dependent: everything above reads only the weights, which the
        # previous kernel does not write, so it overlaps that kernel's tail; its outputs are read from here on
        gdc_wait()
    if FUSE_QUANT:  # the rows' qparams, this slice's codes into xq; the loop then reads codes from there
        x_scale, x_zpf = _row_qparams(x_ptr, offs_m, stride_xm, M, K, X_QMAX, X_SYMMETRIC, X_RECIP_DIV,
                                      BLOCK_M, STAT_BLOCK)
        x_zp = x_zpf.to(tl.int32) - (X_QMAX + 1) // 2
        _quantize_slice(x_ptr, stride_xm, xq_ptr, offs_m, m_ok, c_begin * PACK_K, tl.minimum(c_end * PACK_K, K), K,
                        x_scale, x_zpf, X_QMAX, BLOCK_M, STAT_BLOCK)
        tl.debug_barrier()  # bar.sync: every thread's codes are visible to the whole program
        x_ptr = xq_ptr
        stride_xm = K
    else:
        x_scale = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)
        x_zp = tl.load(x_zp_ptr + offs_m, mask=m_ok, other=0)

    shape: tl.constexpr = [BLOCK_M, BLOCK_N, BLOCK_W]
    acc = tl.zeros(shape, tl.int32)
    row_shape: tl.constexpr = [1, BLOCK_N, BLOCK_W]  # ROWS: one accumulator per row (unused ones vanish)
    acc0 = tl.zeros(row_shape, tl.int32)
    acc1 = tl.zeros(row_shape, tl.int32)
    acc2 = tl.zeros(row_shape, tl.int32)
    acc3 = tl.zeros(row_shape, tl.int32)
    x_sum = tl.zeros([BLOCK_M, BLOCK_W], tl.int32)  # LUT: sum_k x_k, for the table's +64 bias
    for it in tl.range(n_steps, num_stages=PIPELINE if PIPELINE > 1 else 1):
        c0 = c_begin + it * CH
        if PIPELINE > 1:
            w_cur = _w_tile(w32, it, w_off, step, n_ok, c_begin, c_end, chunk_of, n_steps, CH, DIRECT, EVEN,
                            W_LOAD)
        else:
            w_cur = w_next
            if PREFETCH == 2:
                w_next = w_next2
                w_next2 = _w_tile(w32, it + 2, w_off, step, n_ok, c_begin, c_end, chunk_of, n_steps, CH, DIRECT,
                                  EVEN, W_LOAD)
            else:
                w_next = _w_tile(w32, it + 1, w_off, step, n_ok, c_begin, c_end, chunk_of, n_steps, CH, DIRECT,
                                 EVEN, W_LOAD)
        # Codes past K unpack to -z, not 0: the activation words are zero there.
        if ROWS:
            pass  # each row reads its own words (_direct_row, below)
        elif DIRECT:
            # Every thread reads the activation words of its own weight words (the BLOCK_N threads of a word
            # lane read the same ones, from L1): a broadcast [BLOCK_M, 1, BLOCK_W] would be a layout change
            # through shared memory, two barriers per vector of words (offline sm_90 SASS at M = 1: 26 -> 24
            # instructions per weight word, 8 -> 0 barriers per step, Triton 3.6 and 3.9; at M = 4 Triton 3.6
            # still converts a tile, and at M = 16 the broadcast costs fewer instructions, so only M = 1)
            x_word = (c0 + chunk_of) * (PACK_K // 4) + word_of  # the low half's word; the high half's: + HALF / 4
            x_off = (offs_m[:, None, None] * (stride_xm // 4) + tl.zeros([1, BLOCK_N, 1], tl.int32)
                     + x_word[None, None, :])
            x32 = x_ptr.to(tl.pointer_type(tl.int32))
            if EVEN:  # every step inside K, and the one row is there
                x_lo = tl.load(x32 + x_off)
                x_hi = tl.load(x32 + x_off + HALF // 4)
            else:
                x_lo = tl.load(x32 + x_off, mask=m_ok[:, None, None] & (x_word < K // 4)[None, None, :], other=0)
                x_hi = tl.load(x32 + x_off + HALF // 4, other=0,
                               mask=m_ok[:, None, None] & (x_word + HALF // 4 < K // 4)[None, None, :])
        else:
            k_base = (c0 + chunk_of) * PACK_K + word_of * 4
            x_lo = _x_words(x_ptr, offs_m, m_ok, k_base, stride_xm, K, X_WORDS, BLOCK_M, BLOCK_W)
            x_hi = _x_words(x_ptr, offs_m, m_ok, k_base + HALF, stride_xm, K, X_WORDS, BLOCK_M, BLOCK_W)
        if LUT:  # biased values in the nibble order; activations permuted to match (_common._ASM_LUT)
            v0, v1 = unpack_words_lut(w_cur, t0, t1, t2, t3, USE_ASM)
            x_a = prmt(x_lo, x_hi, tl.full(x_lo.shape, 0x5140, tl.int32), USE_ASM)
            x_b = prmt(x_lo, x_hi, tl.full(x_lo.shape, 0x7362, tl.int32), USE_ASM)
            acc = dp4a(tl.broadcast_to(v0[None, :, :], shape), tl.broadcast_to(x_a[:, None, :], shape), acc,
                       USE_ASM, True)
            acc = dp4a(tl.broadcast_to(v1[None, :, :], shape), tl.broadcast_to(x_b[:, None, :], shape), acc,
                       USE_ASM, True)
            ones = tl.full(x_lo.shape, 0x01010101, tl.int32)
            x_sum = dp4a(x_hi, ones, dp4a(x_lo, ones, x_sum, USE_ASM), USE_ASM)
        elif ROWS:
            lo, hi = unpack_words(w_cur, zb, DINT, DINT_R, USE_ASM)
            x32 = x_ptr.to(tl.pointer_type(tl.int32))
            x_word = (c0 + chunk_of) * (PACK_K // 4) + word_of
            acc0 = _direct_row(acc0, lo, hi, x32, 0, M, stride_xm, x_word, K, BLOCK_N, HALF, EVEN, USE_ASM)
            acc1 = _direct_row(acc1, lo, hi, x32, 1, M, stride_xm, x_word, K, BLOCK_N, HALF, EVEN, USE_ASM)
            if BLOCK_M > 2:
                acc2 = _direct_row(acc2, lo, hi, x32, 2, M, stride_xm, x_word, K, BLOCK_N, HALF, EVEN, USE_ASM)
                acc3 = _direct_row(acc3, lo, hi, x32, 3, M, stride_xm, x_word, K, BLOCK_N, HALF, EVEN, USE_ASM)
        else:
            lo, hi = unpack_words(w_cur, zb, DINT, DINT_R, USE_ASM)
            if not DIRECT:
                lo, hi = lo[None, :, :], hi[None, :, :]
                x_lo, x_hi = x_lo[:, None, :], x_hi[:, None, :]
            acc = dp4a(tl.broadcast_to(lo, shape), tl.broadcast_to(x_lo, shape), acc, USE_ASM)
            acc = dp4a(tl.broadcast_to(hi, shape), tl.broadcast_to(x_hi, shape), acc, USE_ASM)

    if PDL:  # the weights are read: the next kernel, if launched as a programmatic dependent (an Inductor
        # kernel with its ``triton.enable_pdl``), may start its launch; it waits for this one before reading y
        gdc_launch_dependents()
    # Epilogue: one reduction over the word lanes (split-K: summed across the slices in int32, exactly),
    # zero-point correction, scales, bias.
    if ROWS:  # [BLOCK_M, BLOCK_N] from the rows' sums
        total = tl.where(offs_m[:, None] == 0, tl.sum(acc0, axis=2), 0)
        total += tl.where(offs_m[:, None] == 1, tl.sum(acc1, axis=2), 0)
        if BLOCK_M > 2:
            total += tl.where(offs_m[:, None] == 2, tl.sum(acc2, axis=2), 0)
            total += tl.where(offs_m[:, None] == 3, tl.sum(acc3, axis=2), 0)
    else:
        total = tl.sum(acc, axis=2)
    if LUT:
        total -= LUT_BIAS * tl.sum(x_sum, axis=1)[:, None]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        _gemv_store(total, offs_m, offs_n, y_mask, x_scale, x_zp, w_sum, w_scale, bias, y_ptr, stride_ym,
                    HAS_BIAS, INT_OUT)
    else:
        # Every slice adds its int32 partial sums into the workspace, then takes a ticket; the slice that
        # draws the last one reads the complete sums, zeroing the workspace and the counter as it goes
        # (ready for the next call: no memset launch). Integer adds commute: the result does not depend
        # on the order the slices finish in.
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, total, mask=y_mask, sem="release")
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            total = tl.atomic_xchg(ws_ptrs, tl.zeros_like(total), mask=y_mask, sem="acquire")
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
            _gemv_store(total, offs_m, offs_n, y_mask, x_scale, x_zp, w_sum, w_scale, bias, y_ptr, stride_ym,
                        HAS_BIAS, INT_OUT)


@triton.jit
def _direct_row(acc, lo, hi, x32, r: tl.constexpr, M, stride_xm, x_word, K, BLOCK_N: tl.constexpr,
                HALF: tl.constexpr, EVEN: tl.constexpr, USE_ASM: tl.constexpr):
    """ROWS: row ``r``'s activation words read into the weight tile's ``[1, BLOCK_N, BLOCK_W]`` layout (as at
    M = 1) and dotted with the unpacked words ``lo`` / ``hi``. A row past M re-reads row M - 1 (in bounds;
    its sums are never stored)."""
    row = tl.minimum(r, M - 1)
    x_off = row * (stride_xm // 4) + tl.zeros([1, BLOCK_N, 1], tl.int32) + x_word[None, None, :]
    if EVEN:  # every step inside K
        x_lo = tl.load(x32 + x_off)
        x_hi = tl.load(x32 + x_off + HALF // 4)
    else:
        x_lo = tl.load(x32 + x_off, mask=(x_word < K // 4)[None, None, :], other=0)
        x_hi = tl.load(x32 + x_off + HALF // 4, mask=(x_word + HALF // 4 < K // 4)[None, None, :], other=0)
    acc = dp4a(lo, x_lo, acc, USE_ASM)
    return dp4a(hi, x_hi, acc, USE_ASM)


@triton.jit
def channel_tables(w_sum_ptr, w_scale_ptr, bias_ptr, offs_n, n_ok, HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr):
    """The channels' weight sums T, scales u and bias (``[BLOCK_N]``; zeros where unused), loaded at the program's
    start. Read in the epilogue, these cold tables were one more memory round trip after the weight stream in every
    program's tail (offline sm_90 SASS of the k-split kernel: two, between barriers); here their latency hides
    behind the stream. Same values, so the same outputs."""
    w_sum = tl.load(w_sum_ptr + offs_n, mask=n_ok, other=0)
    w_scale = tl.zeros_like(offs_n).to(tl.float32)
    bias = tl.zeros_like(offs_n).to(tl.float32)
    if not INT_OUT:
        w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    return w_sum, w_scale, bias


@triton.jit
def _gemv_store(total, offs_m, offs_n, y_mask, x_scale, x_zp, w_sum, w_scale, bias, y_ptr, stride_ym,
                HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr):
    """``y = sx u (total - zx T) (+ b)`` for a ``[BLOCK_M, BLOCK_N]`` tile of int32 sums (the tables from
    ``channel_tables``)."""
    corr = total - x_zp[:, None] * w_sum[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if INT_OUT:
        tl.store(y_ptrs, corr, mask=y_mask)
    else:
        y = corr.to(tl.float32) * (x_scale[:, None] * w_scale[None, :])
        if HAS_BIAS:
            y += bias[None, :]
        tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=y_mask)


@triton.jit
def _prefetch_next(pf0_ptr, pf0_bytes, pf1_ptr, pf1_bytes, pf2_ptr, pf2_bytes, L2_NEXT: tl.constexpr):
    """This program's share of the L2 prefetch of the next kernel's weights (``L2_NEXT`` regions; the
    launch's programs split each region evenly)."""
    if L2_NEXT > 0:
        part = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
        parts = tl.num_programs(0) * tl.num_programs(1)
        l2_prefetch(pf0_ptr, pf0_bytes, part, parts)
        if L2_NEXT > 1:
            l2_prefetch(pf1_ptr, pf1_bytes, part, parts)
        if L2_NEXT > 2:
            l2_prefetch(pf2_ptr, pf2_bytes, part, parts)


@triton.jit(do_not_specialize=["M"])
def w4_gemv_kernel(
        # activations: int8 codes [M, K] (fp16/bf16/fp32 values if FUSE_QUANT); per-token qparams [M, 1];
        # FUSE_QUANT: int8 [M, K] for the codes (else never read)
        x_ptr, x_scale_ptr, x_zp_ptr, stride_xm, xq_ptr,
        # weights: codes [C, N, PACK_K // 2] uint8; tables [1, N]
        w_ptr, w_scale_ptr, w_sum_ptr, w_zero_ptr,
        bias_ptr, y_ptr, stride_ym,
        # split-K: int32 workspace [>= M * N] and tickets [>= cdiv(N, BLOCK_N)], zero between calls
        ws_ptr, cnt_ptr,
        # L2_NEXT regions of the next kernel's weights to prefetch into L2 (unused ones never read)
        pf0_ptr, pf0_bytes, pf1_ptr, pf1_bytes, pf2_ptr, pf2_bytes,
        M, N, K,
        DINT: tl.constexpr, DINT_R: tl.constexpr, PACK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        INT_OUT: tl.constexpr, USE_ASM: tl.constexpr, FUSE_QUANT: tl.constexpr, X_WORDS: tl.constexpr,
        LUT: tl.constexpr,
        X_QMAX: tl.constexpr, X_SYMMETRIC: tl.constexpr, X_RECIP_DIV: tl.constexpr, STAT_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
        PIPELINE: tl.constexpr, PDL: tl.constexpr, X_DIRECT: tl.constexpr, PREFETCH: tl.constexpr,
        EVEN: tl.constexpr, L2_NEXT: tl.constexpr = 0, L2_EARLY: tl.constexpr = False, W_LOAD: tl.constexpr = 0):
    if L2_EARLY:
        _prefetch_next(pf0_ptr, pf0_bytes, pf1_ptr, pf1_bytes, pf2_ptr, pf2_bytes, L2_NEXT)
    _gemv_block(tl.program_id(0), tl.program_id(1), x_ptr, x_scale_ptr, x_zp_ptr, stride_xm, xq_ptr, w_ptr,
                w_scale_ptr, w_sum_ptr, w_zero_ptr, bias_ptr, y_ptr, stride_ym, ws_ptr, cnt_ptr, M, N, K, DINT, DINT_R,
                PACK_K, HAS_BIAS, INT_OUT, USE_ASM, FUSE_QUANT, X_WORDS, LUT, X_QMAX, X_SYMMETRIC, X_RECIP_DIV,
                STAT_BLOCK, BLOCK_M, BLOCK_N, BLOCK_W, SPLIT_K, PIPELINE, PDL, X_DIRECT, PREFETCH, EVEN, W_LOAD)
    if not L2_EARLY:
        _prefetch_next(pf0_ptr, pf0_bytes, pf1_ptr, pf1_bytes, pf2_ptr, pf2_bytes, L2_NEXT)


@triton.jit(do_not_specialize=["M"])
def w4_gemv_group_kernel(
        x_ptr, x_scale_ptr, x_zp_ptr, stride_xm, xq_ptr,
        # G = 2 or 3 weights of one input (q/k/v, gate/up), each with its own tables, bias and output;
        # weight 2's arguments are weight 1's again when G == 2 (never read)
        w0_ptr, s0_ptr, t0_ptr, z0_ptr, b0_ptr, y0_ptr, stride_y0, N0,
        w1_ptr, s1_ptr, t1_ptr, z1_ptr, b1_ptr, y1_ptr, stride_y1, N1,
        w2_ptr, s2_ptr, t2_ptr, z2_ptr, b2_ptr, y2_ptr, stride_y2, N2,
        ws_ptr, cnt_ptr,  # split-K workspace and tickets, weight g's after weight g-1's (16 N and nb each)
        pf0_ptr, pf0_bytes, pf1_ptr, pf1_bytes, pf2_ptr, pf2_bytes,  # as w4_gemv_kernel's
        M, K, G: tl.constexpr,
        DINT: tl.constexpr, DINT_R: tl.constexpr, PACK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        INT_OUT: tl.constexpr, USE_ASM: tl.constexpr, FUSE_QUANT: tl.constexpr, X_WORDS: tl.constexpr,
        LUT: tl.constexpr,
        X_QMAX: tl.constexpr, X_SYMMETRIC: tl.constexpr, X_RECIP_DIV: tl.constexpr, STAT_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
        PIPELINE: tl.constexpr, PDL: tl.constexpr, X_DIRECT: tl.constexpr, PREFETCH: tl.constexpr,
        EVEN: tl.constexpr, L2_NEXT: tl.constexpr = 0, L2_EARLY: tl.constexpr = False, W_LOAD: tl.constexpr = 0):
    """One launch for sibling linears: programs [0, nb0) take weight 0, the next nb1 weight 1, the rest
    weight 2 (nb = cdiv(N, BLOCK_N)). Each program is exactly a ``w4_gemv_kernel`` program."""
    if L2_EARLY:
        _prefetch_next(pf0_ptr, pf0_bytes, pf1_ptr, pf1_bytes, pf2_ptr, pf2_bytes, L2_NEXT)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    nb0 = tl.cdiv(N0, BLOCK_N)
    nb1 = tl.cdiv(N1, BLOCK_N)
    if pid < nb0:
        _gemv_block(pid, pid_k, x_ptr, x_scale_ptr, x_zp_ptr, stride_xm, xq_ptr, w0_ptr, s0_ptr, t0_ptr, z0_ptr,
                    b0_ptr, y0_ptr, stride_y0, ws_ptr, cnt_ptr, M, N0, K, DINT, DINT_R, PACK_K, HAS_BIAS, INT_OUT,
                    USE_ASM, FUSE_QUANT, X_WORDS, LUT, X_QMAX, X_SYMMETRIC, X_RECIP_DIV, STAT_BLOCK, BLOCK_M,
                    BLOCK_N, BLOCK_W, SPLIT_K, PIPELINE, PDL, X_DIRECT, PREFETCH, EVEN, W_LOAD)
    elif pid < nb0 + nb1:  # the grid has nb0 + nb1 programs when G == 2
        _gemv_block(pid - nb0, pid_k, x_ptr, x_scale_ptr, x_zp_ptr, stride_xm, xq_ptr, w1_ptr, s1_ptr, t1_ptr,
                    z1_ptr, b1_ptr, y1_ptr, stride_y1, ws_ptr + 16 * N0, cnt_ptr + nb0, M, N1, K, DINT, DINT_R, PACK_K,
                    HAS_BIAS, INT_OUT, USE_ASM, FUSE_QUANT, X_WORDS, LUT, X_QMAX, X_SYMMETRIC, X_RECIP_DIV,
                    STAT_BLOCK, BLOCK_M, BLOCK_N, BLOCK_W, SPLIT_K, PIPELINE, PDL, X_DIRECT, PREFETCH, EVEN, W_LOAD)
    elif G == 3:
        _gemv_block(pid - nb0 - nb1, pid_k, x_ptr, x_scale_ptr, x_zp_ptr, stride_xm, xq_ptr, w2_ptr, s2_ptr,
                    t2_ptr, z2_ptr, b2_ptr, y2_ptr, stride_y2, ws_ptr + 16 * (N0 + N1), cnt_ptr + nb0 + nb1, M, N2, K,
                    DINT, DINT_R, PACK_K, HAS_BIAS, INT_OUT, USE_ASM, FUSE_QUANT, X_WORDS, LUT, X_QMAX,
                    X_SYMMETRIC, X_RECIP_DIV, STAT_BLOCK, BLOCK_M, BLOCK_N, BLOCK_W, SPLIT_K, PIPELINE, PDL, X_DIRECT,
                    PREFETCH, EVEN, W_LOAD)
    if not L2_EARLY:
        _prefetch_next(pf0_ptr, pf0_bytes, pf1_ptr, pf1_bytes, pf2_ptr, pf2_bytes, L2_NEXT)
