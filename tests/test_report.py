"""qcompile.report and ``qcompile report``: files written, numbers in the JSON, HTML escaped, CLI and artifacts."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model, tiny_model, word_text

from qcompile.cli import main

IDS = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from qcompile.report import build_report

    out = tmp_path_factory.mktemp("rep")
    return build_report(tiny_model("gqa"), IDS, out, recipe="w4a8v4-rtn-dint4", err_tokens=64, progress=False)


def test_files_and_numbers(built):
    out = built["html"].parent
    assert {p.name for p in out.iterdir()} >= {"report.html", "report.json", "sqnr.png", "error_split.png",
                                                 "ranges.png", "outliers.png", "passes"}
    n = json.loads(built["json"].read_text())
    assert [e["name"] for e in n["pass_log"]] == ["fold_scales", "quantize_weights", "insert_act_qdq", "cleanup"]
    assert all((out / e["diff"]).is_file() for e in n["pass_log"])
    assert len(n["layers"]) == 14 and n["layers"][0]["weight"] == "dint4"
    # ranges: 32 and 128 tokens fit in 160; prefixes of one causal run, so the range can only widen
    r0 = n["ranges"]["inputs"][0]
    assert list(r0["max"]) == ["32", "128"]
    assert r0["max"]["128"] >= r0["max"]["32"] and r0["min"]["128"] <= r0["min"]["32"]
    assert len(n["ranges"]["inputs"]) == 2 * 4 + 1  # per layer: q/k/v, o, gate/up, down inputs; + lm_head
    assert n["ranges"]["inputs"][0]["input"] == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"
    assert n["split_summary"]["dint4_lowers_underflow"] is True
    assert n["backends"] is None


def test_ranges_match_separate_short_runs():
    """The prefix trick: the range of the first 32 tokens of a long run is the range of a 32-token run."""
    from qcompile.capture import capture
    from qcompile.debug import record_linears
    from qcompile.report.ranges import RangeCollector

    gm = capture(tiny_model("llama"))
    long_, short = RangeCollector((32, 128)), RangeCollector((32,))
    record_linears(gm, IDS[:, :128], on_input=long_)
    record_linears(gm, IDS[:, :32], on_input=short)
    for a, b in zip(long_.inputs, short.inputs):
        assert a["max"]["32"] == pytest.approx(b["max"]["32"], rel=1e-5)
        assert a["min"]["32"] == pytest.approx(b["min"]["32"], rel=1e-5)


def test_html_escapes_names(tmp_path):
    from qcompile.recipes import Recipe
    from qcompile.report import build_report

    recipe = Recipe("<script>alert(1)</script>", weight_format="int4", act_format="int8")
    res = build_report(tiny_model("llama"), IDS[:, :40], tmp_path, recipe=recipe, err_tokens=32, progress=False)
    page = res["html"].read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the page's own script


def test_cli_report_and_artifact_reuse(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    text = tmp_path / "t.txt"
    text.write_text(word_text(400))
    art, out1, out2 = tmp_path / "art", tmp_path / "r1", tmp_path / "r2"
    common = ["--model", str(model_dir), "--text", str(text), "--calib-text", str(text), "--err-tokens", "48",
              "--threads", "1"]
    assert main(["report", *common, "--recipe", "w4a8-rtn-int4", "--out", str(out1), "--artifact", str(art),
                 "--json", str(tmp_path / "a.json")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["linears"] == 14 and first["figures"] == 4 and (art / "manifest.json").is_file()
    argv = ["report", *common, "--out", str(out2), "--artifact", str(art), "--json", str(tmp_path / "b.json")]
    assert main(argv) == 0
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["recipe"] == "w4a8-rtn-int4"
    # the loaded artifact is the same model: same numbers
    assert second["worst_sqnr_e2e_db"] == pytest.approx(first["worst_sqnr_e2e_db"], abs=1e-4)
    n2 = json.loads((out2 / "report.json").read_text())
    assert n2["pass_dumps"] is False and "artifact" in (out2 / "report.html").read_text()
    capsys.readouterr()
    assert main(["report", *common, "--recipe", "w8a8-rtn", "--out", str(out2), "--artifact", str(art)]) == 2
    assert "holds recipe 'w4a8-rtn-int4'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--backends", "reference,tpu"], "unknown tpu"),
    (["--tol", "2"], "--tol must be in (0, 1)"),
    (["--tokens", "1"], "at least 2"),
])
def test_cli_bad_input(tmp_path, capsys, argv, message):
    assert main(["report", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
