"""`qcompile quantize` end to end on a tiny model folder: table, flat JSON, --save, --set, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import error_line, save_tiny_model, word_text

import qcompile
from qcompile import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def texts(tmp_path):
    ppl, calib = tmp_path / "eval.txt", tmp_path / "calib.txt"
    ppl.write_text(word_text(130, seed=3), encoding="utf-8")
    calib.write_text(word_text(400, seed=4), encoding="utf-8")
    return ppl, calib


pytestmark = pytest.mark.usefixtures("empty_home")


def test_rtn_quantize_table_json_and_save(model_dir, texts, tmp_path, capsys):
    ppl, _ = texts
    out, art = tmp_path / "r.json", tmp_path / "artifact"
    rc = cli.main(["quantize", "--model", str(model_dir), "--recipe", "w4a8v4-rtn-int4", "--ppl-text", str(ppl),
                   "--window", "32", "--save", str(art), "--json", str(out), "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "quantized" in printed and "ppl" in printed
    r = json.loads(out.read_text())
    assert r["recipe"] == "w4a8v4-rtn-int4"
    assert r["fp.ppl"] > 1 and r["quant.ppl"] > 1 and r["fp.ppl"] != r["quant.ppl"]
    assert r["quantize_seconds"] > 0 and "seconds.capture" in r and "seconds.passes" in r
    # the saved artifact reproduces the evaluated model
    qm = qcompile.load(art)
    ids = torch.randint(2, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    from qcompile.evaluate import perplexity
    from qcompile.models import load_tokenizer
    again = perplexity(qm, load_tokenizer(str(model_dir)), ppl.read_text(), window=32)["ppl"]
    assert again == pytest.approx(r["quant.ppl"], rel=1e-6)
    assert qm(ids).shape == (1, 32, 128)


def test_calibrated_quantize_with_overrides(model_dir, texts, tmp_path):
    ppl, calib = texts
    out = tmp_path / "r.json"
    rc = cli.main(["quantize", "--model", str(model_dir), "--recipe", "w4a8v4-rtn-dint4", "--set", "scaling=aqas",
                   "--set", "rounding=optq", "--set", "calib_samples=4", "--set", "calib_seq_len=32",
                   "--calib-text", str(calib), "--ppl-text", str(ppl), "--window", "32", "--no-fp",
                   "--json", str(out), "--threads", "1"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["recipe"].startswith("w4a8v4-rtn-dint4+scaling=aqas")
    assert "seconds.calibrate" in r and "fp.ppl" not in r


def test_list_recipes(capsys):
    assert cli.main(["quantize", "--list-recipes"]) == 0
    assert "w4a8v4-rtn-int4" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "w9a9-nothing"], "unknown recipe preset"),
    (["--set", "alpha=2.0"], "'alpha'"),
    (["--set", "bits=5"], "bits"),
    (["--set", "weight_granularity=group0"], "weight_granularity"),
    (["--set", "calib_seq_len=4096"], "calib_seq_len=4096"),  # longer than the calibration text
    (["--save", "/nonexistent-folder/art"], "does not exist"),
])
def test_bad_input_one_line_nothing_written(model_dir, texts, tmp_path, capsys, extra, message):
    ppl, calib = texts
    out = tmp_path / "r.json"
    argv = ["quantize", "--model", str(model_dir), "--recipe", "w4a8v4-rtn-int4", "--set", "scaling=aqas",
            "--calib-text", str(calib), "--ppl-text", str(ppl), "--window", "32", "--json", str(out),
            "--threads", "1"]
    # later --recipe wins in argparse; put the case's flags last
    assert cli.main(argv + extra) == 2
    line = error_line(capsys.readouterr().err)
    assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["calib.txt", "eval.txt"]
