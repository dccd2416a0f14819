"""Shared plumbing of examples/reproduce_rtn.py and examples/reproduce_papers.py.

Loading the default model and texts, one "quantize + perplexity" measurement, resumable JSON results,
markdown tables, and writing a table between ``<!-- BEGIN name -->`` / ``<!-- END name -->`` in the
README (only what lies between the two lines is replaced).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections import Counter
from pathlib import Path

import torch

from qcompile.recipes import Recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "examples" / "results"
README = ROOT / "README.md"


def add_common_args(parser, json_name: str) -> None:
    parser.add_argument("--max-windows", type=int, default=8, help="Wikipedia windows of 2048 tokens (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", default=str(RESULTS / json_name), help="results JSON (also the resume cache)")
    parser.add_argument("--fresh", action="store_true", help="ignore results already in the JSON, measure all")
    parser.add_argument("--only", default="", help="comma-separated labels: run only those rows")
    parser.add_argument("--no-readme", action="store_true", help="print the tables, do not touch README.md")
    parser.add_argument("--device", default=None, help="torch device for the model (default cpu)")


def setup(threads: int, device=None):
    """Threads, then the default model (float32, eval), tokenizer and the two text samples."""
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from qcompile.assets import read_text
    from qcompile.models import load_model, load_tokenizer

    model = load_model("default")
    if device:
        model = model.to(device)
    return model, load_tokenizer("default"), read_text("wiki"), read_text("c4")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, {cpu} host)"
    return (f"{cpu}, {os.cpu_count()} cores visible, {threads} torch thread{'s' if threads != 1 else ''}, "
            f"torch {torch.__version__}")


def machine_line(entries, fallback: str, tags=None) -> str:
    """Where ``entries`` were measured, from each entry's own ``machine`` (entries older than that field:
    ``fallback``): one machine as is; several, the most common first, each with the ``tags`` (parallel
    to ``entries``, e.g. table letters) of its rows, or its row count. A table rendered from cached rows
    then names the machines its rows came from, not the last run's."""
    tags = [None] * len(entries) if tags is None else tags
    rows = [(e.get("machine") or fallback, t) for e, t in zip(entries, tags) if e]
    counts = Counter(m for m, _ in rows)
    if len(counts) <= 1:
        return next(iter(counts), fallback)
    parts = []
    for m, n in counts.most_common():
        named = list(dict.fromkeys(t for mm, t in rows if mm == m and t is not None))
        parts.append(f"{m} ({'rows of ' + ', '.join(named) if named else f'{n} rows'})")
    return "; ".join(parts)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Results:
    """``{label: entry}`` persisted after every row, so an interrupted run resumes where it stopped.

    An entry is reused only when its recipe (as a dict) and window count equal the requested ones.
    """

    def __init__(self, path: str | Path, fresh: bool = False):
        self.path = Path(path)
        self.data, self.meta = {}, {}
        if self.path.is_file() and not fresh:
            stored = json.loads(self.path.read_text())
            self.data, self.meta = stored.get("rows", {}), stored.get("meta", {})
        for e in self.data.values():  # rows written before a recipe field existed: fill in its default
            if e.get("recipe") is not None:
                e["recipe"] = Recipe.from_dict(e["recipe"]).to_dict()

    def get(self, label: str, recipe: dict | None, windows: int, tasks=(), task_limit=None):
        e = self.data.get(label)
        if e and e.get("recipe") == recipe and e.get("windows") == windows:
            if not tasks or (set(tasks) <= set(e.get("tasks", {})) and e.get("task_limit") == task_limit):
                return e
        return None

    def find(self, recipe: dict | None, windows: int):
        """Any entry measured with this recipe and window count (e.g. an RTN row of another script)."""
        for e in self.data.values():
            if e.get("recipe") == recipe and e.get("windows") == windows:
                return e
        return None

    def put(self, label: str, entry: dict, meta: dict) -> None:
        self.data[label] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": self.data}, indent=1, sort_keys=True))
        tmp.replace(self.path)


def measure(model, tok, wiki: str, calib_text: str, recipe, windows: int, log=print, tasks=(),
            task_limit: int | None = None) -> dict:
    """Quantize with ``recipe`` (None: the FP32 model), score the Wikipedia windows (and zero-shot tasks)."""
    import qcompile
    from qcompile.evaluate import evaluate_tasks, perplexity

    entry = {"recipe": None if recipe is None else recipe.to_dict(), "windows": windows}
    if recipe is None:
        qm = model
    else:
        t, c = time.perf_counter(), time.process_time()
        qm = qcompile.quantize(model, recipe, calibration=calib_text, tokenizer=tok, progress=True)
        entry["quantize_s"] = round(time.perf_counter() - t, 1)
        entry["quantize_cpu_s"] = round(time.process_time() - c, 1)
        entry["seconds"] = {k: round(v, 1) for k, v in qm.seconds.items()}
        if qm.calibration is not None:
            entry["calibrate_s"] = round(qm.seconds.get("calibrate", 0.0), 1)
            entry["stages"] = {k: round(v, 1) for k, v in qm.calibration.seconds.items()}
    t = time.perf_counter()
    r = perplexity(qm, tok, wiki, window=2048, max_windows=windows, progress=True)
    entry.update(ppl=r["ppl"], nll=r["nll"], eval_s=round(time.perf_counter() - t, 1),
                 peak_rss_gb=round(peak_rss_gb(), 2))
    if tasks:
        zs = evaluate_tasks(qm, tok, tasks, limit=task_limit, progress=True)
        entry["tasks"] = {k: {m: v for m, v in d.items()} for k, d in zs.items()}
        entry["task_limit"] = task_limit
        log("  -> " + ", ".join(f"{k} acc {d['acc']:.3f}" for k, d in zs.items()))
    entry["machine"] = machine()  # after the run: CUDA is initialised by then when it was used
    log(f"  -> ppl {r['ppl']:.3f} ({r['windows']} windows)"
        + (f", calibration {entry['calibrate_s']} s" if "calibrate_s" in entry else ""))
    return entry


def gap_closed(ppl: float, rtn: float, fp: float) -> float | None:
    """Share (%) of the RTN-to-FP perplexity gap that ``ppl`` closes."""
    if rtn is None or fp is None or rtn - fp <= 0:
        return None
    return 100.0 * (rtn - ppl) / (rtn - fp)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_block(name: str, text: str, no_readme: bool = False) -> str:
    """Put ``text`` between the README's ``<!-- BEGIN name -->``/``<!-- END name -->`` lines.

    Without the markers (or with ``no_readme``) the text goes to ``examples/results/<name>.md``.
    Returns where it went.
    """
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text.rstrip() + "\n")
    if no_readme or not README.is_file():
        return str(RESULTS / f"{name}.md")
    lines = README.read_text().split("\n")
    try:
        i, j = lines.index(begin), lines.index(end)
    except ValueError:
        return str(RESULTS / f"{name}.md")
    if j < i:
        return str(RESULTS / f"{name}.md")
    lines[i + 1:j] = text.rstrip().split("\n")
    README.write_text("\n".join(lines))
    return f"README.md ({name})"
