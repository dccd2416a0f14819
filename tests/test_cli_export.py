"""`qcompile export`: both ONNX forms from one trace, --check parity, exporting a saved artifact, bad input."""
from __future__ import annotations

import json

import pytest
from conftest import save_tiny_model, word_text

from qcompile import cli

pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("empty_home")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-opt"), "opt")


def test_export_both_forms_with_check(model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(word_text(200), encoding="utf-8")
    out, res = tmp_path / "m.onnx", tmp_path / "r.json"
    rc = cli.main(["export", "--model", str(model_dir), "--recipe", "w4a8-rtn-dint4", "--out", str(out),
                   "--form", "both", "--check", "--check-text", str(text), "--window", "64", "--max-windows", "2",
                   "--json", str(res), "--threads", "1"])
    assert rc == 0
    r = json.loads(res.read_text())
    assert out.is_file() and (tmp_path / "m.fast.onnx").is_file()
    assert r["parity.exact.batches"] == 2
    assert r["parity.exact.reference_attention"] == "math"
    assert abs(r["parity.exact.ppl_rel_diff"]) < 1e-3  # exact form: the reference numerics
    assert abs(r["parity.fast.ppl_rel_diff"]) < 0.05


def test_export_saved_artifact(model_dir, tmp_path):
    art = tmp_path / "art"
    assert cli.main(["quantize", "--model", str(model_dir), "--recipe", "w8a8-rtn", "--ppl-text", str(tmp_path / "x"),
                     "--save", str(art)]) == 2  # missing text: nothing saved
    assert not art.exists()
    text = tmp_path / "x"
    text.write_text(word_text(100), encoding="utf-8")
    assert cli.main(["quantize", "--model", str(model_dir), "--recipe", "w8a8-rtn", "--ppl-text", str(text),
                     "--window", "32", "--no-fp", "--save", str(art), "--threads", "1"]) == 0
    out = tmp_path / "a.onnx"
    assert cli.main(["export", "--artifact", str(art), "--out", str(out), "--threads", "1"]) == 0
    assert out.is_file()


@pytest.mark.parametrize("extra, message", [
    (["--opset", "17"], "opset 17 is not supported"),
    (["--out", "/nonexistent/m.onnx"], "does not exist"),
])
def test_export_bad_input(model_dir, tmp_path, capsys, extra, message):
    argv = ["export", "--model", str(model_dir), "--out", str(tmp_path / "m.onnx")] + extra
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.glob("*.onnx")) == []
