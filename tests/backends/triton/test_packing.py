"""backends/triton/packing.py: the layout, the integer weight values and the tables, vs qcompile.formats."""
from __future__ import annotations

import pytest
import torch

from qcompile import formats as F
from qcompile.backends.triton import prepack, unpack_values
from qcompile.backends.triton.packing import weight_values

FORMATS = ["dint4", "dint4_sym", "dint4_c0.25", "dint4_c0.125", "int4", "int4_sym"]


def _quantized(n, k, fmt, gran, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return F.quantize(w, F.FormatSpec.parse(fmt), F.Granularity.parse(gran))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gran,k", [("channel", 200), ("group64", 192), ("group128", 256), ("group192", 384),
                                    ("tensor", 72)])
def test_values_times_unit_scale_is_formats_dequantize(fmt, gran, k):
    codes, scale, zp = _quantized(24, k, fmt, gran)
    pw = prepack(codes, scale, zp, fmt, gran)
    t = unpack_values(pw)  # the kernels' unpacking maths, in torch
    g = pw.group_size or k
    w = t.double() * pw.unit_scale.t().double().repeat_interleave(g, dim=1)
    ref = F.dequantize(codes, scale, zp, F.FormatSpec.parse(fmt), F.Granularity.parse(gran)).double()
    assert (w - ref).abs().max() <= 2 ** -22 * ref.abs().max()  # formats rounds value*scale to fp32
    assert torch.equal(pw.code_sum.t(), t.view(24, -1, g).sum(-1).int())
    assert t.abs().max() <= 104  # fits int8 for every dINT ratio


@pytest.mark.parametrize("fmt", ["dint4", "int4"])
def test_layout_chunk_halves(fmt):
    """Byte j of chunk c, row n = code(c*P + HALF + j) << 4 | code(c*P + j)."""
    codes, scale, zp = _quantized(5, 300, fmt, "channel")
    pw = prepack(codes, scale, zp, fmt, "channel")
    assert pw.qweight.shape == (3, 5, 64) and pw.pack_k == 128
    b = pw.qweight
    assert torch.equal(b[1, 2, 7] & 15, codes[2, 128 + 7])
    assert torch.equal(b[1, 2, 7] >> 4, codes[2, 128 + 64 + 7])
    assert torch.equal(b[2, 4, :44] & 15, codes[4, 256:300])  # last chunk: 44 codes, then padding
    assert int((b[2, :, 44:] & 15).max()) == 0 and int((b[2] >> 4).max()) == 0


def test_packed_codes_input_and_dint_table():
    codes, scale, zp = _quantized(8, 130, "dint4", "channel")
    packed_bytes = F.pack_int4(codes)  # how the reference graph stores them
    a = prepack(codes, scale, zp, "dint4", "channel")
    b = prepack(packed_bytes, scale, zp, "dint4", "channel", in_features=130)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.zero_byte, b.zero_byte)
    spec = F.FormatSpec.parse("dint4")
    t = weight_values(codes, zp.reshape(8, 1), spec)
    for row in range(8):  # formats.dint_table is the kernel table of the design doc
        table = F.dint_table(spec, int(zp[row, 0, 0]))
        assert t[row].tolist() == [table[c] for c in codes[row].tolist()]


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(fmt="fp4_e2m1"), ValueError, "4-bit INT or dINT"),
    (dict(fmt="int8"), ValueError, "4-bit INT or dINT"),
    (dict(gran="group32"), ValueError, "multiples of"),
    (dict(gran="token2"), Exception, "granularity"),
    (dict(codes=torch.zeros(4, 64, dtype=torch.int32)), TypeError, "uint8"),
    (dict(codes=torch.full((4, 64), 16, dtype=torch.uint8)), ValueError, "above 15"),
    (dict(zp=torch.full((4, 1, 1), 0.5)), ValueError, "integers"),
    (dict(scale=torch.ones(3)), ValueError, "elements"),
])
def test_prepack_rejects_bad_input(kwargs, err, match):
    args = dict(codes=torch.zeros(4, 64, dtype=torch.uint8), scale=torch.ones(4, 1, 1),
                zp=torch.zeros(4, 1, 1), fmt="dint4", gran="channel")
    args.update(kwargs)
    with pytest.raises(err, match=match):
        prepack(**args)
