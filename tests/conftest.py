"""Shared fixtures: tiny random-weight OPT, LLaMA and GQA-LLaMA models built from configs (no download)."""
from __future__ import annotations

import os
import re

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(family: str, **overrides):
    """A small config of a supported family; ``family`` in {"opt", "llama", "gqa"}."""
    import transformers

    if family == "opt":
        cfg = dict(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True)
        cfg.update(overrides)
        return transformers.OPTConfig(**cfg)
    heads_kv = 2 if family == "gqa" else 4
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=heads_kv, max_position_embeddings=256,
               tie_word_embeddings=False)
    cfg.update(overrides)
    return transformers.LlamaConfig(**cfg)


def tiny_model(family: str, seed: int = 0, **overrides):
    """Random-weight model in eval mode, float32, eager attention-free of caches."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cls = transformers.OPTForCausalLM if family == "opt" else transformers.LlamaForCausalLM
    model = cls(cfg).eval()
    # Random init gives near-zero norms' spread; make norm affines non-trivial so fusion is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def logits_of(out):
    """The logits of a model's output (an HF output object, a tuple, or a tensor)."""
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


def lowbit_logits(model, ids, **options):
    """``(logits, lowering report)`` of ``model(ids)`` compiled with ``backend="lowbit"`` and
    ``options={"inductor": False, **options}`` (dynamo reset first; no grad)."""
    from qcompile.backends.triton import dynamo

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="lowbit", options={"inductor": False, **options})(ids)
    return logits_of(out), dynamo.last_report()


@pytest.fixture(params=["opt", "llama", "gqa"])
def family(request):
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 16), generator=g)


WORDS = [f"w{i}" for i in range(100)]


def word_tokenizer():
    """An offline word-level HF tokenizer over WORDS (ids < 128, the tiny models' vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def word_text(n_words: int, seed: int = 3) -> str:
    """Random text over WORDS (every word one token of ``word_tokenizer``)."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g))


def save_tiny_model(folder, family: str = "llama", **overrides):
    """A tiny model + word tokenizer saved as an HF folder (what `--model DIR` reads)."""
    tiny_model(family, **overrides).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """``QCOMPILE_HOME`` in ``tmp_path``: the CLI sees no asset the test did not make (the CLI test modules
    use it for every test through ``pytestmark``)."""
    monkeypatch.setenv("QCOMPILE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


_PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+")  # a tqdm bar (model loading prints one): progress, not an error


def error_line(err: str) -> str:
    """The single ``qcompile: error: ...`` line a failed CLI call leaves on stderr (progress bars aside),
    asserting there is nothing else: no second line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip() and not _PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("qcompile: error: "), err
    assert "Traceback" not in err
    return lines[0]
