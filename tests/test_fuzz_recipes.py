"""Fuzzing recipes: any dict, file or name is either a valid Recipe or a RecipeError, never anything else.

Valid recipes must also be usable: they round-trip through ``to_dict``/JSON, their formats parse, and
their seed seeds a torch generator for every decoder layer (the calibration engine seeds layer ``i``
with ``seed + i``).
"""
from __future__ import annotations

import dataclasses
import json
import math

import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from qcompile.recipes import PRESETS, Recipe, RecipeError, resolve_recipe

FIELDS = [f.name for f in dataclasses.fields(Recipe)]
MAX_LAYERS = 1000  # the engine seeds layer i with seed + i

# ------------------------------------------------------------------------------------- strategies
_garbage = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=4), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.tuples(st.text(max_size=3)),
)
# format-like names, including near misses ("dint4_c.", "int4_c0.25", "int08", "fp4_e2m1x")
_format_like = st.one_of(
    st.from_regex(r"(d?int|uint|fp4_|fp)[0-9]{0,3}(_sym)?(_c[0-9.]{0,6})?", fullmatch=True),
    st.sampled_from(["int4", "int8", "int3", "int2", "int4_sym", "int8_sym", "dint4", "dint3", "dint4_sym",
                     "dint4_c0.25", "dint4_c0.125", "fp4_e1m2", "fp4_e2m1", "fp4_e3m0", "fp4_e4m3", "int9",
                     "dint2", "dint4_c.", "dint4_c0.5.5", "int4_c0.25", ""]),
)
_long_number = st.integers(1, 5000).map(lambda n: "9" * n)   # beyond Python's int-from-string limit too
_granularity_like = st.one_of(
    st.sampled_from(["channel", "token", "tensor", "vchannel", "group", "group0", "group1", "group2", "group64",
                     "group128", "group-1", "Group64", " group64"]),
    st.from_regex(r"group[0-9]{0,6}", fullmatch=True),
    _long_number.map(lambda digits: "group" + digits),
)
_unit = st.floats(-0.5, 1.5, allow_nan=False)
_VALID_OR_NEAR = {
    "name": st.one_of(st.text(max_size=8), st.sampled_from(sorted(PRESETS))),
    "weight_format": st.one_of(st.none(), _format_like), "act_format": st.one_of(st.none(), _format_like),
    "v_format": st.one_of(st.none(), _format_like),
    "weight_granularity": _granularity_like, "act_granularity": _granularity_like,
    "scaling": st.sampled_from(["none", "smoothquant", "awq", "aqas", "gptq", "AWQ", ""]),
    "alpha": _unit, "fp16_ratio": _unit, "optq_damp": _unit,
    "scale_criterion": st.sampled_from(["max", "mean", "median"]),
    "scale_grid": st.integers(-5, 300), "optq_block_size": st.integers(-5, 4096),
    "clip_search": st.booleans(), "optq_act_order": st.booleans(), "fuse_layernorm": st.booleans(),
    "rounding": st.sampled_from(["rtn", "optq", "stochastic"]),
    "calib_source": st.sampled_from(["c4", "wiki", "pile"]),
    "calib_samples": st.integers(-5, 200_000), "calib_seq_len": st.integers(-5, 40_000),
    "skip": st.lists(st.sampled_from(["lm_head", "*.q_proj", "model.layers.0.mlp.down_proj"]), max_size=3),
    "seed": st.integers(-2**65, 2**65),
}
# values a valid recipe can hold (most drawn dicts should be valid, or the "valid" branch is barely run)
_VALID = {
    **{k: st.sampled_from(sorted({getattr(r, k) for r in PRESETS.values()}, key=str))
       for k in ("weight_format", "act_format", "v_format")},
    "weight_granularity": st.sampled_from(["channel", "group32", "group64", "group128"]),
    "act_granularity": st.sampled_from(["token", "group32", "group64", "group128"]),
    "scaling": st.sampled_from(["none", "smoothquant", "awq", "aqas"]), "rounding": st.sampled_from(["rtn", "optq"]),
    "alpha": st.floats(0, 1), "fp16_ratio": st.floats(0, 0.5), "optq_damp": st.floats(1e-4, 1),
    "scale_grid": st.integers(2, 200), "calib_samples": st.integers(1, 512), "calib_seq_len": st.integers(2, 4096),
    "seed": st.integers(0, 2**63 - 1), "name": st.text(min_size=1, max_size=8),
}
_ANY_SCALAR = st.one_of(st.integers(-10, 2_000_000), st.floats(-1, 2), st.booleans(), st.text(max_size=8))
_unknown_keys = st.one_of(st.sampled_from(["bits", "group", "group_size", "format", "Alpha", ""]),
                          st.integers(-3, 3), st.text(max_size=6).filter(lambda k: k not in FIELDS + ["preset"]))


