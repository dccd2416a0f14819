"""backends/onnx/weights.py: every weight format as ONNX initializers, bit-exact against qcompile.formats."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx_graphs import run_graph

from qcompile import formats as F
from qcompile import ops
from qcompile.backends.onnx import weights as W

CASES = [("int4", "channel"), ("int4", "group32"), ("int4_sym", "channel"), ("int3", "channel"),
         ("int8", "channel"), ("int8", "group16"), ("dint4", "channel"), ("dint4", "group32"),
         ("dint4_c0.25", "channel"), ("dint8", "channel"), ("fp4_e2m1", "group32"), ("fp4_e1m2", "channel"),
         ("fp4_e3m0", "channel")]


def quantized_weight(fmt: str, gran: str, n: int = 24, k: int = 64, seed: int = 0):
    """``(WeightCodes as the exporter reads them, reference dequantized [N, K] weight)``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    spec, granularity = F.FormatSpec.parse(fmt), F.Granularity.parse(gran)
    codes, scale, zp = F.quantize(w, spec, granularity)
    ref = F.dequantize(codes, scale, zp, spec, granularity)
    packed = ops.pack_weight_codes(codes, spec)
    return W.weight_codes(packed.numpy(), scale.numpy(), zp.numpy(), fmt, gran, k), ref


@pytest.mark.parametrize("fmt,gran", CASES)
def test_dequantize_linear_is_bit_exact(fmt, gran):
    wc, ref = quantized_weight(fmt, gran)
    form = W.dequantize_linear_form(wc)

    def build(ed):
        zp = ed.const(form.zero_point, "zp") if form.zero_point is not None else None
        return [ed.op("DequantizeLinear", ed.const(form.values, "q"), ed.const(form.scale, "s"), zp,
                      **form.attributes)]

    (out,) = run_graph(build, {})
    assert torch.equal(torch.from_numpy(out), ref)


def test_storage_types():
    assert W.dequantize_linear_form(quantized_weight("int4", "channel")[0]).values.dtype.name == "uint4"
    assert W.dequantize_linear_form(quantized_weight("dint4", "channel")[0]).values.dtype == np.int8
    assert W.dequantize_linear_form(quantized_weight("dint8", "channel")[0]).values.dtype == np.int16  # 2(q-z) > 127
    # dINT4 values in units of s/2 are formats.dint_table: 2(q - z) and +-1
    wc, _ = quantized_weight("dint4", "channel")
    ints, unit = W.integer_values(wc)
    table = F.dint_table(wc.fmt, int(wc.zp[0, 0]))
    assert unit == 0.5 and ints[0].tolist() == [table[c] for c in wc.codes[0]]


@pytest.mark.parametrize("fmt", ["int4", "int4_sym", "int3", "int8", "int8_sym", "dint4", "dint4_c0.25",
                                 "fp4_e2m1", "fp4_e3m0"])
def test_integer_matrix_reconstructs_the_weight(fmt):
    wc, ref = quantized_weight(fmt, "channel")
    mat = W.integer_matrix(wc)
    b = mat.b.astype(np.int32) - (mat.b_zero_point.astype(np.int32) if mat.b_zero_point is not None else 0)
    assert np.array_equal(b.sum(0), mat.colsum)
    assert torch.equal(torch.from_numpy(b.astype(np.float32) * mat.w_scale).T, ref)
    if mat.b_zero_point is None:
        assert np.abs(mat.b).max() <= 64  # no u8s8 saturation without VNNI (255 * 64 * 2 < 2^15)


@pytest.mark.parametrize("fmt,gran", [("int4", "group32"), ("dint4_c0.125", "channel"), ("int7", "channel")])
def test_integer_matrix_declines_group_and_wide_values(fmt, gran):
    # group scales cannot be applied after a K-long integer sum; values above 64 could saturate u8s8
    assert W.integer_matrix(quantized_weight(fmt, gran)[0]) is None


@pytest.mark.parametrize("fmt,gran,k", [("int4", "channel", 64), ("int4", "channel", 80), ("int4", "group32", 64),
                                        ("int4", "group16", 64), ("int3", "channel", 64), ("int4_sym", "group64", 128)])
def test_matmul_nbits_blocks_are_exact(fmt, gran, k):
    wc, ref = quantized_weight(fmt, gran, k=k)
    blocks = W.nbits_blocks(wc)
    n = wc.shape[0]

    def build(ed, x):  # accuracy_level 0: fp32 compute; x = I gives W^T back
        return [ed.op("MatMulNBits", x, ed.const(blocks.b, "b"), ed.const(blocks.scales, "s"),
                      ed.const(blocks.zero_points, "z"), domain="com.microsoft", K=k, N=n, bits=4,
                      block_size=blocks.block_size, accuracy_level=0)]

    (out,) = run_graph(build, {"x": np.eye(k, dtype=np.float32)})
    assert torch.equal(torch.from_numpy(out).T, ref)


@pytest.mark.parametrize("fmt,gran", [("dint4", "channel"), ("fp4_e2m1", "channel"), ("int8", "channel"),
                                      ("int4", "group8")])
def test_matmul_nbits_declines_what_it_cannot_hold(fmt, gran):
    assert W.nbits_blocks(quantized_weight(fmt, gran)[0]) is None
