"""examples/sweep_recipe.py: how ``--vary`` is read and turned into recipes (the measuring part is
reproduce_common.measure, exercised by the reproduce scripts)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import sweep_recipe as S  # noqa: E402

from qcompile.recipes import PRESETS, RecipeError  # noqa: E402


def test_parse_changes_types():
    got = S.parse_changes("calib_samples=64, clip_search=true,scaling=none,optq_damp=0.1,v_format=None")
    assert got == {"calib_samples": 64, "clip_search": True, "scaling": "none", "optq_damp": 0.1,
                   "v_format": None}


@pytest.mark.parametrize("bad", ["calib_samples", "=3", "a=1,b"])
def test_parse_changes_rejects_malformed(bad):
    with pytest.raises(ValueError, match="field=value"):
        S.parse_changes(bad)


def test_build_rows_applies_changes_to_base():
    base = PRESETS["w4a8v4-aqas-optq-dint4"]
    rows = S.build_rows(base, ["clip_search=true", "calib_samples=64,optq_act_order=false"])
    assert [label for label, _ in rows] == ["base", "clip_search=True", "calib_samples=64,optq_act_order=False"]
    assert rows[0][1] is base
    r = rows[2][1]
    assert (r.calib_samples, r.optq_act_order, r.weight_format) == (64, False, base.weight_format)
    assert S.rtn_of(r).rounding == "rtn" and S.rtn_of(r).scaling == "none"


def test_build_rows_unknown_field_and_bad_value():
    base = PRESETS["w4a8v4-rtn-int4"]
    with pytest.raises(ValueError, match="unknown recipe field"):
        S.build_rows(base, ["calib_sampels=3"])
    with pytest.raises(RecipeError, match="calib_samples"):
        S.build_rows(base, ["calib_samples=0"])
