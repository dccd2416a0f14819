"""Triton device helpers shared by the kernels.

* ``act_qparams`` / ``act_quantize``: ``qcompile.formats`` INT quantization op for op in fp32 —
  IEEE division (``tl.math.div_rn``; Triton's ``/`` is the approximate ``div.full.f32``) and
  round-half-to-even (``torch.round``) — so codes are bit-exact with the reference.
* ``unpack_pure`` / ``unpack_asm``: 4-bit code bytes -> two int8 planes of integer weight values ``t``
  (see ``packing.py``). ``unpack_pure`` is plain ``tl`` ops (runs under ``TRITON_INTERPRET=1``);
  ``unpack_asm`` does the same maths on four bytes per 32-bit register with PTX (SIMD within a
  register: ~2 instructions per code for dINT, ~1 for INT, vs ~6 element-wise), which matters
  because at M = 1 the kernel must unpack ~6e12 codes/s to keep up with HBM.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "act_qparams",
    "act_quantize",
    "act_quantize_rcp",
    "div_rn_shared",
    "dp4a",
    "l2_prefetch",
    "lut_words",
    "prmt",
    "recip_div",
    "recip_rn",
    "stream_key",
    "stream_load",
    "unpack",
    "unpack_asm",
    "unpack_pure",
    "unpack_words",
    "unpack_words_lut",
]


@triton.jit
def _round_half_even(v):
    # fp32 (v + 1.5*2^23) - 1.5*2^23 rounds |v| < 2^22 to an integer, ties to even (= torch.round).
    # Here |v| <= QMAX by construction (|x| <= (hi - lo) = QMAX * scale up to rounding).
    return (v + 12582912.0) - 12582912.0


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pdl_launch(pdl: bool, device) -> bool:
    """Whether a launch asked for programmatic dependent launch (``pdl``) gets it: on CUDA, compiled
    kernels only (the interpreter has no grid dependencies)."""
    return bool(pdl) and device.type == "cuda" and not interpreting()


def stream_key(device) -> tuple:
    """``(device, stream)`` for scratch buffers that a kernel fills and leaves zero again (split-K partial
    sums, tickets): launches on one stream run in order and can share them, launches on two streams may
    overlap and must not. On CUDA the stream is the current one (under CUDA graph capture, the capture
    stream); elsewhere 0."""
    device = torch.device(device)
    if device.type == "cuda":
        return str(device), torch.cuda.current_stream(device).cuda_stream
    return str(device), 0


def recip_div(device) -> bool:
    """Whether torch divides a tensor by a Python number as a multiplication by the fp32 reciprocal on
    ``device``: it does on CUDA (``div_true_kernel_cuda``, "may lose one bit of precision"), not on CPU.
    ``formats.choose_qparams`` computes ``range / p`` that way, so the kernels follow the device."""
    return torch.device(device).type == "cuda"


@triton.jit
def _div_by_int(v, N: tl.constexpr, RECIP_DIV: tl.constexpr):
    """``v / N`` as torch computes ``tensor / N`` on the device (see ``recip_div``)."""
    if RECIP_DIV:
        # 1/N rounds to the same fp32 through double (no fp32 midpoint in 1/255, 1/127, 1/15, 1/7)
        q = v * (1.0 / N)
    else:
        q = tl.math.div_rn(v, tl.full(v.shape, N, tl.float32))
    return q


@triton.jit
def act_qparams(lo, hi, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, RECIP_DIV: tl.constexpr):
    """``formats.choose_qparams`` for INT-b (QMAX = 2^b - 1) from ``lo = min(x, 0)``, ``hi = max(x, 0)``.

    Returns fp32 ``(scale, zero_point)``; the zero-point is integer-valued (unsigned convention).
    """
    if SYMMETRIC:
        amax = tl.maximum(-lo, hi)
        scale = tl.maximum(_div_by_int(amax, QMAX // 2, RECIP_DIV), 1e-8)
        zp = tl.full(amax.shape, (QMAX + 1) // 2, tl.float32)
    else:
        span = hi - lo
        scale = tl.maximum(_div_by_int(span, QMAX, RECIP_DIV), 1e-8)
        zp = _round_half_even(tl.math.div_rn(-lo, scale))
        zp = tl.minimum(tl.maximum(zp, 0.0), QMAX * 1.0)
    return scale, zp


@triton.jit
def recip_rn(d):
    """``RN(1 / d)``, IEEE division: the reciprocal ``div_rn_shared`` takes, once per divisor."""
    return tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d)


@triton.jit
def div_rn_shared(x, d, r):
    """``RN(x / d)``, the IEEE quotient ``tl.math.div_rn`` gives, for a divisor ``d`` shared by many ``x`` (``d``
    of shape ``[R, 1]`` or a scalar, broadcast over ``x``) whose reciprocal ``r = recip_rn(d)`` is computed once: per
    element ``q = RN(x r)`` and two FMA corrections ``q <- RN(q + RN(x - q d) r)`` (1 multiply and 4 FMAs instead
    of div.rn's reciprocal, refinement, range check and slow-path branch).

    Why it is exact (Markstein's theorem): if ``r`` is the correctly rounded ``1 / d`` and ``q`` is within one ulp
    of ``x / d``, then ``x - q d`` is exact in an FMA and ``RN(q + (x - q d) r) = RN(x / d)``. ``RN(x r)`` is
    within 1.5 ulp, so the first correction brings it within half an ulp plus 2^-23 of one (faithful) and the
    second is the theorem's. It assumes no overflow or underflow in the remainders: here ``|x / d| <= ~2^8``
    and ``d >= 1e-8``, so only ``|x| < ~2^-100`` could underflow, where both quotients round to code 0.
    Checked against numpy's float32 division on 6e7 pairs, ties and all-ones-mantissa divisors included, and in
    ``test_div_rn_shared_is_ieee_division`` (interpreter and H100)."""
    q = x * r
    q = tl.fma(tl.fma(-q, d, x), r, q)
    return tl.fma(tl.fma(-q, d, x), r, q)


@triton.jit
def act_quantize_rcp(x, scale, rcp, zp, QMAX: tl.constexpr):
    """``act_quantize`` with the quotient from ``div_rn_shared`` (``rcp = recip_rn(scale)``, once per row): bitwise the
    same codes. Used where it measured faster: ``quantize_rows`` with the row in registers or split over programs
    (H100, 2026-12-06: decode rows 0.04-0.20 us less, 1024 x 4096 7.4 -> 6.2 us, 4096 x 4096 21.1 -> 19.7 us); its
    two-pass loop over long prefill rows keeps ``div_rn`` (there it measured slower: 4096 x 11008 66.2 -> 68.0 us,
    4096 x 14336 80.2 -> 86.3 us)."""
    return _code(div_rn_shared(x, scale, rcp), zp, QMAX)


@triton.jit
def act_quantize(x, scale, zp, QMAX: tl.constexpr):
    """``clamp(round(x / scale) + zp, 0, QMAX)`` in fp32 -> int32 (``formats.quantize_with_qparams``)."""
    return _code(tl.math.div_rn(x, scale), zp, QMAX)


@triton.jit
def _code(quotient, zp, QMAX: tl.constexpr):
    """``clamp(round(quotient) + zp, 0, QMAX)`` -> int32, the rest of both quantizers."""
    v = _round_half_even(quotient) + zp
    return tl.minimum(tl.maximum(v, 0.0), QMAX * 1.0).to(tl.int32)


@triton.jit
def unpack_pure(b, zb, DINT: tl.constexpr, DINT_R: tl.constexpr):
    """Bytes ``b`` (uint8) with biased zeros ``zb = 128 - R*z`` -> int8 ``(t_low_nibble, t_high_nibble)``.

    INT: ``t = q - z``. dINT: ``t = R*(q - z)`` for ``q < 14``; ``29 - 2q`` = +1 / -1 for q = 14 / 15.
    """
    b32 = b.to(tl.int32)
    zoff = zb.to(tl.int32) - 128
    q_lo = b32 & 15
    q_hi = b32 >> 4
    if DINT:
        t_lo = tl.where(q_lo < 14, q_lo * DINT_R + zoff, 29 - 2 * q_lo)
        t_hi = tl.where(q_hi < 14, q_hi * DINT_R + zoff, 29 - 2 * q_hi)
    else:
        t_lo = q_lo + zoff
        t_hi = q_hi + zoff
    return t_lo.to(tl.int8), t_hi.to(tl.int8)


# PTX on 4 bytes at once ($2 = code bytes, $3 = 4 copies of zb; $0/$1 = low/high nibble planes).
# Every step keeps each byte in [0, 255] so no carry or borrow crosses bytes:
#   INT : g = q + zb = 128 + (q - z) in [113, 143];  t = g ^ 0x80.
#   dINT: g = R*q + zb = 128 + R(q - z) <= 120 + 128; special mask m = sign(q + 0x72) (q >= 14),
#         spread to 0xFF/0x00 by prmt's sign-replicate mode; special s = 0x81 - 2(q & 1) (biased
#         +1 / -1); r = m ? s : g (lop3 0xCA); t = r ^ 0x80.
_INT4_PLANE = """
    and.b32 q, {src}, 0x0F0F0F0F;
    add.u32 g, q, $3;
    xor.b32 {dst}, g, 0x80808080;"""
_DINT4_PLANE = """
    and.b32 q, {src}, 0x0F0F0F0F;
    mad.lo.u32 g, q, {r}, $3;
    add.u32 m, q, 0x72727272;
    prmt.b32 m, m, m, 0xBA98;
    and.b32 s, q, 0x01010101;
    shl.b32 s, s, 1;
    sub.u32 s, c81, s;
    lop3.b32 g, m, s, g, 0xCA;
    xor.b32 {dst}, g, 0x80808080;"""


def _asm(plane: str, **kw) -> str:
    body = plane.format(src="$2", dst="$0", **kw) + "\n    shr.u32 h, $2, 4;" + plane.format(
        src="h", dst="$1", **kw)
    return "{\n    .reg .b32 q, g, m, s, h, c81;\n    mov.b32 c81, 0x81818181;" + body + "\n}"


_ASM_INT4 = tl.constexpr(_asm(_INT4_PLANE))
_ASM_DINT4_R2 = tl.constexpr(_asm(_DINT4_PLANE, r=2))
_ASM_DINT4_R4 = tl.constexpr(_asm(_DINT4_PLANE, r=4))
_ASM_DINT4_R8 = tl.constexpr(_asm(_DINT4_PLANE, r=8))


@triton.jit
def _asm_planes(b, zb, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,r,r", args=[b, zb],
                                     dtype=(tl.int8, tl.int8), is_pure=True, pack=4)


@triton.jit
def unpack_asm(b, zb, DINT: tl.constexpr, DINT_R: tl.constexpr):
    """Same result as ``unpack_pure``, four codes per instruction sequence (GPU only)."""
    zb = tl.broadcast_to(zb, b.shape)
    if DINT:
        if DINT_R == 2:
            lo, hi = _asm_planes(b, zb, _ASM_DINT4_R2)
        elif DINT_R == 4:
            lo, hi = _asm_planes(b, zb, _ASM_DINT4_R4)
        else:
            lo, hi = _asm_planes(b, zb, _ASM_DINT4_R8)
    else:
        lo, hi = _asm_planes(b, zb, _ASM_INT4)
    return lo, hi


@triton.jit
def unpack(b, zb, DINT: tl.constexpr, DINT_R: tl.constexpr, USE_ASM: tl.constexpr):
    """Dispatch to ``unpack_asm`` (GPU) or ``unpack_pure``."""
    if USE_ASM:
        lo, hi = unpack_asm(b, zb, DINT, DINT_R)
    else:
        lo, hi = unpack_pure(b, zb, DINT, DINT_R)
    return lo, hi


# ------------------------------------------------------------------------- 32-bit words (the GEMV kernel)
# A code word holds bytes 4w..4w+3 of a chunk row: its low nibbles are codes k = 4w..4w+3 of the chunk's
# first half, its high nibbles the same k of the second half. Unpacked, each plane is a word of four
# int8 values ``t`` in k order, so ``dp4a`` against the activation codes viewed as int32 words needs
# no shuffling at all.
@triton.jit
def _asm_words(w, zb4, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,r,r", args=[w, zb4],
                                     dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _unpack_words_pure(w, zb, DINT: tl.constexpr, DINT_R: tl.constexpr):
    zoff = zb - 128
    lo = tl.zeros_like(w)
    hi = tl.zeros_like(w)
    for j in tl.static_range(4):
        byte = (w >> (8 * j)) & 255
        q_lo = byte & 15
        q_hi = byte >> 4
        if DINT:
            t_lo = tl.where(q_lo < 14, q_lo * DINT_R + zoff, 29 - 2 * q_lo)
            t_hi = tl.where(q_hi < 14, q_hi * DINT_R + zoff, 29 - 2 * q_hi)
        else:
            t_lo = q_lo + zoff
            t_hi = q_hi + zoff
        lo = lo | ((t_lo & 255) << (8 * j))
        hi = hi | ((t_hi & 255) << (8 * j))
    return lo, hi


@triton.jit
def unpack_words(w, zb, DINT: tl.constexpr, DINT_R: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 code words ``w`` with per-row biased zeros ``zb`` (int32, ``128 - R*z``, broadcastable) ->
    ``(lo, hi)`` int32 words of four int8 weight values each (same maths as ``unpack_pure``)."""
    zb = tl.broadcast_to(zb, w.shape)
    if USE_ASM:
        zb4 = zb | (zb << 8) | (zb << 16) | (zb << 24)
        if DINT:
            if DINT_R == 2:
                lo, hi = _asm_words(w, zb4, _ASM_DINT4_R2)
            elif DINT_R == 4:
                lo, hi = _asm_words(w, zb4, _ASM_DINT4_R4)
            else:
                lo, hi = _asm_words(w, zb4, _ASM_DINT4_R8)
        else:
            lo, hi = _asm_words(w, zb4, _ASM_INT4)
    else:
        lo, hi = _unpack_words_pure(w, zb, DINT, DINT_R)
    return lo, hi


@triton.jit
def dp4a(a, b, c, USE_ASM: tl.constexpr, A_UNSIGNED: tl.constexpr = False):
    """``c + sum_j a_j * b_j`` over the four bytes of int32 words ``a``, ``b`` (PTX ``dp4a``): signed bytes,
    or unsigned ones in ``a`` with ``A_UNSIGNED``."""
    if USE_ASM:
        if A_UNSIGNED:
            out = tl.inline_asm_elementwise(asm="dp4a.u32.s32 $0, $1, $2, $3;", constraints="=r,r,r,r",
                                            args=[a, b, c], dtype=tl.int32, is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise(asm="dp4a.s32.s32 $0, $1, $2, $3;", constraints="=r,r,r,r",
                                            args=[a, b, c], dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = c
        for j in tl.static_range(4):
            if A_UNSIGNED:
                a_j = (a >> (8 * j)) & 255
            else:
                a_j = (a << (24 - 8 * j)) >> 24
            out += a_j * ((b << (24 - 8 * j)) >> 24)
    return out


# One bulk L2 prefetch (Hopper, PTX ISA 8.0) from thread 0 of the program, only if the size is not 0:
# $1 address (16-byte aligned), $2 bytes (a multiple of 16). Nothing waits on it: a hint to the memory system.
_ASM_L2_PREFETCH = tl.constexpr("""{
    .reg .pred p, q;
    .reg .u32 t;
    mov.u32 t, %tid.x;
    setp.eq.u32 p, t, 0;
    setp.ne.u32 q, $2, 0;
    and.pred p, p, q;
    @p cp.async.bulk.prefetch.L2.global [$1], $2;
    mov.u32 $0, 0;
}""")


@triton.jit
def l2_prefetch(base_ptr, nbytes, part, parts):
    """Ask for the ``part``-th of ``parts`` equal shares of the ``nbytes`` at ``base_ptr`` (16-byte aligned)
    to be brought into L2 (``cp.async.bulk.prefetch.L2``: one instruction from one thread; the copy engine
    does the rest while the program goes on or exits). For the next kernel's weights: their reads then
    hit L2. CUDA sm_90+ only (no interpreter)."""
    share = (tl.cdiv(nbytes, parts) + 15) // 16 * 16
    start = part * share
    size = tl.maximum(tl.minimum(share, nbytes - start), 0) // 16 * 16
    ptr = base_ptr.to(tl.pointer_type(tl.uint8)) + tl.minimum(start, nbytes).to(tl.int64)
    tl.inline_asm_elementwise(asm=_ASM_L2_PREFETCH, constraints="=r,l,r", args=[ptr, size.to(tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def stream_load(ptrs, mask, W_LOAD: tl.constexpr):
    """``tl.load`` of weight codes (zero where ``mask`` is off; ``mask`` None: no mask) with the cache hints
    ``W_LOAD`` names: 0 none, 1 ``evict_first`` (each byte is read once per call), 2 ``.cg`` (cached in L2
    only, not L1). (ptxas takes no ``.cg`` with ``evict_first``.)"""
    evict: tl.constexpr = "evict_first" if W_LOAD == 1 else ""
    cache: tl.constexpr = ".cg" if W_LOAD == 2 else ""
    if mask is None:
        v = tl.load(ptrs, cache_modifier=cache, eviction_policy=evict)
    else:
        v = tl.load(ptrs, mask=mask, other=0, cache_modifier=cache, eviction_policy=evict)
    return v


@triton.jit
def prmt(a, b, sel, USE_ASM: tl.constexpr):
    """PTX ``prmt.b32`` (default mode): byte i of the result is byte ``s & 7`` of the pair ``{b, a}``
    (a = bytes 0-3), where ``s`` is nibble i of ``sel``; if bit 3 of ``s`` is set, that byte's sign bit
    is replicated instead."""
    if USE_ASM:
        out = tl.inline_asm_elementwise(asm="prmt.b32 $0, $1, $2, $3;", constraints="=r,r,r,r",
                                        args=[a, b, sel], dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = tl.zeros_like(a)
        for i in tl.static_range(4):
            nib = (sel >> (4 * i)) & 15
            idx = nib & 7
            byte = (tl.where(idx < 4, a, b) >> (8 * (idx & 3))) & 255
            byte = tl.where(nib >= 8, tl.where(byte >= 128, 255, 0), byte)
            out = out | (byte << (8 * i))
    return out


# Table unpacker (dINT with |t| <= 63): the 16 values of a row, biased by +64 so every entry is in
# [0, 127], sit in four words T0..T3 (entry q = byte q % 4 of T[q // 4]). A code word's nibbles are
# [k0, k0+HALF, k1, k1+HALF | k2, k2+HALF, k3, k3+HALF] (packing.py's byte = hi << 4 | lo), so a
# half-word is a prmt selector for four codes: two prmt look up entries q & 7 in T0:T1 and T2:T3, a
# third with the sign-replicate mode turns bit 3 of each nibble into a byte mask (0xFF / 0x80; bit 7
# of every entry is 0, so the 0x80 case selects correctly), and lop3 picks: 12 instructions per 8 codes
# where the arithmetic unpacker takes 19. The products come out in the nibble order: the activation
# words are permuted to match (``prmt`` with 0x5140 / 0x7362), and the +64 bias is taken back once as
# 64 * sum_k x_k.
_ASM_LUT = tl.constexpr("""{
    .reg .b32 wm, wh, wmh, u, mk, ra, rb;
    mov.b32 u, 0x80808080;
    and.b32 wm, $2, 0x77777777;
    shr.u32 wh, $2, 16;
    shr.u32 wmh, wm, 16;
    prmt.b32 mk, u, u, $2;
    prmt.b32 ra, $3, $4, wm;
    prmt.b32 rb, $5, $6, wm;
    lop3.b32 $0, mk, rb, ra, 0xCA;
    prmt.b32 mk, u, u, wh;
    prmt.b32 ra, $3, $4, wmh;
    prmt.b32 rb, $5, $6, wmh;
    lop3.b32 $1, mk, rb, ra, 0xCA;
}""")
LUT_BIAS = tl.constexpr(64)


@triton.jit
def lut_words(zb, DINT: tl.constexpr, DINT_R: tl.constexpr, BIAS: tl.constexpr = LUT_BIAS):
    """The four table words T0..T3 of rows with biased zeros ``zb`` (int32 ``128 - R*z``), entries ``t + BIAS``."""
    zoff = zb - 128
    t0 = tl.zeros_like(zb)
    t1 = tl.zeros_like(zb)
    t2 = tl.zeros_like(zb)
    t3 = tl.zeros_like(zb)
    for q in tl.static_range(16):
        if DINT and q >= 14:
            v = tl.zeros_like(zb) + (BIAS + 29 - 2 * q)
        elif DINT:
            v = zoff + (q * DINT_R + BIAS)
        else:
            v = zoff + (q + BIAS)
        v = (v & 255) << (8 * (q % 4))
        if q // 4 == 0:
            t0 = t0 | v
        elif q // 4 == 1:
            t1 = t1 | v
        elif q // 4 == 2:
            t2 = t2 | v
        else:
            t3 = t3 | v
    return t0, t1, t2, t3


@triton.jit
def unpack_words_lut(w, t0, t1, t2, t3, USE_ASM: tl.constexpr):
    """Code words -> two words of four biased values ``t + 64`` in the nibble order (see ``_ASM_LUT``)."""
    t0 = tl.broadcast_to(t0, w.shape)
    t1 = tl.broadcast_to(t1, w.shape)
    t2 = tl.broadcast_to(t2, w.shape)
    t3 = tl.broadcast_to(t3, w.shape)
    if USE_ASM:
        v0, v1 = tl.inline_asm_elementwise(asm=_ASM_LUT, constraints="=r,=r,r,r,r,r,r", args=[w, t0, t1, t2, t3],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        u = tl.zeros_like(w) + (-2139062144)  # 0x80808080
        wm = w & 0x77777777
        wh = (w >> 16) & 0xFFFF
        wmh = (wm >> 16) & 0xFFFF
        mk = prmt(u, u, w, False)
        v0 = (mk & prmt(t2, t3, wm, False)) | (~mk & prmt(t0, t1, wm, False))
        mk = prmt(u, u, wh, False)
        v1 = (mk & prmt(t2, t3, wmh, False)) | (~mk & prmt(t0, t1, wmh, False))
    return v0, v1


# ------------------------------------------------------------------------- table unpacker on MMA fragments
# In an mma.sync operand fragment a 32-bit register holds four consecutive K positions of one row, so an
# elementwise asm with pack = 4 sees code bytes j..j+3 (j % 4 == 0) of a weight row as one word. A table
# unpacker (``_ASM_LUT_EXACT`` below) turns it into two words in the nibble order: positions j..j+3 of the
# first output hold the codes k = [j, H+j, j+1, H+j+1], of the second [j+2, H+j+2, j+3, H+j+3]
# (H = PACK_K / 2, ``packing.py``'s byte = hi << 4 | lo). The activation planes are interleaved the same way
# (``interleave_planes``), so each product pairs the same k; a dot product does not care in which order the k come.
_ASM_INTERLEAVE = tl.constexpr("""{
    prmt.b32 $0, $2, $3, 0x5140;
    prmt.b32 $1, $2, $3, 0x7362;
}""")


# The fragment unpacker's own table asm: exact values, no bias. Its byte masks come from the code word itself:
# bit 3 of nibble 2i + 1 is the sign bit of byte i of the word, bit 3 of nibble 2i that of byte i of the word
# shifted left by 4, so a prmt in the sign-replicate mode with a constant selector (0x9D8C for nibbles 0-3,
# 0xBFAE for 4-7) gives 0xFF where the code is >= 8 and 0x00 elsewhere, and lop3 then takes every bit of the
# entry from the right table half. 11 instructions per 8 codes. With pack = 4 an int32 argument takes four
# operands (one per element; here four copies of a table word), so the tables sit at $3, $7, $11, $15.
_ASM_LUT_EXACT = tl.constexpr("""{
    .reg .b32 wm, w4, wmh, m0, m1, ra, rb;
    and.b32 wm, $2, 0x77777777;
    shl.b32 w4, $2, 4;
    prmt.b32 m0, $2, w4, 0x9D8C;
    prmt.b32 m1, $2, w4, 0xBFAE;
    prmt.b32 ra, $3, $7, wm;
    prmt.b32 rb, $11, $15, wm;
    lop3.b32 $0, m0, rb, ra, 0xCA;
    shr.u32 wmh, wm, 16;
    prmt.b32 ra, $3, $7, wmh;
    prmt.b32 rb, $11, $15, wmh;
    lop3.b32 $1, m1, rb, ra, 0xCA;
}""")


@triton.jit
def unpack_bytes_lut(b, t0, t1, t2, t3, DINT: tl.constexpr, DINT_R: tl.constexpr, zb, USE_ASM: tl.constexpr):
    """Code bytes ``b`` (uint8, K along a fragment's registers) with the rows' table words ``t0..t3`` (int32,
    ``lut_words`` with no bias) -> two int8 planes of the values ``t``.

    GPU (``USE_ASM``): ``_ASM_LUT_EXACT``, in the nibble order (comment above). Interpreter: the plain planes
    (k = j and H + j, ``unpack_pure``): the same products once the activation planes match
    (``interleave_planes`` with the same ``USE_ASM``)."""
    if USE_ASM:
        t0 = tl.broadcast_to(t0, b.shape)
        t1 = tl.broadcast_to(t1, b.shape)
        t2 = tl.broadcast_to(t2, b.shape)
        t3 = tl.broadcast_to(t3, b.shape)
        a, c = tl.inline_asm_elementwise(asm=_ASM_LUT_EXACT, constraints="=r,=r" + ",r" * 17,
                                         args=[b, t0, t1, t2, t3], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        a, c = unpack_pure(b, zb, DINT, DINT_R)
    return a, c


@triton.jit
def interleave_planes(x_lo, x_hi, USE_ASM: tl.constexpr):
    """int8 activation planes (k = j and H + j) -> the nibble order of ``unpack_bytes_lut`` (GPU), or as they
    are (interpreter)."""
    if USE_ASM:
        a, c = tl.inline_asm_elementwise(asm=_ASM_INTERLEAVE, constraints="=r,=r,r,r", args=[x_lo, x_hi],
                                         dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        a = x_lo
        c = x_hi
    return a, c
