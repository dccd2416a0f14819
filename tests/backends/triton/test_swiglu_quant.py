"""swiglu_quant: a SwiGLU down projection quantizes ``silu(gate) * up`` itself (one Inductor kernel less)."""
from __future__ import annotations

import pytest
import torch
from conftest import lowbit_logits, tiny_model

import qcompile
from qcompile.backends.triton.ops import _swiglu_quantize_op as swiglu_quantize

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("family,fused", [("llama", 2), ("gqa", 2), ("opt", 0)])
def test_down_projections_take_the_product(family, fused):
    """LLaMA: both layers' down projections; OPT has no SwiGLU. Same logits as without the pass (on CPU the
    ops compute silu * up with torch, as the graph did)."""
    qm = qcompile.quantize(tiny_model(family), "w4a8-rtn-dint4", progress=False)
    plain, rep_plain = lowbit_logits(qm, IDS)
    got, rep = lowbit_logits(qm, IDS, swiglu_quant=True)
    assert rep_plain.swiglu_fused == 0 and rep.swiglu_fused == fused
    assert ("silu(gate) * up" in rep.summary()) == bool(fused)
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)


def test_op_is_the_reference_of_the_product():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(2, 3, 40, generator=g), torch.randn(2, 3, 40, generator=g)
    codes, scale, zp = swiglu_quantize(gate, up, "int8")
    want = torch.ops.qcompile_triton.quantize_per_token(torch.nn.functional.silu(gate) * up, "int8")
    assert codes.shape == (2, 3, 40) and scale.shape == zp.shape == (2, 3, 1)
    assert all(torch.equal(a, b) for a, b in zip((codes, scale, zp), want))
    torch.library.opcheck(torch.ops.qcompile_triton.swiglu_quantize_per_token.default, (gate, up, "int8_sym"))


def test_op_rejects_bad_input():
    gate = torch.randn(3, 8)
    with pytest.raises(ValueError, match="must match"):
        swiglu_quantize(gate, torch.randn(3, 9), "int8")
    with pytest.raises(ValueError, match="must match"):
        swiglu_quantize(gate, gate.half(), "int8")
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        swiglu_quantize(gate.int(), gate.int(), "int8")
    with pytest.raises(ValueError, match="int8"):
        swiglu_quantize(gate, gate, "int4")
