"""norm_quant: at decode the residual add + LLaMA RMSNorm run inside the next activation quantization."""
from __future__ import annotations

import pytest
import torch
from conftest import lowbit_logits, tiny_model

from qcompile.backends.triton.ops import _rmsnorm_quantize_op as norm_quantize
from qcompile.backends.triton.qmodules import quantize_linears


@pytest.mark.parametrize("family,fused", [("llama", 4), ("gqa", 4), ("opt", 0)])
def test_decode_norms_are_fused_and_the_logits_stay(family, fused):
    """Decode (one token): both norms of both layers (layer 0's input norm without a residual add); OPT's
    LayerNorm is not matched. Prefill (18 tokens) is left alone. On CPU the op computes the norm with torch
    ops, as the graph did: the same logits."""
    model = quantize_linears(tiny_model(family), "w4a8-rtn-dint4").eval()
    one = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(1))
    plain, rep_plain = lowbit_logits(model, one)
    got, rep = lowbit_logits(model, one, norm_quant=True)
    assert rep_plain.norm_fused == 0 and rep.norm_fused == fused
    assert ("RMSNorms run inside" in rep.summary()) == bool(fused)
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)
    _, rep_prefill = lowbit_logits(model, torch.randint(0, 128, (2, 9)), norm_quant=True)
    assert rep_prefill.norm_fused == 0


def test_op_is_the_norm_then_the_quantization():
    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(2, 3, 64, generator=g), torch.randn(2, 3, 64, generator=g), torch.rand(64, generator=g)
    h, codes, scale, zp = norm_quantize(x, r, w, 1e-5, "int8")
    hh = x + r
    v = w * (hh * torch.rsqrt(hh.pow(2).mean(-1, keepdim=True) + 1e-5))
    want = torch.ops.qcompile_triton.quantize_per_token(v, "int8")
    assert torch.equal(h, hh) and all(torch.equal(a, b) for a, b in zip((codes, scale, zp), want))
    assert norm_quantize(x, None, w, 1e-5, "int8")[0].numel() == 0
    torch.library.opcheck(torch.ops.qcompile_triton.rmsnorm_quantize_per_token.default, (x, r, w, 1e-6, "int8_sym"))
    torch.library.opcheck(torch.ops.qcompile_triton.rmsnorm_quantize_per_token.default, (x, None, w, 1e-6, "int8"))


def test_op_rejects_bad_input():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="residual must match"):
        norm_quantize(x, torch.randn(3, 9), torch.ones(8), 1e-5, "int8")
    with pytest.raises(ValueError, match="weight must be"):
        norm_quantize(x, None, torch.ones(9), 1e-5, "int8")
    with pytest.raises(ValueError, match="weight must be"):
        norm_quantize(x, None, torch.ones(8).half(), 1e-5, "int8")
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        norm_quantize(x.int(), None, torch.ones(8), 1e-5, "int8")
    with pytest.raises(ValueError, match="int8"):
        norm_quantize(x, None, torch.ones(8), 1e-5, "int4")
