"""Rotation (qcompile/rotation.py): orthogonal, FP outputs unchanged, input untouched, errors, pipeline."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from qcompile.errors import ModelError
from qcompile.rotation import random_rotation, rotate_model


@pytest.mark.parametrize("d", [1, 8, 9, 64, 576, 96])
def test_rotation_is_orthogonal_and_seeded(d):
    q = random_rotation(d, seed=3)
    assert q.shape == (d, d) and q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, random_rotation(d, seed=3))
    if d > 1:
        assert not torch.equal(q, random_rotation(d, seed=4))


def test_rotation_spreads_a_spike():
    """A one-hot channel (an outlier channel) becomes flat: max |entry| = 1/sqrt(d) for a power of two."""
    q = random_rotation(64, seed=0)
    torch.testing.assert_close(q[5].abs(), torch.full((64,), 64 ** -0.5, dtype=torch.float64))


@pytest.mark.parametrize("fam,extra", [("llama", {}), ("gqa", {}), ("llama", {"tie_word_embeddings": True}),
                                       ("gqa", {"attention_bias": True})])
def test_rotated_model_has_the_same_logits(fam, extra, input_ids):
    model = tiny_model(fam, **extra)
    if extra.get("attention_bias"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rotated = rotate_model(model, seed=0)
    with torch.no_grad():
        ref, out = model(input_ids).logits, rotated(input_ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for k, v in model.state_dict().items():  # the input model is untouched (tied head included)
        assert torch.equal(v, before[k]), k
    assert model.config.tie_word_embeddings == extra.get("tie_word_embeddings", False)
    assert not rotated.config.tie_word_embeddings
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    norms = [m.weight for n, m in rotated.named_modules() if n.endswith("norm")]
    assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)
    # the weights really changed basis (an identity "rotation" would also keep the logits)
    w0, w1 = model.model.layers[0].self_attn.q_proj.weight, rotated.model.layers[0].self_attn.q_proj.weight
    assert (w0 - w1).norm() > 0.5 * w0.norm()


def test_opt_is_refused():
    with pytest.raises(ModelError, match="LayerNorm"):
        rotate_model(tiny_model("opt"))


def test_rotate_recipe_in_the_pipeline(input_ids):
    """quantize(..., rotate=True): runs, and spreads an outlier input column over all columns so per-channel
    W4A8 RTN loses less than without the rotation (the column sets every row's scale without it)."""
    import qcompile
    from qcompile.recipes import Recipe

    model = tiny_model("llama", num_hidden_layers=1)
    with torch.no_grad():  # an outlier input channel of every reader of the residual
        for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            model.model.layers[0].get_submodule(lin).weight[:, 3] *= 20
    with torch.no_grad():
        ref = model(input_ids).logits
    errs = {}
    for rotate in (False, True):
        r = Recipe(name=f"rot{rotate}", weight_format="int4", act_format="int8", rotate=rotate)
        qm = qcompile.quantize(model, r, progress=False)
        with torch.no_grad():
            out = qm(input_ids)
        errs[rotate] = ((out - ref).norm() / ref.norm()).item()
        assert qm.seconds.get("rotate") is not None if rotate else "rotate" not in qm.seconds
    assert errs[True] < 0.8 * errs[False], errs  # measured 0.13 vs 0.20


def test_rotate_field_must_be_bool():
    from qcompile.recipes import Recipe, RecipeError
    with pytest.raises(RecipeError, match="rotate"):
        Recipe(rotate="yes")
