"""`qcompile passes`: one graph + diff per pass, a pass log and a per-linear SQNR table."""
from __future__ import annotations

import json

import pytest
from conftest import save_tiny_model, word_text

from qcompile import cli

pytestmark = pytest.mark.usefixtures("empty_home")


@pytest.mark.parametrize("family, n_linears", [("opt", 2 * 6), ("gqa", 2 * 7)])
def test_passes_dump_and_sqnr_table(tmp_path, capsys, family, n_linears):
    model_dir = save_tiny_model(tmp_path / "model", family)
    text = tmp_path / "calib.txt"
    text.write_text(word_text(300), encoding="utf-8")
    dump, out = tmp_path / "dump", tmp_path / "r.json"
    rc = cli.main(["passes", "--model", str(model_dir), "--recipe", "w4a8v4-rtn-dint4", "--set", "fuse_layernorm=true",
                   "--dump-dir", str(dump), "--calib-text", str(text), "--tokens", "64", "--json", str(out),
                   "--threads", "1"])
    assert rc == 0
    r = json.loads(out.read_text())
    names = sorted(p.name for p in dump.iterdir())
    assert names[0] == "00_captured.txt"
    graphs = [n for n in names if n.endswith(".txt")]
    diffs = [n for n in names if n.endswith(".diff")]
    assert len(graphs) == r["passes"] + 1 and len(diffs) == r["passes"]
    assert any("fuse_layernorm" in n for n in diffs) and any("quantize_weights" in n for n in diffs)
    assert "qcompile.dequantize_weight" in (dump / [n for n in graphs if "quantize_weights" in n][0]).read_text()
    assert r["linears"] == n_linears == r["pass.quantize_weights.matches"]
    rows = json.loads((dump / "linears.json").read_text())
    assert all(5.0 < row["sqnr_local_db"] < 60.0 for row in rows)  # 4-bit: noisy but far from garbage
    assert "SQNR local dB" in capsys.readouterr().out


def test_passes_needs_writable_dump_dir(tmp_path, capsys):
    rc = cli.main(["passes", "--model", "default", "--dump-dir", "/nonexistent/dir"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
