"""Model quality: windowed perplexity and zero-shot multiple-choice accuracy (DESIGN.md "Evaluation protocol").

* ``perplexity``: the text is tokenised once (no BOS), cut into non-overlapping windows of ``window``
  tokens (the tail that does not fill a window is dropped), and ppl = exp(mean token NLL) over the
  ``window - 1`` predicted tokens of every window. The window count is reported with the result.
* ``evaluate_tasks``: lm-eval-harness's zero-shot protocol. Each choice is a (context, continuation)
  request scored by the summed log-probability of the continuation tokens; ``acc`` = argmax of the sum,
  ``acc_norm`` = argmax of the sum divided by the choice's length in characters (lm-eval-harness:
  ``completion_len = len(choice)``). Prompts are lm-eval-harness's.

The model may be an HF model, or any callable mapping input_ids ``[B, T]`` to logits ``[B, T, V]``
(or to an object with ``.logits``): quantized models are plain callables.
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qcompile.errors import QcompileError

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "Doc",
    "EvaluationError",
    "TaskSpec",
    "encode",
    "evaluate_docs",
    "evaluate_tasks",
    "flatten_results",
    "format_table",
    "load_task_rows",
    "loglikelihoods",
    "model_logits",
    "perplexity",
]

DEFAULT_TASKS = ("piqa", "arc-easy", "arc-challenge", "winogrande")


class EvaluationError(QcompileError, ValueError):
    """Evaluation input is unusable (text too short, unknown task, unreadable task data)."""


# ------------------------------------------------------------------------------------------ plumbing
def model_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of ``model`` for ``input_ids`` ``[B, T]`` (HF model or plain callable)."""
    config = getattr(model, "config", None)
    out = model(input_ids, use_cache=False) if getattr(config, "use_cache", False) else model(input_ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def _device(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS): HF tokenizers or any ``encode``/callable."""
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # a minimal tokenizer without the keyword
            return list(tokenizer.encode(text))
    out = tokenizer(text)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _bar(iterable, total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not progress)


# ---------------------------------------------------------------------------------------- perplexity
def perplexity(model, tokenizer_or_ids, text: str | None = None, window: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, device=None, progress: bool = True) -> dict:
    """Perplexity over non-overlapping windows (DESIGN.md protocol).

    Args:
        model: HF causal LM or callable ``input_ids [B, T] -> logits [B, T, V]``.
        tokenizer_or_ids: a tokenizer (then ``text`` is tokenised once, no BOS) or the token ids.
        text: the text to score (ignored when ids are given).
        window: tokens per window; ``window - 1`` of them are predicted.
        max_windows: score only the first windows.
        batch_size: windows per forward pass.

    Returns:
        ``{"ppl", "nll" (mean per token), "windows", "tokens" (predicted tokens), "text_tokens"}``.

    Raises:
        EvaluationError: fewer tokens than one window.
    """
    if window < 2:
        raise EvaluationError(f"window must be at least 2 tokens, got {window}")
    if isinstance(tokenizer_or_ids, (torch.Tensor, list, tuple)):
        ids = torch.as_tensor(tokenizer_or_ids, dtype=torch.long).flatten()
    else:
        if text is None:
            raise EvaluationError("perplexity() needs a text to tokenise when given a tokenizer")
        ids = torch.tensor(encode(tokenizer_or_ids, text), dtype=torch.long)
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise EvaluationError(f"the text has {ids.numel()} tokens, fewer than one window of {window}; "
                              "give a longer text or a smaller window")
    windows = ids[: n * window].view(n, window)  # [n, window]
    device = _device(model, device)
    total = 0.0
    starts = range(0, n, batch_size)
    with torch.inference_mode():
        for start in _bar(starts, len(starts), "perplexity", progress):
            x = windows[start:start + batch_size].to(device)                   # x: [B, W]
            logits = model_logits(model, x)[:, :-1].float()                    # [B, W-1, V]
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    tokens = n * (window - 1)
    nll = total / tokens
    return {"ppl": math.exp(nll), "nll": nll, "windows": n, "tokens": tokens, "text_tokens": ids.numel()}


# ------------------------------------------------------------------------------------- log-likelihood
def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval-harness's split: trailing context spaces move to the continuation; the continuation's
    tokens are those of ``context + continuation`` past the context's (merges across the seam count
    for the continuation). An empty context is replaced by the BOS/EOS token."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = getattr(tokenizer, "bos_token_id", None)
        prefix = getattr(tokenizer, "eos_token_id", None) if prefix is None else prefix
        if prefix is None:
            raise EvaluationError("a request has an empty context and the tokenizer has no BOS/EOS token")
        return [prefix], encode(tokenizer, continuation)
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16, device=None,
                   max_length: int = 2048, progress: bool = True, desc: str = "loglikelihood") -> list[float]:
    """Summed log-probability of each continuation given its context.

    Requests are sorted by length (less padding) and batched with right padding: a causal model's
    logits at real positions do not depend on the padding after them.
    """
    pairs = [_encode_pair(tokenizer, c, x) for c, x in requests]
    seqs = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in pairs]  # model input, last token dropped
    order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))
    device = _device(model, device)
    out = [0.0] * len(pairs)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for batch in _bar(batches, len(batches), desc, progress):
            width = max(len(seqs[i]) for i in batch)
            x = torch.zeros(len(batch), width, dtype=torch.long)               # x: [B, T], 0-padded right
            for row, i in enumerate(batch):
                x[row, :len(seqs[i])] = torch.tensor(seqs[i])
            logits = model_logits(model, x.to(device))                         # [B, T, V]
            for row, i in enumerate(batch):
                cont = pairs[i][1]
                end = len(seqs[i])
                logp = torch.log_softmax(logits[row, end - len(cont):end].float(), dim=-1)  # [C, V]
                out[i] = logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).sum().item()
    return out


# ------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Doc:
    """One multiple-choice item: a (context, continuation) request per choice and the gold index.

    ``lengths`` are the choice lengths in characters used by ``acc_norm`` (``None``: acc only).
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    lengths: tuple[int, ...] | None = None

    @classmethod
    def multiple_choice(cls, context: str, choices, gold: int) -> Doc:
        """A shared context with the choices as continuations (lm-eval's ``" "`` target delimiter)."""
        return cls(tuple((context, " " + c) for c in choices), int(gold), tuple(len(c) for c in choices))


def _piqa(row: dict) -> Doc:
    return Doc.multiple_choice(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])


