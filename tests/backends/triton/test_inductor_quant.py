"""inductor_quant: the int8 per-token activation quantization as torch ops (fused by Inductor), same codes."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import qcompile
from qcompile.backends.triton import dynamo
from qcompile.backends.triton.codes_ops import w4_linear_codes, w4_linear_qcodes
from qcompile.backends.triton.inductor_quant import quantize_in_inductor, quantize_per_token_ops
from qcompile.backends.triton.lower import lower_linears
from qcompile.backends.triton.reference import quantize_rows_reference
from qcompile.backends.triton.share_quant import share_activation_quantization

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def _activations(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 96, generator=g) * torch.logspace(-3, 2, 96)
    x[0, 0] = 0.0                      # an all-zero token: scale clamps to 1e-8
    x[1, 1] = x[1, 1].abs()            # all positive: lo = 0
    x[2, 2, :48] = 0.5 * 255 / 96      # exact ties of x / scale land on .5
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act_fmt", ["int8", "int8_sym"])
def test_ops_equal_the_reference_quantizer(dtype, act_fmt):
    x = _activations(dtype)
    codes, scale, zp = quantize_per_token_ops(x, act_fmt)
    ref = quantize_rows_reference(x.reshape(-1, 96), 8, act_fmt == "int8_sym")
    assert torch.equal(codes.reshape(-1, 96), ref[0])
    assert torch.equal(scale.reshape(-1), ref[1].reshape(-1))
    assert torch.equal(zp.reshape(-1), ref[2].reshape(-1))


def test_ops_compiled_by_inductor_keep_the_codes():
    """Inductor (CPU codegen here; the GPU test covers Triton) must not re-associate the float64 divisions."""
    x = _activations(torch.float16, seed=1)
    torch._dynamo.reset()
    compiled = torch.compile(quantize_per_token_ops, backend="inductor")
    for got, want in zip(compiled(x, "int8"), quantize_per_token_ops(x, "int8")):
        assert torch.equal(got, want)


def test_bad_activation_format():
    with pytest.raises(ValueError, match="int8 / int8_sym"):
        quantize_per_token_ops(torch.randn(2, 8), "int4")


def _rewritten(qm, rewrite: bool):
    """qm compiled with lowbit's passes, the last one run for CPU inputs, executed eagerly."""
    counts = []

    def backend(gm, example_inputs):
        lower_linears(gm, example_inputs)
        share_activation_quantization(gm)
        if rewrite:
            counts.append(quantize_in_inductor(gm, devices=("cpu",)))
            assert "w4_linear_codes" not in str(gm.graph)  # every site took the codes form
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(qm, backend=backend)(IDS)
    return (out.logits if hasattr(out, "logits") else out[0]), counts


@pytest.mark.parametrize("arch,recipe,sites", [("llama", "w4a8-rtn-dint4", 8), ("opt", "w4a8-rtn-int4", 8)])
def test_rewritten_graph_gives_the_same_logits(arch, recipe, sites):
    """LLaMA per layer: qkv group, o, gate/up group, down (4 calls, 2 layers); OPT: qkv group, out, fc1, fc2."""
    qm = qcompile.quantize(tiny_model(arch), recipe, progress=False)
    before, _ = _rewritten(qm, False)
    after, counts = _rewritten(qm, True)
    assert counts == [sites]
    assert torch.equal(before, after)


def test_qcodes_op_equals_the_float_op():
    from qcompile.backends.triton.qmodules import QuantizedLinear, quantize_linears

    qm = quantize_linears(tiny_model("llama"), "w4a8-rtn-dint4")
    lin = next(m for m in qm.modules() if isinstance(m, QuantizedLinear))
    x = torch.randn(2, 3, lin.in_features)
    want = w4_linear_codes(x, lin.codes, lin.scale, lin.zero_point, lin.fmt, lin.granularity, lin.in_features,
                           "int8", None)
    (got,) = w4_linear_qcodes(*quantize_per_token_ops(x, "int8"), [lin.codes], [lin.scale], [lin.zero_point],
                              lin.fmt, lin.in_features, "int8", [None], x.dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad,match", [
    (lambda q: (q[0].float(), q[1], q[2]), "activation codes int8"),
    (lambda q: (q[0], q[1][..., :0], q[2]), r"scales and zero-points \[\.\.\., 1\]"),
    (lambda q: (q[0][..., :-1], q[1], q[2]), r"codes \[\.\.\., 64\]"),
])
def test_qcodes_op_rejects_bad_activations(bad, match):
    q = quantize_per_token_ops(torch.randn(2, 64), "int8")
    w = torch.zeros(8, 32, dtype=torch.uint8)
    s, z = torch.ones(8, 1), torch.zeros(8, 1)
    with pytest.raises(ValueError, match=match):
        w4_linear_qcodes(*bad(q), [w], [s], [z], "int4", 64, "int8", [None], torch.float32)


def test_lowbit_option_is_known_and_off_on_cpu():
    """On CPU the option is accepted and rewrites nothing (no CUDA inputs)."""
    qm = qcompile.quantize(tiny_model("llama"), "w4a8-rtn-dint4", progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(qm, backend="lowbit", options={"inductor": False, "inductor_quant": True})(IDS)
    assert dynamo.last_report().inductor_quant == 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("act_fmt", ["int8", "int8_sym"])
def test_gpu_inductor_codes_equal_the_kernel(dtype, act_fmt):
    """Inductor's Triton code for the torch ops (alone, no producer to fuse) = quantize_rows, bitwise."""
    from qcompile.backends.triton.quantize_kernel import quantize_rows

    x = (torch.randn(37, 4096 + 64, device="cuda") * torch.logspace(-2, 1, 4160, device="cuda")).to(dtype)
    torch._dynamo.reset()
    got = torch.compile(quantize_per_token_ops)(x, act_fmt)
    want = quantize_rows(x, 8, act_fmt == "int8_sym")
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1].view(-1), want[1].view(-1)) and torch.equal(got[2].view(-1), want[2].view(-1))


@cuda
@pytest.mark.parametrize("m", [1, 40])
def test_gpu_lowbit_with_inductor_quant(m):
    """fp16 tiny LLaMA: every site takes Inductor's codes; logits agree with the unfused graph (float16 rounding
    of the producer is the only difference, module docstring)."""
    from qcompile.backends.triton.qmodules import quantize_linears

    model = quantize_linears(tiny_model("llama").half().cuda(), "w4a8-rtn-dint4")
    ids = torch.randint(0, 128, (1, m), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    outs, reports = [], []
    for on in (False, True):
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend="lowbit", options={"inductor_quant": on})(ids)
        outs.append(out.logits.float())
        reports.append(dynamo.last_report())
    assert reports[0].inductor_quant == 0 and reports[1].inductor_quant == 8
    err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    print(f"m={m}: inductor_quant vs unfused rel. err {err:.1e}, bitwise equal {torch.equal(outs[0], outs[1])}")
    assert err < 1e-2  # H200: 5.2e-3 (m = 1), 4.8e-3 (m = 40); a wrong scale or zero-point gives O(1)
