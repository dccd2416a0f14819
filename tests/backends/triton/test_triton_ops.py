"""backends/triton/ops.py: the qcompile_triton:: custom ops on CPU (reference fallback), opcheck, errors."""
from __future__ import annotations

import pytest
import torch

from qcompile import formats as F
from qcompile.backends.triton import prepack, quantize_per_group, quantize_per_token, w4a4_linear, w4a8_linear
from qcompile.backends.triton.quantize_kernel import quantize_rows

pytestmark = pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") == "1",
                                reason="CPU reference fallback tests (the interpreter is tested elsewhere)")


def _packed(n=24, k=256, fmt="dint4", gran="channel", seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return prepack(*F.quantize(w, F.FormatSpec.parse(fmt), F.Granularity.parse(gran)), fmt, gran), w


def _op_args(x, pw, act_fmt, bias=None):
    return (x, pw.qweight, pw.unit_scale, pw.code_sum, pw.zero_byte, pw.fmt, pw.group_size, pw.in_features,
            act_fmt, bias)


def _unpacked_weight_args(pw):
    """Op arguments with the plain [N, K/2] pack_int4 bytes where the prepacked codes belong."""
    args = list(_op_args(torch.randn(3, 256), pw, "int8"))
    args[1] = torch.zeros(24, 128, dtype=torch.uint8)
    return args


@pytest.mark.parametrize("fmt,gran", [("dint4", "channel"), ("int4", "group64"), ("dint4_sym", "group128")])
def test_w4a8_linear_matches_reference_graph(fmt, gran):
    """Same numbers as linear(qcompile::qdq_activation(x), qcompile::dequantize_weight(...)) in fp64."""
    pw, w = _packed(fmt=fmt, gran=gran)
    x = torch.randn(2, 5, 256, dtype=torch.float16)
    y = w4a8_linear(x, pw)
    assert y.shape == (2, 5, 24) and y.dtype == torch.float16
    x_dq = F.fake_quantize(x.float(), F.FormatSpec.parse("int8"), F.Granularity.parse("token")).double()
    spec, g = F.FormatSpec.parse(fmt), F.Granularity.parse(gran)
    w_dq = F.dequantize(*F.quantize(w, spec, g), spec, g).double()
    y_ref = x_dq @ w_dq.t()
    assert ((y.double() - y_ref).abs() <= 2 ** -11 * y_ref.abs() + 1e-5 * y_ref.abs().max()).all()


def test_w4a4_and_quantize_ops():
    pw, _ = _packed(fmt="int4", gran="group64")
    x = torch.randn(7, 256)
    assert w4a4_linear(x, pw).shape == (7, 24)
    codes, scale, zp = quantize_per_group(x, 64)
    ref_codes, ref_scale, ref_zp = F.quantize(x, F.FormatSpec.parse("int4"), F.Granularity.parse("group64"))
    assert torch.equal(codes.int() + 8, ref_codes.int()) and torch.equal(scale, ref_scale[..., 0])
    assert torch.equal(zp + 8, ref_zp[..., 0].int())
    codes, scale, zp = quantize_per_token(x.half(), "int8_sym")
    assert codes.dtype == torch.int8 and scale.shape == (7, 1) and zp.shape == (7, 1) and (zp == 0).all()


def test_opcheck():
    pw, _ = _packed(fmt="int4", gran="group64")
    x = torch.randn(3, 256, dtype=torch.float16)
    torch.library.opcheck(torch.ops.qcompile_triton.w4a8_linear.default, _op_args(x, pw, "int8"))
    torch.library.opcheck(torch.ops.qcompile_triton.w4a8_linear.default,
                          _op_args(x, pw, "int8_sym", torch.randn(24, dtype=torch.float16)))
    torch.library.opcheck(torch.ops.qcompile_triton.w4a4_linear.default, _op_args(x, pw, "int4"))
    torch.library.opcheck(torch.ops.qcompile_triton.quantize_per_token.default, (x, "int8"))
    torch.library.opcheck(torch.ops.qcompile_triton.quantize_per_group.default, (x, "int4", 64))


def test_traces_through_export():
    pw, _ = _packed()

    class Lin(torch.nn.Module):
        def forward(self, x):
            return w4a8_linear(x, pw)

    ep = torch.export.export(Lin(), (torch.randn(4, 256),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "qcompile_triton.w4a8_linear.default" in targets


@pytest.mark.parametrize("call,err,match", [
    (lambda pw: w4a8_linear(torch.randn(3, 256, dtype=torch.float64), pw), TypeError, "float16"),
    (lambda pw: w4a8_linear(torch.randint(0, 5, (3, 256)), pw), TypeError, "float16"),
    (lambda pw: w4a8_linear(torch.randn(3, 255), pw), ValueError, "in_features=256"),
    (lambda pw: w4a8_linear(torch.randn(3, 256), torch.zeros(24, 128, dtype=torch.uint8)), TypeError,
     "PackedWeight"),
    (lambda pw: torch.ops.qcompile_triton.w4a8_linear(*_unpacked_weight_args(pw)), ValueError, "unpacked"),
    (lambda pw: w4a8_linear(torch.randn(3, 256), pw, act_fmt="int4"), ValueError, "int8"),
    (lambda pw: w4a8_linear(torch.randn(3, 256), pw, bias=torch.randn(7)), ValueError, "bias"),
    (lambda pw: w4a4_linear(torch.randn(3, 256), pw, act_fmt="int8"), ValueError, "int4"),
    (lambda pw: quantize_per_group(torch.randn(3, 256), 100), ValueError, "divide"),
    (lambda pw: quantize_rows(torch.randn(1, 300), 8, False, config=dict(ROWS=1, BLOCK=300, num_warps=4)),
     ValueError, "BLOCK must be a power of two"),
    (lambda pw: quantize_rows(torch.randn(1, 300), 8, False, config=dict(ROWS=1, BLOCK=512, num_warps=4, SLICE=100)),
     ValueError, "SLICE"),
    (lambda pw: quantize_rows(torch.randn(1, 300), 8, False, config=dict(ROWS=1, BLOCK=512, num_warps=4, DIV_RCP=1)),
     ValueError, "DIV_RCP"),
])
def test_bad_input_is_a_clear_error(call, err, match):
    pw, _ = _packed()
    with pytest.raises(err, match=match):
        call(pw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a device mismatch")
def test_device_mismatch():
    pw, _ = _packed()
    with pytest.raises(ValueError, match="device"):
        w4a8_linear(torch.randn(3, 256, device="cuda", dtype=torch.float16), pw)


def _quantized_linear(recipe="w4a8-rtn-dint4", seed=0):
    """A ``QuantizedLinear`` of a tiny LLaMA: the graph's own codes / scale / zero-point tensors."""
    from conftest import tiny_model

    from qcompile.backends.triton import codes_ops  # noqa: F401  (registers the ops these tests call)
    from qcompile.backends.triton.qmodules import QuantizedLinear, quantize_linears

    torch.manual_seed(seed)
    qm = quantize_linears(tiny_model("llama"), recipe)
    return [m for m in qm.modules() if isinstance(m, QuantizedLinear)]


@pytest.mark.parametrize("recipe,act_fmt", [("w4a8-rtn-dint4", "int8"), ("w4a4-g64-rtn", "int4")])
def test_opcheck_lowering_ops(recipe, act_fmt):
    """The ops the lowering writes into the graph (``codes_ops.py``) pass opcheck: schema, fake tensors,
    autograd registration, AOT dispatch."""
    from qcompile.backends.triton.inductor_quant import quantize_per_token_ops

    ops = torch.ops.qcompile_triton
    lins = _quantized_linear(recipe)
    lin = lins[0]
    sibs = [m for m in lins if m.in_features == lin.in_features][:3]
    assert len(sibs) >= 2
    x = torch.randn(2, 3, lin.in_features, requires_grad=True)
    bias = torch.randn(lin.out_features)
    for b in (None, bias):
        torch.library.opcheck(ops.w4_linear_codes.default, (x, lin.codes, lin.scale, lin.zero_point, lin.fmt,
                                                            lin.granularity, lin.in_features, act_fmt, b))
    w = torch.randn(lin.out_features, lin.in_features)
    torch.library.opcheck(ops.w4_linear_rtn.default, (x, w, lin.fmt, lin.granularity, act_fmt, bias))
    torch.library.opcheck(ops.w4_linear_codes_shared.default,
                          (x.detach(), [m.codes for m in sibs], [m.scale for m in sibs], [m.zero_point for m in sibs],
                           lin.fmt, lin.granularity, lin.in_features, act_fmt, [None] * len(sibs)))
    if act_fmt == "int8":
        q = quantize_per_token_ops(x.detach(), "int8")
        torch.library.opcheck(ops.w4_linear_qcodes.default,
                              (*q, [m.codes for m in sibs], [m.scale for m in sibs], [m.zero_point for m in sibs],
                               lin.fmt, lin.in_features, act_fmt, [None] * len(sibs), torch.float32))


@pytest.mark.parametrize("bad,err,match", [
    (lambda x, lin: (x.double(), lin.codes), TypeError, "float16"),
    (lambda x, lin: (x[..., :-1], lin.codes), ValueError, "in_features"),
    (lambda x, lin: (x, lin.codes.float()), TypeError, "uint8"),
    (lambda x, lin: (x, lin.codes[:, :-1]), ValueError, "codes"),
])
def test_lowering_op_bad_input_is_a_clear_error(bad, err, match):
    lin = _quantized_linear()[0]
    x, codes = bad(torch.randn(3, lin.in_features), lin)
    with pytest.raises(err, match=match):
        torch.ops.qcompile_triton.w4_linear_codes(x, codes, lin.scale, lin.zero_point, lin.fmt, lin.granularity,
                                                  lin.in_features, "int8", None)
