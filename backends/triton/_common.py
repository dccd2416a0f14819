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

import torch
import triton
import triton.language as tl

__all__ = ["recip_div", "act_qparams", "act_quantize", "unpack_pure", "unpack_asm", "unpack"]


@triton.jit
def _round_half_even(v):
    # fp32 (v + 1.5*2^23) - 1.5*2^23 rounds |v| < 2^22 to an integer, ties to even (= torch.round).
    # Here |v| <= QMAX by construction (|x| <= (hi - lo) = QMAX * scale up to rounding).
    return (v + 12582912.0) - 12582912.0


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
def act_quantize(x, scale, zp, QMAX: tl.constexpr):
    """``clamp(round(x / scale) + zp, 0, QMAX)`` in fp32 -> int32 (``formats.quantize_with_qparams``)."""
    v = _round_half_even(tl.math.div_rn(x, scale)) + zp
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
