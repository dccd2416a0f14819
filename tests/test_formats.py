"""Reference formats: hand-worked dINT values (AQAS eqs. 5-6), invariants for every format x granularity."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile import formats as F

FORMATS = ["int4", "int4_sym", "int8", "int8_sym", "int3", "dint4", "dint4_sym", "dint3", "dint4_c0.25",
           "dint4_c0.125", "fp4_e1m2", "fp4_e2m1", "fp4_e3m0"]
GRANS = ["tensor", "channel", "token", "group8", "vchannel"]


def test_dint4_hand_worked_values():
    # s = 1, z = 0 (given directly): thresholds s/4 and 3s/4 around the special values +-s/2.
    fmt, gran = F.FormatSpec.parse("dint4"), F.Granularity("tensor")
    s, z = torch.ones(1, 1), torch.zeros(1, 1)
    x = torch.tensor([0.3, 0.2, -0.6, 0.8, 0.75, -0.25, -0.26, 13.4, 20.0])
    codes = F.quantize_with_qparams(x, s, z, fmt, gran)
    vals = F.dequantize(codes, s, z, fmt, gran)
    assert codes.tolist() == [14, 0, 15, 1, 14, 0, 15, 13, 13]
    assert vals.tolist() == [0.5, 0.0, -0.5, 1.0, 0.5, 0.0, -0.5, 13.0, 13.0]


def test_dint4_qparams_use_thirteen_steps():
    x = torch.tensor([[-3.0, 0.0, 10.0]])
    codes, s, z = F.quantize(x, F.FormatSpec.parse("dint4"), F.Granularity("channel"))
    assert s.item() == pytest.approx(13.0 / 13)   # range / p, p = 2^4 - 3
    assert z.item() == 3.0
    assert codes.tolist() == [[0, 3, 13]]


def test_dint_ratio_changes_special_value():
    fmt = F.FormatSpec.parse("dint4_c0.25")
    s, z = torch.ones(1, 1), torch.zeros(1, 1)
    codes = F.quantize_with_qparams(torch.tensor([0.2, 0.1]), s, z, fmt, F.Granularity("tensor"))
    # midpoints 0|c = 0.125 and c|s = 0.625
    assert codes.tolist() == [14, 0]
    assert F.dequantize(codes, s, z, fmt, F.Granularity("tensor")).tolist() == [0.25, 0.0]


def test_dint_table_units_of_half_step():
    assert F.dint_table(F.FormatSpec.parse("dint4"), 7) == [-14, -12, -10, -8, -6, -4, -2, 0, 2, 4, 6, 8, 10, 12,
                                                              1, -1]


def test_fp4_grids():
    fmt, gran = F.FormatSpec.parse("fp4_e2m1"), F.Granularity("tensor")
    x = torch.tensor([6.0, -6.0, 2.4, 0.2, -0.3])
    codes, s, z = F.quantize(x, fmt, gran)
    assert s.item() == 1.0
    assert F.dequantize(codes, s, z, fmt, gran).tolist() == [6.0, -6.0, 2.0, 0.0, -0.5]


def test_names_round_trip():
    for name in FORMATS:
        assert F.FormatSpec.parse(name).name == name
    for name in GRANS:
        assert F.Granularity.parse(name).name == name


@pytest.mark.parametrize("bad", ["int9", "dint2", "fp4_e4m3", "uint4", "int4_c0.25", "dint4_c0.3", ""])
def test_bad_format_names(bad):
    with pytest.raises(F.FormatError, match="not allowed|unknown"):
        F.FormatSpec.parse(bad)


def test_group_must_divide_k():
    with pytest.raises(F.FormatError, match="does not divide the reduction dim K=576"):
        F.quantize(torch.randn(4, 576), F.FormatSpec.parse("int4"), F.Granularity.parse("group128"))


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(FORMATS), gran=st.sampled_from(GRANS), rows=st.integers(1, 5),
       groups=st.integers(1, 3), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_invariants_every_format_and_granularity(fmt, gran, rows, groups, seed, scale):
    fmt, gran = F.FormatSpec.parse(fmt), F.Granularity.parse(gran)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, 8 * groups, generator=g) * scale
    codes, s, z = F.quantize(x, fmt, gran)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert int(codes.max()) < fmt.n_codes
    y = F.dequantize(codes, s, z, fmt, gran)
    # codes are a fixed point: quantize(dequantize(codes)) == codes with the same qparams
    assert torch.equal(F.quantize_with_qparams(y, s, z, fmt, gran), codes)
    # the error of integer grids is at most half a step (clamping never happens with min-max ranges)
    if fmt.kind == "int" and not fmt.symmetric:
        step = F._from_blocks(s.expand(*F._to_blocks(x, gran).shape), x.shape, gran)
        assert ((x - y).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_grid_rounder_values_are_the_dequantized_codes_bit_for_bit(fmt):
    """OPTQ takes W_hat from ``GridRounder.codes_and_values``: it must equal ``dequantize`` exactly."""
    fmt, gran = F.FormatSpec.parse(fmt), F.Granularity.parse("group8")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32, generator=g)
    s, z = F.choose_qparams(x * 0.7, fmt, gran)  # a narrower range: some values clamp
    xb = F._to_blocks(x, gran)
    # values exactly at the dINT thresholds and at the grid points too
    xb[0, 0, :4] = s[0, 0, 0] * torch.tensor([0.25, 0.75, -0.25, -0.75])
    codes, values = F.GridRounder(fmt, s, z).codes_and_values(xb)
    codes = F._from_blocks(codes.to(torch.uint8), x.shape, gran)
    assert torch.equal(codes, F.quantize_with_qparams(F._from_blocks(xb, x.shape, gran), s, z, fmt, gran))
    assert torch.equal(F._from_blocks(values, x.shape, gran), F.dequantize(codes, s, z, fmt, gran))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 33), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(rows, k, seed):
    codes = torch.randint(0, 16, (rows, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = F.pack_int4(codes)
    assert packed.shape == (rows, (k + 1) // 2)
    assert torch.equal(F.unpack_int4(packed, k), codes)


def test_pack_rejects_wide_codes():
    with pytest.raises(F.FormatError, match="above 15"):
        F.pack_int4(torch.tensor([16], dtype=torch.uint8))