def _arc(row: dict) -> Doc:
    choices = row["choices"]
    return Doc.multiple_choice(f"Question: {row['question']}\nAnswer:", choices["text"],
                               choices["label"].index(row["answerKey"]))


def _winogrande(row: dict) -> Doc:
    """Partial evaluation: the option fills the blank in the context; the shared continuation is
    the rest of the sentence, so only the continuation's likelihood is compared."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    continuation = " " + sentence[blank + 1:].strip()
    contexts = [sentence[:blank] + option for option in (row["option1"], row["option2"])]
    return Doc(tuple((c, continuation) for c in contexts), {"1": 0, "2": 1}[row["answer"]])


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> Doc:
    context = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return Doc.multiple_choice(context, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


@dataclass(frozen=True)
class TaskSpec:
    """A zero-shot task: its cached data (asset name) and the row → ``Doc`` builder."""

    name: str
    build: Callable[[dict], Doc]
    asset: str


TASKS = {t.name: t for t in (
    TaskSpec("piqa", _piqa, "piqa"),
    TaskSpec("arc-easy", _arc, "arc-easy"),
    TaskSpec("arc-challenge", _arc, "arc-challenge"),
    TaskSpec("winogrande", _winogrande, "winogrande"),
    TaskSpec("hellaswag", _hellaswag, "hellaswag"),
)}


def load_task_rows(task: str) -> list[dict]:
    """Rows of a task's validation split, read from the cached HF arrow files."""
    from qcompile.assets import task_dataset_dir

    folder = task_dataset_dir(TASKS[task].asset)
    try:
        import pyarrow as pa
    except ImportError as e:
        raise EvaluationError("reading the zero-shot task data needs pyarrow: `pip install pyarrow`") from e
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise EvaluationError(f"no .arrow file in {folder}; run `qcompile assets fetch`")
    rows: list[dict] = []
    for path in files:  # HF `save_to_disk` arrow files are Arrow IPC streams
        with pa.memory_map(str(path)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def evaluate_docs(model, tokenizer, docs: list[Doc], batch_size: int = 16, device=None, progress: bool = True,
                  desc: str = "task") -> dict:
    """``acc`` (and ``acc_norm`` when the docs have choice lengths) with standard errors, and ``n``."""
    requests = [r for d in docs for r in d.requests]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, device=device,
                         progress=progress, desc=desc)
    acc, acc_norm, k = [], [], 0
    for d in docs:
        scores = lls[k:k + len(d.requests)]
        k += len(d.requests)
        acc.append(float(max(range(len(scores)), key=scores.__getitem__) == d.gold))
        if d.lengths is not None:
            normed = [s / max(n, 1) for s, n in zip(scores, d.lengths)]
            acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == d.gold))
    result = dict(zip(("acc", "acc_stderr"), _mean_stderr(acc)))
    if len(acc_norm) == len(docs):
        result.update(zip(("acc_norm", "acc_norm_stderr"), _mean_stderr(acc_norm)))
    result["n"] = len(docs)
    return result


def evaluate_tasks(model, tokenizer, tasks=DEFAULT_TASKS, limit: int | None = None, batch_size: int = 16,
                   device=None, progress: bool = True) -> dict[str, dict]:
    """Zero-shot accuracy on cached tasks (piqa, arc-easy, arc-challenge, winogrande, hellaswag).

    Args:
        limit: score only the first ``limit`` items of each task.

    Returns:
        ``{task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n"}}`` (WinoGrande: acc only).
    """
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvaluationError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
    results = {}
    for task in tasks:
        rows = load_task_rows(task)[:limit]
        docs = [TASKS[task].build(r) for r in rows]
        results[task] = evaluate_docs(model, tokenizer, docs, batch_size, device, progress, desc=task)
    return results


# -------------------------------------------------------------------------------------------- output
def flatten_results(results: dict[str, dict]) -> dict[str, float | int]:
    """``{"wiki-ppl": {"ppl": x, "windows": 4}}`` → ``{"wiki-ppl": x, "wiki-ppl.windows": 4}``;
    other metrics become ``"task.metric"``."""
    flat = {}
    for task, metrics in results.items():
        for metric, value in metrics.items():
            flat[task if metric == "ppl" else f"{task}.{metric}"] = value
    return flat


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(results: dict[str, dict]) -> str:
    """An aligned text table of ``{task: {metric: value}}`` (``*_stderr`` shown as ``± x``)."""
    rows = [("task", "metric", "value", "")]
    for task, metrics in results.items():
        first = True
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            err = metrics.get(f"{metric}_stderr")
            rows.append((task if first else "", metric, _fmt(value), f"± {err:.4f}" if err is not None else ""))
            first = False
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
