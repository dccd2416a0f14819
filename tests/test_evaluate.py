"""Evaluation on tiny random models: perplexity = hand-computed NLL, padding-free log-likelihoods,
acc/acc_norm on a hand-made task, lm-eval-harness prompts, arrow task data."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from qcompile import evaluate
from qcompile.errors import QcompileError
from qcompile.evaluate import Doc, EvaluationError


class CharTokenizer:
    """One token per character (ids < 128, the tiny models' vocab); no BOS, EOS = 0."""

    bos_token_id = None
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 128 for c in text]


class UniformLM:
    """A callable 'model' with all-zero logits: every token has log-probability -log(V)."""

    def __call__(self, ids):
        return torch.zeros(*ids.shape, 128)


def _hand_ppl(model, ids, window, n):
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            x = ids[w * window:(w + 1) * window]
            logp = torch.log_softmax(model(x[None]).logits[0], -1)
            for t in range(window - 1):
                nll -= logp[t, x[t + 1]].item()
                count += 1
    return math.exp(nll / count), count


@pytest.mark.parametrize("family", ["opt", "gqa"])
def test_perplexity_equals_hand_computed_nll(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (3 * 16 + 5,), generator=torch.Generator().manual_seed(2))
    expected, count = _hand_ppl(model, ids, 16, 3)
    got = evaluate.perplexity(model, ids, window=16)
    assert got["windows"] == 3 and got["tokens"] == count == 45 and got["text_tokens"] == 53
    assert got["ppl"] == pytest.approx(expected, rel=1e-6)
    batched = evaluate.perplexity(model, ids.tolist(), window=16, batch_size=2)
    assert batched["ppl"] == pytest.approx(expected, rel=1e-5)
    assert evaluate.perplexity(model, ids, window=16, max_windows=2)["windows"] == 2
    # plain callables (quantized models) returning logits work the same
    plain = evaluate.perplexity(lambda x: model(x).logits, ids, window=16)
    assert plain["ppl"] == pytest.approx(expected, rel=1e-6)


def test_perplexity_tokenizes_text_without_bos():
    ppl = evaluate.perplexity(UniformLM(), CharTokenizer(), "abcdefgh" * 4, window=8)
    assert ppl["ppl"] == pytest.approx(128.0) and ppl["windows"] == 4


def test_text_shorter_than_a_window_is_a_clear_error():
    with pytest.raises(EvaluationError, match="fewer than one window") as info:
        evaluate.perplexity(UniformLM(), CharTokenizer(), "short", window=2048)
    assert isinstance(info.value, QcompileError)


def test_batched_loglikelihoods_equal_unpadded_ones():
    model = tiny_model("llama")
    tok = CharTokenizer()
    requests = [("Question: a\nAnswer:", " yes"), ("Q", " a much longer continuation"), ("ctx ", "x")]
    batched = evaluate.loglikelihoods(model, tok, requests, batch_size=3, progress=False)
    for (ctx, cont), got in zip(requests, batched):
        ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont      # trailing space moves right
        ids = torch.tensor(tok.encode(ctx + cont))
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0], -1)
        expected = sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids)))
        assert got == pytest.approx(expected, abs=1e-4)


def test_empty_context_uses_eos_prefix():
    ll = evaluate.loglikelihoods(UniformLM(), CharTokenizer(), [("", "abc")], progress=False)
    assert ll[0] == pytest.approx(-3 * math.log(128))


