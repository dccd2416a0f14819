"""The CLI: a tiny model folder end to end, --json output, one-line errors with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import WORDS, error_line, tiny_model, word_tokenizer

from qcompile import cli, evaluate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, 100, (130,), generator=g)), encoding="utf-8")
    return path


pytestmark = pytest.mark.usefixtures("empty_home")


def test_eval_ppl_text_writes_flat_json(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "--model", str(model_dir), "--ppl-text", str(text_file), "--window", "32",
                   "--max-windows", "3", "--threads", "1", "--json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    from qcompile.models import load_model, load_tokenizer

    expected = evaluate.perplexity(load_model(model_dir), load_tokenizer(model_dir), text_file.read_text(),
                                   window=32, max_windows=3, progress=False)
    assert results["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)
    assert results["ppl.windows"] == 3 and results["ppl.tokens"] == 93
    assert all(not isinstance(v, (dict, list)) for v in results.values())
    assert "ppl" in capsys.readouterr().out                         # the table
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_eval_zero_shot_keys(model_dir, tmp_path, monkeypatch):
    rows = [{"goal": "w1 w2", "sol1": "w3", "sol2": "w4 w5", "label": 1}] * 3
    monkeypatch.setattr(evaluate, "load_task_rows", lambda task: rows)
    out = tmp_path / "r.json"
    assert cli.main(["eval", "--model", str(model_dir), "--tasks", "piqa", "--limit", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["piqa.n"] == 2 and {"piqa.acc", "piqa.acc_norm", "piqa.acc_stderr"} <= set(results)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--tasks", "wiki-ppl,mmlu"], "unknown task.*mmlu"),
    (["eval", "--tasks", "wiki-ppl"], "qcompile assets fetch"),                  # no assets in this home
    (["eval", "--model", "/nonexistent/model", "--tasks", "piqa"], "not found"),
    (["eval", "--ppl-text", "/nonexistent/t.txt"], "cannot read --ppl-text"),
    (["eval", "--json", "/nonexistent/dir/r.json"], "folder /nonexistent/dir does not exist"),
    (["assets", "verify"], "failed verification.*qcompile assets fetch"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys):
    import re

    assert cli.main(argv) == 2
    assert re.search(message, error_line(capsys.readouterr().err))


def test_debug_shows_the_traceback(capsys):
    assert cli.main(["eval", "--tasks", "nope", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--max-windows", "many"])
    assert info.value.code == 2
    assert cli.main([]) == 2


def test_assets_list_json(tmp_path, capsys):
    out = tmp_path / "a.json"
    assert cli.main(["assets", "list", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["wiki.present"] is False and "smollm2.path" in results
    assert "missing" in capsys.readouterr().out


def test_registry_accepts_new_commands(monkeypatch, tmp_path):
    seen = {}

    def add(parser):
        parser.add_argument("--n", type=int, default=1)

    def run(args):
        seen["n"] = args.n
        return {"n": args.n}

    monkeypatch.setitem(cli.COMMANDS, "demo", cli.Command(add, run, "a demo"))
    out = tmp_path / "d.json"
    assert cli.main(["demo", "--n", "3", "--json", str(out)]) == 0
    assert seen == {"n": 3} and json.loads(out.read_text()) == {"n": 3}


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qcompile", "eval", "--model", str(tmp_path / "none"),
                           "--tasks", "piqa"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("qcompile: error: model") and "Traceback" not in proc.stderr