@st.composite
def recipe_dicts(draw) -> dict:
    """A dict of recipe fields: mostly plausible values, some garbage, sometimes a preset or unknown keys."""
    d = {}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=8, unique=True)):
        kind = draw(st.integers(0, 9))   # 60% valid values, 30% near misses, 10% garbage
        near = _VALID_OR_NEAR.get(name, _ANY_SCALAR)   # fields added later are fuzzed too
        pool = _VALID.get(name, near) if kind < 6 else near if kind < 9 else _garbage
        d[name] = draw(pool)
    if draw(st.integers(0, 4)) == 0:
        d["preset"] = draw(st.one_of(st.sampled_from(sorted(PRESETS)), _garbage))
    if draw(st.integers(0, 9)) == 0:
        d[draw(_unknown_keys)] = draw(_garbage)
    return d


# ------------------------------------------------------------------------------------------ checks
def _check_usable(r: Recipe) -> None:
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    for spec in (r.weight_spec, r.act_spec, r.v_spec):
        assert spec is None or spec.bits >= 2
    assert r.weight_gran.kind in ("channel", "group") and r.act_gran.kind in ("token", "group")
    assert 0.0 <= r.alpha <= 1.0 and 0.0 <= r.fp16_ratio < 1.0 and math.isfinite(r.optq_damp)
    torch.Generator().manual_seed(r.seed)
    torch.Generator().manual_seed(r.seed + MAX_LAYERS)


def _check_error(e: RecipeError, d: dict) -> None:
    msg = str(e)
    assert msg and "\n" not in msg.strip() and len(msg) < 2000, msg
    named = [k for k in d if k != "preset"]
    if len(named) == 1 and "preset" not in d:   # a single bad field is named in the message
        key = named[0]
        assert str(key) in msg or repr(key)[:40] in msg or "quantizes nothing" in msg, msg


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(recipe_dicts())
@example({"weight_format": "dint4_c."})
@example({"weight_granularity": "group" + "9" * 5000})
@example({"preset": ["w4a8-rtn-int4"]})
@example({1: 2, "bits": 4})
@example({"seed": 2**64})
@example({"seed": -1})
def test_recipe_dicts_valid_or_recipe_error(d):
    try:
        r = Recipe.from_dict(d)
    except RecipeError as e:
        event("RecipeError")
        _check_error(e, d)
    else:
        event("valid")
        _check_usable(r)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=40),
                 st.lists(st.tuples(st.sampled_from(FIELDS + ["preset", "bits"]),
                                    st.sampled_from(["int4", "null", "true", "2.0", "-1", "[1, 2]", "{a: 1}",
                                                     "group64", "2001-01-01", "!!binary aGk=", "'x", "1e999",
                                                     ".nan", "~", "w4a8-rtn-int4", "0x10"])),
                          max_size=5).map(lambda kv: "\n".join(f"{k}: {v}" for k, v in kv))))
def test_recipe_yaml_files_valid_or_recipe_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("r") / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    _check_file(path)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(data=st.binary(max_size=64), suffix=st.sampled_from([".json", ".yaml"]))
@example(data=b"\xff\xfe{}", suffix=".json")
def test_recipe_binary_files_valid_or_recipe_error(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("r") / f"fuzz{suffix}"
    path.write_bytes(data)
    _check_file(path)


def _check_file(path):
    try:
        r = Recipe.load(path)
    except RecipeError as e:
        assert str(e) and "\n" not in str(e).strip()
    else:
        _check_usable(r)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=30), st.sampled_from(sorted(PRESETS)), st.sampled_from(["nope.json", "x.yml"])))
def test_resolve_recipe_names_valid_or_recipe_error(name):
    try:
        r = resolve_recipe(name)
    except RecipeError as e:
        assert str(e)
    else:
        _check_usable(r)
