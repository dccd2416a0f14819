"""Fuzzing the reference formats: names parse or fail cleanly, and invariants test_formats.py does not check.

test_formats.py already checks: codes are a fixed point of quantize∘dequantize, the half-step error bound
of asymmetric INT, pack/unpack round trip. Here: any name parses to a spec whose name parses back (or
FormatError); monotonicity; exact zero; sign symmetry of symmetric formats; power-of-two scale
equivariance (bit-exact); granularity equivalences; error bounds of the other grids; inputs never
mutated; non-contiguous inputs; the ``qcompile::`` ops equal the reference on random shapes (odd K too).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qcompile import formats as F

FORMATS = ["int2", "int3", "int4", "int8", "int4_sym", "int8_sym", "dint3", "dint4", "dint4_sym", "dint8",
           "dint4_c0.25", "dint4_c0.125", "fp4_e1m2", "fp4_e2m1", "fp4_e3m0"]
SYMMETRIC = [f for f in FORMATS if f.endswith("_sym") or f.startswith("fp4")]
FUZZ = settings(max_examples=80, deadline=None, derandomize=True)


def _tensor(seed: int, shape, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * spread
    x[torch.rand(*shape, generator=g) < 0.1] = 0.0     # exact zeros occur (ReLU outputs, pruned weights)
    return x


def _blocks(t: torch.Tensor, x: torch.Tensor, gran: F.Granularity) -> torch.Tensor:
    """Expand blocked qparams ``t`` back to the shape of ``x``."""
    return F._from_blocks(t.expand(*F._to_blocks(x, gran).shape), x.shape, gran)


# ------------------------------------------------------------------------------------------- names
@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=16),
                 st.from_regex(r"(d?int|fp4_e[0-9]m[0-9]|int)[0-9]{0,4}(_sym)?(_c[0-9.]{0,8})?", fullmatch=True)))
@example("dint4_c.")
@example("int" + "9" * 5000)
def test_format_names_parse_or_format_error(name):
    try:
        spec = F.FormatSpec.parse(name)
    except F.FormatError as e:
        assert str(e) and len(str(e)) < 400
    else:
        assert F.FormatSpec.parse(spec.name) == spec
        assert spec.n_codes == 2 ** spec.bits


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=12), st.from_regex(r"group[0-9]{0,12}", fullmatch=True)))
@example("group" + "9" * 5000)
def test_granularity_names_parse_or_format_error(name):
    try:
        gran = F.Granularity.parse(name)
    except F.FormatError as e:
        assert str(e) and len(str(e)) < 400
    else:
        assert F.Granularity.parse(gran.name) == gran


# -------------------------------------------------------------------------------------- invariants
@FUZZ
@given(fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2**16), n=st.integers(2, 300),
       spread=st.sampled_from([1e-3, 1.0, 1e3]))
def test_monotone_and_zero_is_exact(fmt, seed, n, spread):
    """One block (tensor granularity): x ≤ x' ⇒ dq(x) ≤ dq(x'); zeros come back as exactly 0."""
    fmt, gran = F.FormatSpec.parse(fmt), F.Granularity("tensor")
    x = _tensor(seed, (n,), spread).sort().values
    y = F.fake_quantize(x, fmt, gran)
    assert (y[1:] >= y[:-1]).all()
    assert (y[x == 0] == 0).all()


@FUZZ
@given(fmt=st.sampled_from(SYMMETRIC), gran=st.sampled_from(["tensor", "channel", "group4", "vchannel"]),
       seed=st.integers(0, 2**16), spread=st.sampled_from([1e-2, 1.0, 1e2]))
def test_symmetric_formats_are_odd(fmt, gran, seed, spread):
    """dq(-x) == -dq(x) bit for bit: symmetric grids, round-half-even and the dINT midpoints are all odd."""
    fmt, gran = F.FormatSpec.parse(fmt), F.Granularity.parse(gran)
    x = _tensor(seed, (3, 8), spread)
    assert torch.equal(F.fake_quantize(-x, fmt, gran), -F.fake_quantize(x, fmt, gran))


@FUZZ
@given(fmt=st.sampled_from(FORMATS), gran=st.sampled_from(["tensor", "channel", "group4", "vchannel"]),
       seed=st.integers(0, 2**16), power=st.integers(-12, 20))
def test_power_of_two_scaling_is_exact(fmt, gran, seed, power):
    """quantize(2^k x): same codes and zero-points, scales times 2^k exactly (no eps clamp, no subnormals)."""
    fmt, gran = F.FormatSpec.parse(fmt), F.Granularity.parse(gran)
    x = _tensor(seed, (3, 8), 1.0)
    # every block holds a 1.0, so with 2^k >= 2^-12 no scale (>= 2^-12 / 253) reaches the 1e-8 floor
    x[..., 0] = 1.0
    x[0, :] = 1.0
    codes, s, z = F.quantize(x, fmt, gran)
    codes2, s2, z2 = F.quantize(x * 2.0 ** power, fmt, gran)
    assert torch.equal(codes2, codes) and torch.equal(z2, z) and torch.equal(s2, s * 2.0 ** power)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2**16), rows=st.integers(1, 4), k=st.integers(2, 24))
def test_granularity_equivalences(fmt, seed, rows, k):
    """channel == token == group{K}; vchannel(x) == channel(xᵀ)ᵀ."""
    fmt = F.FormatSpec.parse(fmt)
    x = _tensor(seed, (2, rows, k), 1.0)
    ref = F.quantize(x, fmt, F.Granularity("channel"))
    for other in (F.Granularity("token"), F.Granularity("group", k)):
        out = F.quantize(x, fmt, other)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    v_codes, v_s, v_z = F.quantize(x, fmt, F.Granularity("vchannel"))
    t_codes, t_s, t_z = F.quantize(x.transpose(-1, -2).contiguous(), fmt, F.Granularity("channel"))
    assert torch.equal(v_codes, t_codes.transpose(-1, -2)) and torch.equal(v_s, t_s) and torch.equal(v_z, t_z)


@FUZZ
@given(fmt=st.sampled_from([f for f in FORMATS if not (f.startswith("int") and "_sym" not in f)]),
       gran=st.sampled_from(["tensor", "channel", "group4", "vchannel"]), seed=st.integers(0, 2**16),
       spread=st.sampled_from([1e-3, 1.0, 1e3]))
def test_error_bounds_of_the_other_grids(fmt, gran, seed, spread):
    """|x - dq(x)| ≤ half the largest gap of the grid, in units of the block scale (ranges never clip)."""
    fmt, gran = F.FormatSpec.parse(fmt), F.Granularity.parse(gran)
    x = _tensor(seed, (3, 8), spread)
    codes, s, z = F.quantize(x, fmt, gran)
    y = F.dequantize(codes, s, z, fmt, gran)
    if fmt.kind == "fp4":
        grid = F.FP4_GRIDS[fmt.fp_variant]
        half_gap = max(b - a for a, b in itertools.pairwise(grid)) / 2
    else:
        half_gap = 0.5    # INT_sym and dINT: uniform steps of s; dINT's specials only shrink the error
    bound = _blocks(s, x, gran) * half_gap
    assert ((x - y).abs() <= bound * (1 + 1e-5) + 1e-12).all()


@FUZZ
@given(fmt=st.sampled_from(FORMATS), gran=st.sampled_from(["tensor", "channel", "group4", "vchannel"]),
       seed=st.integers(0, 2**16))
def test_inputs_untouched_and_layout_irrelevant(fmt, gran, seed):
    fmt, gran = F.FormatSpec.parse(fmt), F.Granularity.parse(gran)
    x = _tensor(seed, (4, 8), 1.0)
    before = x.clone()
    ref = F.quantize(x, fmt, gran)
    assert torch.equal(x, before)
    strided = torch.empty(8, 4).t()            # same values, column-major storage
    strided.copy_(x)
    assert not strided.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(F.quantize(strided, fmt, gran), ref))


# ---------------------------------------------------------------------------------- qcompile:: ops
@FUZZ
@given(fmt=st.sampled_from(FORMATS), n=st.integers(1, 6), groups=st.integers(1, 3), g=st.sampled_from([2, 3, 5, 8]),
       per_channel=st.booleans(), dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       seed=st.integers(0, 2**16))
def test_dequantize_weight_op_equals_reference(fmt, n, groups, g, per_channel, dtype, seed):
    """Odd K included: 4-bit codes are packed with one padding nibble that must never leak."""
    from qcompile import ops

    spec = F.FormatSpec.parse(fmt)
    k = groups * g
    gran = F.Granularity("channel") if per_channel else F.Granularity("group", g)
    w = _tensor(seed, (n, k), 1.0)
    codes, s, z = F.quantize(w, spec, gran)
    out = torch.ops.qcompile.dequantize_weight(ops.pack_weight_codes(codes, spec), s, z, spec.name, gran.name,
                                               k, dtype)
    assert out.shape == (n, k) and out.dtype == getattr(torch, dtype)
    assert torch.equal(out, F.dequantize(codes, s, z, spec, gran, dtype=getattr(torch, dtype)))


@FUZZ
@given(fmt=st.sampled_from(["int8", "int4", "int8_sym", "dint4", "fp4_e2m1"]),
       gran=st.sampled_from(["token", "group4", "vchannel"]), lead=st.lists(st.integers(1, 3), max_size=2),
       seed=st.integers(0, 2**16))
def test_qdq_activation_op_equals_reference(fmt, gran, lead, seed):
    x = _tensor(seed, (*lead, 5, 8), 3.0)
    y = torch.ops.qcompile.qdq_activation(x, fmt, gran)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, F.fake_quantize(x, F.FormatSpec.parse(fmt), F.Granularity.parse(gran)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_code_decodes_to_its_table_value(fmt):
    """Exhaustive over codes: dequantize agrees with code_values for every code and a few zero-points."""
    spec = F.FormatSpec.parse(fmt)
    gran = F.Granularity("channel")
    zps = [0.0] if spec.kind == "fp4" else [0.0, 1.0, float(spec.n_steps // 2)]
    for zp in zps:
        codes = torch.arange(spec.n_codes, dtype=torch.uint8)[None, :]
        s, z = torch.full((1, 1, 1), 0.75), torch.full((1, 1, 1), zp)
        expected = F.code_values(spec, z)[0, 0] * 0.75
        assert torch.equal(F.dequantize(codes, s, z, spec, gran)[0], expected)
