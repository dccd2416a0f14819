"""Model loading: supported families as data, clear errors for unsupported configs and bad weights."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from qcompile import models
from qcompile.errors import AssetError, ModelError


@pytest.fixture
def saved(tmp_path, family):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / family)
    return model, tmp_path / family


def test_tables_cover_the_same_families():
    assert set(models.SUPPORTED) == set(models.ARCHITECTURES) == {"opt", "llama"}


def test_architecture_names_resolve_on_real_modules(model):
    arch = models.architecture_of(model.config)
    layers = models.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    layer = layers[0]
    for group in arch.groups:
        producer = layer.get_submodule(group.producer)
        consumers = [layer.get_submodule(c) for c in group.consumers]
        assert all(isinstance(c, torch.nn.Linear) for c in consumers)
        if group.kind == "linear":
            assert isinstance(producer, torch.nn.Linear)
    # 7 linears per LLaMA layer (30 layers -> the 210 of SmolLM2), 6 per OPT layer
    assert len(arch.linears) == {"opt": 6, "llama": 7}[model.config.model_type]


def test_load_folder_roundtrip(saved):
    original, folder = saved
    loaded = models.load_model(folder)
    assert not loaded.training and loaded.config.use_cache is False and loaded.dtype == torch.float32
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_unsupported_architecture_lists_supported(tmp_path):
    import transformers

    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="'gpt2' is not supported.*opt.*llama"):
        models.load_model(tmp_path)


def test_post_layernorm_opt_is_refused(tmp_path):
    tiny_model("opt").config.__class__(do_layer_norm_before=False).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="do_layer_norm_before"):
        models.load_model(tmp_path)


def test_missing_weights_named(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no weights in .*model.safetensors"):
        models.load_model(tmp_path)


def test_truncated_weights_named(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError, match="model.safetensors is corrupt or truncated"):
        models.load_model(folder)


def test_incomplete_weights_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lack 1 tensor.*down_proj"):
        models.load_model(tmp_path)


def test_missing_shard_named(saved):
    _, folder = saved
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(ModelError, match="model-00001.safetensors"):
        models.load_model(folder)


def test_bad_sources(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        models.load_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="no config.json"):
        models.load_model(tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert models.resolve_source(gguf) == (tmp_path, "m.gguf")


def test_default_without_assets_says_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_HOME", str(tmp_path))
    with pytest.raises(AssetError, match="qcompile assets fetch"):
        models.load_model("default")


def _assets_or_skip(*names):
    from qcompile import assets

    try:
        for name in names:
            assets.asset_path(name)
    except AssetError:
        pytest.skip("needs `qcompile assets fetch`")


@pytest.mark.assets
def test_default_model_is_the_converted_smollm2():
    _assets_or_skip("smollm2")
    model = models.load_model("default")
    arch = models.architecture_of(model.config)
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3
    assert len(models.decoder_layers(model)) * len(arch.linears) == 210
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = models.load_tokenizer("default")
    assert tok.encode("Hello world", add_special_tokens=False) == tok("Hello world")["input_ids"]  # no BOS
