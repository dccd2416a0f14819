"""capture: torch.export of tiny OPT / LLaMA / GQA-LLaMA equals eager at any batch and sequence length."""
import pytest
import torch
from conftest import tiny_model

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


def test_capture_falls_back_to_eager_attention_when_sdpa_guards_fail(monkeypatch):
    """On CUDA (torch 2.11) fused SDPA adds sequence-length guards that fail a dynamic export; capture
    then traces the eager attention, gives the same logits and leaves the user's setting alone."""
    import qcompile.capture as cap

    model = tiny_model("gqa")
    assert model.config._attn_implementation == "sdpa"
    real, tried = cap._export, []

    def sdpa_fails(m, *args):
        tried.append(m.config._attn_implementation)
        if m.config._attn_implementation == "sdpa":
            raise RuntimeError("Constraints violated (seq)")
        return real(m, *args)

    monkeypatch.setattr(cap, "_export", sdpa_fails)
    gm = cap.capture(model)
    assert tried == ["sdpa", "eager"]
    assert model.config._attn_implementation == "sdpa"
    x = torch.randint(0, 100, (2, 29))
    with torch.no_grad():
        assert (gm(x) - model(x).logits).abs().max() <= 1e-5


def test_capture_lets_export_infer_the_sequence_range_as_a_last_resort(monkeypatch):
    """torch 2.11 cannot prove min(64*seq, 192*seq) == 64*seq for a named Dim (GQA 9/3 heads):
    capture's last try is Dim.DYNAMIC for the sequence; the graph still takes any length."""
    import qcompile.capture as cap

    model = tiny_model("gqa")
    real, tried = cap._export, []

    def named_dims_fail(m, ids, batch, seq):
        tried.append((m.config._attn_implementation, seq is torch.export.Dim.DYNAMIC))
        if seq is not torch.export.Dim.DYNAMIC:
            raise RuntimeError("Constraints violated (seq)")
        return real(m, ids, batch, seq)

    monkeypatch.setattr(cap, "_export", named_dims_fail)
    gm = cap.capture(model)
    assert tried == [("sdpa", False), ("eager", False), ("eager", True)]
    for shape in [(1, 2), (1, 41), (3, 9)]:
        x = torch.randint(0, 100, shape)
        with torch.no_grad():
            assert (gm(x) - model(x).logits).abs().max() <= 1e-5
