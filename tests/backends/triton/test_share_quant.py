"""share_quant: sibling W4A8 linears of one input (q/k/v, gate/up) quantize it once, with the same numbers."""
from __future__ import annotations

import pytest
import torch
from conftest import logits_of, lowbit_logits, tiny_model

import qcompile

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch,recipe,groups", [("llama", "w4a8-rtn-dint4", 4), ("opt", "w4a8-rtn-int4", 2)])
def test_siblings_share_one_quantization(arch, recipe, groups):
    """LLaMA: q/k/v and gate/up per layer (2 layers); OPT: q/k/v. Outputs bitwise equal to unshared."""
    qm = qcompile.quantize(tiny_model(arch), recipe, progress=False)
    alone, rep_alone = lowbit_logits(qm, IDS, share_quant=False)
    shared, rep_shared = lowbit_logits(qm, IDS)
    assert rep_alone.shared_groups == 0 and rep_shared.shared_groups == groups
    assert "share one activation quantization" in rep_shared.summary()
    assert torch.equal(alone, shared)
    with torch.no_grad():
        reference = logits_of(qm(IDS))
    assert torch.allclose(shared, reference, rtol=1e-4, atol=1e-4)


def test_w4a4_group_sites_are_not_shared():
    qm = qcompile.quantize(tiny_model("llama"), "w4a4-g64-rtn", progress=False)
    _, report = lowbit_logits(qm, IDS)
    assert report.shared_groups == 0


def test_shared_op_checks_its_lists():
    from qcompile.backends.triton.codes_ops import w4_linear_codes_shared

    with pytest.raises(ValueError, match="differ in length"):
        w4_linear_codes_shared(torch.randn(2, 64), [torch.zeros(8, 32, dtype=torch.uint8)], [], [], "dint4",
                               "channel", 64, "int8", [None])