def test_acc_and_acc_norm_on_hand_made_task():
    # uniform model: loglik = -(len(choice) + 1) * log V (one token per char, plus the leading space),
    # so acc picks the shortest choice and acc_norm (divided by len(choice)) the longest.
    docs = [Doc.multiple_choice("q1", ["a", "bbbb"], 0),          # acc 1, acc_norm 0
            Doc.multiple_choice("q2", ["cc", "d", "eeeeee"], 2),  # acc 0, acc_norm 1
            Doc.multiple_choice("q3", ["xx", "y"], 1)]            # acc 1, acc_norm 0
    res = evaluate.evaluate_docs(UniformLM(), CharTokenizer(), docs, progress=False)
    assert res["acc"] == pytest.approx(2 / 3) and res["acc_norm"] == pytest.approx(1 / 3) and res["n"] == 3
    assert res["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) / 3))   # sample std of [1,0,1] / sqrt(3)
    acc_only = evaluate.evaluate_docs(UniformLM(), CharTokenizer(), [Doc((("a", " b"), ("cc", " b")), 0)],
                                      progress=False)
    assert acc_only == {"acc": 1.0, "acc_stderr": 0.0, "n": 1}


def test_lm_eval_harness_prompts():
    piqa = evaluate.TASKS["piqa"].build({"goal": "Open a jar", "sol1": "twist", "sol2": "lick", "label": 0})
    assert piqa.requests == (("Question: Open a jar\nAnswer:", " twist"), ("Question: Open a jar\nAnswer:", " lick"))
    assert piqa.gold == 0 and piqa.lengths == (5, 4)
    arc = evaluate.TASKS["arc-easy"].build({"question": "Q?", "answerKey": "2", "choices": {
        "text": ["x", "yy", "z"], "label": ["1", "2", "3"]}})
    assert arc.requests[1] == ("Question: Q?\nAnswer:", " yy") and arc.gold == 1
    wino = evaluate.TASKS["winogrande"].build(
        {"sentence": "Sarah beat Maria so _ got the prize.", "option1": "Sarah", "option2": "Maria", "answer": "1"})
    assert wino.requests == (("Sarah beat Maria so Sarah", " got the prize."),
                             ("Sarah beat Maria so Maria", " got the prize."))
    assert wino.gold == 0 and wino.lengths is None
    hella = evaluate.TASKS["hellaswag"].build({"activity_label": "Roof", "ctx_a": "A man [title] sits.",
                                               "ctx_b": "he", "endings": ["falls.", "waves [x] ."], "label": "1"})
    assert hella.requests[0] == ("Roof: A man. sits. He", " falls.") and hella.requests[1][1] == " waves ."


def test_evaluate_tasks_reads_arrow_task_data(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    rows = [{"goal": f"goal {i}", "sol1": "a" * (i + 2), "sol2": "b", "label": i % 2} for i in range(5)]
    table = pa.Table.from_pylist(rows)
    path = str(tmp_path / "data-00000-of-00001.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    from qcompile import assets

    monkeypatch.setattr(assets, "task_dataset_dir", lambda task: tmp_path)
    assert evaluate.load_task_rows("piqa") == rows
    res = evaluate.evaluate_tasks(UniformLM(), CharTokenizer(), ["piqa"], limit=4, progress=False)
    # uniform model: acc always picks "b" (right for odd i), acc_norm always the longer "aa..." (even i)
    assert res["piqa"]["n"] == 4 and res["piqa"]["acc"] == 0.5 and res["piqa"]["acc_norm"] == 0.5
    with pytest.raises(EvaluationError, match="unknown task.*piqa"):
        evaluate.evaluate_tasks(UniformLM(), CharTokenizer(), ["mmlu"])


def test_flatten_and_table():
    results = {"wiki-ppl": {"ppl": 17.5, "windows": 4}, "piqa": {"acc": 0.65, "acc_stderr": 0.03, "n": 200}}
    assert evaluate.flatten_results(results) == {"wiki-ppl": 17.5, "wiki-ppl.windows": 4, "piqa.acc": 0.65,
                                                 "piqa.acc_stderr": 0.03, "piqa.n": 200}
    lines = evaluate.format_table(results).splitlines()
    assert lines[0].split() == ["task", "metric", "value"]
    assert lines[2].split() == ["wiki-ppl", "ppl", "17.5000"]
    assert lines[4].split() == ["piqa", "acc", "0.6500", "±", "0.0300"]
    assert len(lines[2]) == len(lines[3])                                     # values right-aligned


@pytest.mark.assets
def test_default_model_scores_wikipedia_sanely():
    from qcompile import assets
    from qcompile.errors import AssetError
    from qcompile.models import load_model, load_tokenizer

    try:
        text = assets.read_text("wiki")
    except AssetError:
        pytest.skip("needs `qcompile assets fetch`")
    model = load_model("default")
    ids = evaluate.encode(load_tokenizer("default"), text[:20_000])
    ppl = evaluate.perplexity(model, ids, window=256, max_windows=2, progress=False)
    assert 5 < ppl["ppl"] < 60       # FP32, 4 windows of 2048: 17.53; short windows score worse
