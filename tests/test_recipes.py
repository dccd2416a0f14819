"""Recipe validation: every bad field names the field, the value and what is allowed."""
import json

import pytest

from qcompile.recipes import PRESETS, Recipe, RecipeError, resolve_recipe


@pytest.mark.parametrize("field,value,msg", [
    ("weight_format", "int5x", "weight_format"),
    ("weight_format", "int9", "weight_format"),
    ("weight_granularity", "group0", "weight_granularity"),
    ("weight_granularity", "token", "weight_granularity"),
    ("act_granularity", "channel", "act_granularity"),
    ("alpha", 2.0, "alpha"),
    ("scaling", "gptq", "scaling"),
    ("rounding", "stochastic", "rounding"),
    ("calib_seq_len", 1, "calib_seq_len"),
    ("fp16_ratio", 1.5, "fp16_ratio"),
    ("fuse_layernorm", "yes", "fuse_layernorm"),
])
def test_bad_fields_are_named(field, value, msg):
    with pytest.raises(RecipeError, match=msg) as e:
        Recipe(**{field: value})
    assert repr(value) in str(e.value) or str(value) in str(e.value)


def test_unknown_field_and_preset():
    with pytest.raises(RecipeError, match="unknown field"):
        Recipe.from_dict({"bits": 4})
    with pytest.raises(RecipeError, match="unknown recipe preset 'nope'"):
        resolve_recipe("nope")


def test_nothing_quantized_is_an_error():
    with pytest.raises(RecipeError, match="quantizes nothing"):
        Recipe(weight_format=None, act_format=None)


def test_presets_are_valid_and_named():
    for name, r in PRESETS.items():
        assert r.name == name
        assert Recipe.from_dict(r.to_dict()) == r


def test_load_json_and_yaml(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"preset": "w4a8-rtn-int4", "weight_format": "dint4"}))
    r = resolve_recipe(str(p))
    assert r.weight_format == "dint4" and r.act_format == "int8" and r.name == "mine"
    y = tmp_path / "r.yaml"
    y.write_text("weight_format: int4\nact_format: null\nweight_granularity: group64\n")
    r = Recipe.load(y)
    assert r.act_format is None and r.weight_granularity == "group64" and r.name == "r"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid"):
        Recipe.load(bad)
