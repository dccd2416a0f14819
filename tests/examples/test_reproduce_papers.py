"""examples/reproduce_papers.py renders only rows measured with today's recipe."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import reproduce_papers as R  # noqa: E402


def _entry(recipe, ppl):
    return {"recipe": None if recipe is None else recipe.to_dict(), "windows": 8, "ppl": ppl}


def test_stale_rows_are_not_shown_as_current():
    rows = dict((label, recipe) for label, _, recipe in R.TABLES["A"][1])
    old_main = rows["a-aqas-optq-dint4"].replace(clip_search=not rows["a-aqas-optq-dint4"].clip_search)
    data = {"fp32": _entry(None, 18.0), "a-rtn": _entry(rows["a-rtn"], 30.0),
            "a-aqas": _entry(rows["a-aqas"], 25.0), "a-aqas-optq-dint4": _entry(old_main, 20.0)}
    md = R.render_tables(data, ["A"], 8, {"machine": "test box"})
    line = next(x for x in md.splitlines() if "`w4a8v4-aqas-optq-dint4`" in x)
    assert "not re-run (recipe changed)" in line and "20.00" not in line
    assert "| 25.00 |" in next(x for x in md.splitlines() if "`w4a8v4-aqas-int4`" in x)
    assert "python examples/reproduce_papers.py --tables A --max-windows 8" in md
    assert "dINT4 + clip search improve AQAS + OPTQ: not measured" in md


def test_claims_ignore_rows_measured_with_another_recipe():
    rows = dict((label, recipe) for label, _, recipe in R.TABLES["A"][1])
    old_awq = rows["a-awq"].replace(alpha=0.25)
    data = {"fp32": _entry(None, 18.0), "a-rtn": _entry(rows["a-rtn"], 30.0),
            "a-aqas": _entry(rows["a-aqas"], 25.0), "a-awq": _entry(old_awq, 26.0)}
    md = R.render_tables(data, ["A"], 8, {"machine": "test box"})
    assert "AQAS beats AWQ (no OPTQ): not measured" in md
    data["a-awq"] = _entry(rows["a-awq"], 26.0)
    assert "AQAS beats AWQ (no OPTQ): yes (25.00 vs 26.00)" in R.render_tables(data, ["A"], 8, {"machine": "x"})


def test_stale_slac_rows_are_marked():
    label, _, recipe = R.slac_rows()[1]
    data = {"fp32": _entry(None, 18.0), "fp32-tasks": _entry(None, 18.0),
            "a-rtn": _entry(R.slac_rows()[0][2], 30.0), label: _entry(recipe.replace(sink_weight=1.0), 24.0)}
    md = R.render_slac(data, 8, 200, (), {"machine": "test box"})
    assert "†" in md and "earlier version of the main recipe" in md


def test_table_a_zero_shot_columns():
    rows = {label: recipe for label, _, recipe in R.TABLES["A"][1]}
    tasks = ("piqa", "arc-easy")

    def scored(recipe, ppl, accs, limit=200):
        return dict(_entry(recipe, ppl), task_limit=limit, tasks={t: {"acc": a} for t, a in zip(tasks, accs)})

    data = {"fp32": _entry(None, 18.0), "fp32-tasks": scored(None, 18.0, (0.6, 0.5)),
            "a-rtn": scored(rows["a-rtn"], 30.0, (0.5, 0.4)),
            "a-aqas": scored(rows["a-aqas"], 25.0, (0.55, 0.45), limit=100)}  # another item count: not shown
    md = R.render_tables(data, ["A"], 8, {"machine": "test box"}, tasks, 200)
    lines = md.splitlines()
    assert any(x.startswith("| method |") and x.rstrip().endswith("| piqa | arc-easy | avg |") for x in lines)
    assert "| FP32 | – | 18.00 |" in md and next(x for x in lines if x.startswith("| FP32 |")).endswith(
        "| 60.0 | 50.0 | 55.0 |")
    assert next(x for x in lines if "`w4a8v4-rtn-int4`" in x).endswith("| 50.0 | 40.0 | 45.0 |")
    assert next(x for x in lines if "`w4a8v4-aqas-int4`" in x).endswith("| – | – | – |")
    # without tasks the table keeps its six columns
    assert "| piqa |" not in R.render_tables(data, ["A"], 8, {"machine": "test box"})


def test_machine_line_comes_from_the_rows_shown():
    """The machine line names where the shown rows were measured, not where the last run (meta) was."""
    rows = dict((label, recipe) for label, _, recipe in R.TABLES["A"][1])
    box1, box2 = "box one, 2 torch threads", "box one, 1 torch thread"
    data = {"fp32": dict(_entry(None, 18.0), machine=box1), "a-rtn": dict(_entry(rows["a-rtn"], 30.0), machine=box1),
            "a-aqas": dict(_entry(rows["a-aqas"], 25.0), machine=box2),
            "g-unshown": dict(_entry(None, 1.0), machine="a GPU")}
    md = R.render_tables(data, ["A"], 8, {"machine": "last run's GPU"})
    assert f"on {box1} (rows of A); {box2} (rows of A)." in md and "GPU" not in md
    del data["a-aqas"]["machine"]  # rows older than the field fall back to the JSON's meta
    md = R.render_tables(data, ["A"], 8, {"machine": "last run's GPU"})
    assert f"on {box1} (rows of A); last run's GPU (rows of A)." in md
    label, _, recipe = R.slac_rows()[1]
    slac = {"fp32": data["fp32"], label: dict(_entry(recipe, 23.0), machine=box2)}
    assert f"on {box2}." in R.render_slac(slac, 8, 200, (), {"machine": "last run's GPU"})
