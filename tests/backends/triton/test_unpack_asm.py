"""The PTX unpackers of ``backends/triton/_common.py``, run on the CPU by a small interpreter of the PTX they use.

The interpreter only runs the kernels with the plain-``tl`` unpackers (``USE_ASM`` is off there), so the PTX text is
otherwise checked only on a GPU. Here each asm string itself is executed, instruction by instruction (``mov``,
``and``, ``or``, ``xor``, ``shl``, ``shr``, ``add``, ``sub``, ``mad.lo``, ``prmt`` in its default mode with
sign replication, ``lop3``), on every code nibble at every position and on random words and zero-points, and
compared with the code values of ``qcompile.formats`` (``dint_table``; ``q - z`` for INT).
"""
from __future__ import annotations

import random
import re

import pytest

pytest.importorskip("triton")

from qcompile import formats as F  # noqa: E402
from qcompile.backends.triton import _common as C  # noqa: E402

M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` default mode: byte i of the result is byte ``c_i & 7`` of ``{b, a}``, or with bit 3 of the
    selector nibble ``c_i`` set, that byte's sign bit replicated."""
    pool = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 15
        byte = (pool >> (8 * (sel & 7))) & 255
        if sel & 8:
            byte = 255 if byte & 128 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


_OPS = {
    "mov": lambda a: a,
    "and": lambda a, b: a & b,
    "or": lambda a, b: a | b,
    "xor": lambda a, b: a ^ b,
    "shl": lambda a, b: (a << b) & M32,
    "shr": lambda a, b: a >> b,
    "add": lambda a, b: (a + b) & M32,
    "sub": lambda a, b: (a - b) & M32,
    "mad": lambda a, b, c: (a * b + c) & M32,
    "prmt": _prmt,
    "lop3": _lop3,
}


def run_ptx(asm: str, args: dict[int, int]) -> dict[int, int]:
    """Execute ``asm`` (one ``{ ... }`` block) with operands ``$i`` = ``args[i]``; returns every ``$i`` after it."""
    regs = {f"${i}": v & M32 for i, v in args.items()}
    body = asm.strip().removeprefix("{").removesuffix("}")
    for line in body.split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        m = re.fullmatch(r"([a-z0-9]+)(?:\.[a-z0-9]+)*\s+(.+)", line)
        assert m, f"cannot parse {line!r}"
        op, operands = m.group(1), [o.strip() for o in m.group(2).split(",")]
        assert op in _OPS, f"instruction {op!r} is not in this interpreter"
        vals = [int(o, 0) if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", o) else regs[o] for o in operands[1:]]
        regs[operands[0]] = _OPS[op](*vals) & M32
    return {int(k[1:]): v for k, v in regs.items() if k.startswith("$")}


def _bytes(word: int) -> list[int]:
    return [(word >> (8 * i)) & 255 for i in range(4)]


def _signed(byte: int) -> int:
    return byte - 256 if byte & 128 else byte


def _values(fmt: str, z: int) -> list[int]:
    spec = F.FormatSpec.parse(fmt)
    if spec.kind == "dint":
        return F.dint_table(spec, z)
    return [q - z for q in range(16)]


def _table_words(vals: list[int], bias: int) -> list[int]:
    """T0..T3: entry q (plus ``bias``) is byte q % 4 of word q // 4."""
    words = [0, 0, 0, 0]
    for q, v in enumerate(vals):
        words[q // 4] |= ((v + bias) & 255) << (8 * (q % 4))
    return words


def _code_words(rng: random.Random, n: int = 300) -> list[int]:
    """Every code at every nibble position (nibble i of word q * 0x11111111 is q), then random words."""
    return [q * 0x11111111 for q in range(16)] + [rng.getrandbits(32) for _ in range(n)]


def _nibbles(word: int) -> list[int]:
    return [(word >> (4 * i)) & 15 for i in range(8)]


FORMATS = ["dint4", "dint4_c0.25", "dint4_c0.125", "int4"]


def _zero_points(fmt: str) -> list[int]:
    spec = F.FormatSpec.parse(fmt)
    lo, hi = (0, 13) if spec.kind == "dint" else (0, 15)
    return list(range(lo, hi + 1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_plane_unpackers(fmt):
    """``_ASM_INT4`` / ``_ASM_DINT4_R*``: a word of four code bytes and four copies of the biased zero
    ``128 - R*z`` -> the low-nibble values (``$0``) and the high-nibble values (``$1``), byte for byte."""
    spec = F.FormatSpec.parse(fmt)
    r = round(1 / spec.dint_ratio) if spec.kind == "dint" else 1
    asm = {1: C._ASM_INT4, 2: C._ASM_DINT4_R2, 4: C._ASM_DINT4_R4, 8: C._ASM_DINT4_R8}[r].value
    rng = random.Random(0)
    for z in _zero_points(fmt):
        vals = _values(fmt, z)
        zb = (128 - r * z) & 255
        for w in _code_words(rng, 60):
            out = run_ptx(asm, {2: w, 3: zb * 0x01010101})
            for i, byte in enumerate(_bytes(w)):
                assert _signed(_bytes(out[0])[i]) == vals[byte & 15], (fmt, z, hex(w), i)
                assert _signed(_bytes(out[1])[i]) == vals[byte >> 4], (fmt, z, hex(w), i)


@pytest.mark.parametrize("fmt", FORMATS[:2])  # |t| <= 63 with the +64 bias: dINT with R <= 4
def test_gemv_table_unpacker(fmt):
    """``_ASM_LUT`` (the GEMV's, pack = 1): a code word and the biased tables ``$3..$6`` -> ``t + 64`` of nibbles
    0-3 in ``$0`` and 4-7 in ``$1`` (the nibble order)."""
    rng = random.Random(1)
    for z in _zero_points(fmt):
        vals = _values(fmt, z)
        t = _table_words(vals, C.LUT_BIAS.value)
        for w in _code_words(rng):
            out = run_ptx(C._ASM_LUT.value, {2: w, 3: t[0], 4: t[1], 5: t[2], 6: t[3]})
            got = _bytes(out[0]) + _bytes(out[1])
            assert got == [vals[q] + 64 for q in _nibbles(w)], (fmt, z, hex(w))


@pytest.mark.parametrize("fmt", FORMATS[:3])
def test_fragment_table_unpacker(fmt):
    """``_ASM_LUT_EXACT`` (any R) as the k-split GEMM calls it (pack = 4: the code word at ``$2``, four copies of
    each table word from ``$3``): ``t`` of nibbles 0-3 in ``$0`` and 4-7 in ``$1``."""
    rng = random.Random(2)
    for z in _zero_points(fmt):
        vals = _values(fmt, z)
        t = _table_words(vals, 0)
        args = {3 + 4 * j + c: t[j] for j in range(4) for c in range(4)}
        for w in _code_words(rng):
            out = run_ptx(C._ASM_LUT_EXACT.value, {2: w, **args})
            got = [_signed(b) for b in _bytes(out[0]) + _bytes(out[1])]
            assert got == [vals[q] for q in _nibbles(w)], (fmt, z, hex(w))


def test_interleave_matches_the_nibble_order():
    """``_ASM_INTERLEAVE``: activation planes (bytes k = j..j+3 of the low half, H+j..H+j+3 of the high half) ->
    [j, H+j, j+1, H+j+1] and [j+2, H+j+2, j+3, H+j+3], the order the table unpackers give the weights in."""
    lo = [0x10, 0x11, 0x12, 0x13]
    hi = [0x20, 0x21, 0x22, 0x23]
    word = lambda bs: sum(b << (8 * i) for i, b in enumerate(bs))  # noqa: E731
    out = run_ptx(C._ASM_INTERLEAVE.value, {2: word(lo), 3: word(hi)})
    assert _bytes(out[0]) == [lo[0], hi[0], lo[1], hi[1]]
    assert _bytes(out[1]) == [lo[2], hi[2], lo[3], hi[3]]


def test_the_interpreter_catches_a_wrong_unpacker():
    """The check can fail: the fragment unpacker with its two table halves swapped gives other values."""
    swapped = C._ASM_LUT_EXACT.value.replace("$3, $7", "$X, $Y").replace("$11, $15", "$3, $7").replace(
        "$X, $Y", "$11, $15")
    vals = _values("dint4", 8)
    t = _table_words(vals, 0)
    args = {3 + 4 * j + c: t[j] for j in range(4) for c in range(4)}
    w = 0x76543210  # codes 0-7: each now read from the high half
    out = run_ptx(swapped, {2: w, **args})
    assert [_signed(b) for b in _bytes(out[0]) + _bytes(out[1])] != [vals[q] for q in _nibbles(w)]
