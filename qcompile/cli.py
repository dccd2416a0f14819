"""The ``qcompile`` command line.

Subcommands live in ``COMMANDS``: name → ``Command(add_arguments, run, help)``. ``add_arguments``
adds the subcommand's options to its parser; ``run(args)`` does the work, prints its table and returns
a flat ``{key: value}`` dict, which ``--json PATH`` (every command has it) writes atomically. Either
function may be given as a ``"module:function"`` string so a command's heavy imports wait until it
runs. To add a command, add an entry (or call ``register_command``).

Errors meant for people (``QcompileError``, ``OSError``) print one line ``qcompile: error: ...`` on
stderr and exit 2, without a traceback unless ``--debug``; argparse usage errors also exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from qcompile.errors import AssetError, QcompileError

__all__ = ["COMMANDS", "Command", "add_eval_arguments", "add_threads_argument", "apply_threads", "build_parser",
           "check_writable", "format_rows", "main", "read_user_text", "register_command", "resolve_tasks", "write_json"]


class Command(NamedTuple):
    """One subcommand: ``add_arguments(parser)`` and ``run(args) -> flat results dict``."""

    add_arguments: Callable | str
    run: Callable | str
    help: str = ""


def _resolve(fn: Callable | str) -> Callable:
    if callable(fn):
        return fn
    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------- helpers
def physical_cores() -> int:
    """Physical CPU cores (psutil when installed, else the logical count)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (torch CPU threads; default: physical cores)."""
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: the number of physical cores)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op threads from ``args.threads``."""
    import torch

    threads = args.threads or physical_cores()
    if threads < 1:
        raise QcompileError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def write_json(path: str | Path, results: dict) -> None:
    """Write a flat results object to ``path`` atomically (temporary sibling + rename)."""
    from qcompile.assets import write_atomic

    try:
        write_atomic(Path(path), json.dumps(results, indent=1) + "\n")
    except OSError as e:
        raise QcompileError(f"cannot write the --json file {path}: {e.strerror or e}") from e


def check_writable(path: str | Path, what: str = "the --json file") -> None:
    """Fail before a long run, not after it, when ``path`` cannot be written."""
    parent = Path(path).expanduser().absolute().parent
    if not parent.is_dir():
        raise QcompileError(f"cannot write {what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise QcompileError(f"cannot write {what} {path}: folder {parent} is not writable")


def format_rows(rows: list[tuple]) -> str:
    """Left-aligned columns, the first row a header."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def csv_list(value: str) -> list[str]:
    """A comma-separated argument as a list of its non-blank, stripped items."""
    return [v.strip() for v in value.split(",") if v.strip()]


# ----------------------------------------------------------------------------------------- assets
def _assets_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("fetch", "list", "verify"),
                        help="fetch: download/convert what is missing or corrupt; list: what is cached; "
                             "verify: re-hash every cached file")
    parser.add_argument("names", nargs="*", metavar="ASSET", help="restrict to these assets (default: all)")


def _run_assets(args: argparse.Namespace) -> dict:
    from qcompile import assets

    names = args.names or None
    if args.action == "list":
        rows = assets.list_assets()
        print(format_rows([("asset", "status", "size", "source", "path")] + [
            (r["name"], "present" if r["present"] else "missing", f"{r['size'] / 2**20:.1f} MB", r["source"], r["path"])
            for r in rows]))
        return {f"{r['name']}.{k}": r[k] for r in rows for k in ("present", "size", "path")}
    status = assets.fetch(names) if args.action == "fetch" else assets.verify(names)
    print(format_rows([("asset", "status")] + list(status.items())))
    print(f"cache: {assets.cache_home()}")
    results = {"home": str(assets.cache_home()), **status}
    bad = {k: v for k, v in status.items() if v not in ("ok", "fetched")}
    if bad:
        if args.json:
            write_json(args.json, results)
        listed = ", ".join(f"{k} ({v})" for k, v in bad.items())
        raise AssetError(f"{len(bad)} asset(s) failed verification: {listed}; run `qcompile assets fetch` to repair")
    return results


# ------------------------------------------------------------------------------------------- eval
PPL_TASKS = {"wiki-ppl": "wiki"}  # perplexity task -> text asset


def add_eval_arguments(parser: argparse.ArgumentParser, default_tasks: str = "wiki-ppl") -> None:
    """Evaluation options shared by ``eval``, ``quantize`` and ``export``."""
    parser.add_argument("--tasks", type=csv_list, default=None, metavar="LIST",
                        help="comma-separated: wiki-ppl, piqa, arc-easy, arc-challenge, winogrande, hellaswag "
                             f"(default: {default_tasks}, or none when --ppl-text is given)")
    parser.add_argument("--max-windows", type=int, default=None, metavar="N", help="perplexity: first N windows")
    parser.add_argument("--window", type=int, default=2048, metavar="T", help="perplexity window in tokens")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="zero-shot: first N items per task")
    parser.add_argument("--ppl-text", default=None, metavar="FILE",
                        help="also report perplexity (key 'ppl') on this UTF-8 text file")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B", help="zero-shot requests per batch")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct), a local HF folder or a .gguf file")


def add_recipe_arguments(parser: argparse.ArgumentParser, default: str | None = "w4a8v4-rtn-int4",
                         recipe_help: str = "a preset name or a YAML/JSON recipe file") -> None:
    """``--recipe`` (a preset or a recipe file) and ``--set FIELD=VALUE`` overrides, as every command reads them."""
    parser.add_argument("--recipe", default=default, help=recipe_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one recipe field, e.g. --set calib_samples=32 (repeatable)")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_eval_arguments(parser)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    add_threads_argument(parser)


def eval_texts(args: argparse.Namespace, tasks: list[str]) -> dict[str, str]:
    """Perplexity texts by result name; read before any model loads so a missing asset fails fast."""
    from qcompile.assets import read_text

    texts = {t: read_text(PPL_TASKS[t]) for t in tasks if t in PPL_TASKS}
    if args.ppl_text:
        texts["ppl"] = read_user_text(args.ppl_text)
    return texts


def run_evaluation(model, tokenizer, args: argparse.Namespace, tasks: list[str], texts: dict[str, str]) -> dict:
    """``{task: {metric: value}}`` for the perplexity texts and the zero-shot tasks."""
    from qcompile import evaluate

    results = {name: evaluate.perplexity(model, tokenizer, text, window=args.window, max_windows=args.max_windows)
               for name, text in texts.items()}
    zero_shot = [t for t in tasks if t in evaluate.TASKS]
    if zero_shot:
        results.update(evaluate.evaluate_tasks(model, tokenizer, zero_shot, limit=args.limit,
                                               batch_size=args.batch_size))
    return results


def resolve_tasks(args: argparse.Namespace) -> list[str]:
    from qcompile.evaluate import TASKS, EvaluationError

    tasks = args.tasks if args.tasks is not None else ([] if args.ppl_text else ["wiki-ppl"])
    unknown = [t for t in tasks if t not in PPL_TASKS and t not in TASKS]
    if unknown:
        raise EvaluationError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join([*PPL_TASKS, *TASKS])}")
    if not tasks and not args.ppl_text:
        raise EvaluationError("nothing to evaluate: give --tasks and/or --ppl-text")
    return tasks


def read_user_text(path: str) -> str:
    from qcompile.evaluate import EvaluationError

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvaluationError(f"--ppl-text {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise QcompileError(f"cannot read --ppl-text {path}: {e.strerror or e}") from e


def _run_eval(args: argparse.Namespace) -> dict:
    import torch

    from qcompile import evaluate
    from qcompile.models import load_model, load_tokenizer

    start = time.perf_counter()
    tasks = resolve_tasks(args)
    apply_threads(args)
    texts = eval_texts(args, tasks)
    model = load_model(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = load_tokenizer(args.model)
    results = run_evaluation(model, tokenizer, args, tasks, texts)
    print(evaluate.format_table(results))
    seconds = time.perf_counter() - start
    print(f"model {args.model} ({args.dtype}), {torch.get_num_threads()} threads: {seconds:.1f} s", file=sys.stderr)
    return {**evaluate.flatten_results(results), "seconds": round(seconds, 1)}


# ---------------------------------------------------------------------------------------- registry
COMMANDS: dict[str, Command] = {
    "assets": Command(_assets_arguments, _run_assets, "fetch, list or verify the registry assets"),
    "eval": Command(_eval_arguments, _run_eval, "perplexity and zero-shot accuracy of a model"),
    "quantize": Command("qcompile.commands.quantize:add_arguments", "qcompile.commands.quantize:run",
                        "quantize a model with a recipe; evaluate FP and quantized; optionally save"),
    "passes": Command("qcompile.commands.passes:add_arguments", "qcompile.commands.passes:run",
                      "run the passes with per-pass graph dumps and diffs, then per-linear SQNR vs FP"),
    "export": Command("qcompile.commands.export:add_arguments", "qcompile.commands.export:run",
                      "write an ONNX QDQ (exact) or fused (fast) model; --check compares onnxruntime with the "
                      "reference"),
    "report": Command("qcompile.commands.report:add_arguments", "qcompile.commands.report:run",
                      "numerics report (HTML)"),
}


def register_command(name: str, add_arguments: Callable | str, run: Callable | str, help: str = "") -> None:
    """Add a subcommand (functions or ``"module:function"`` strings)."""
    COMMANDS[name] = Command(add_arguments, run, help)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per ``COMMANDS`` entry, each with ``--json``/``--debug``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", metavar="PATH", default=None, help="write the results as a flat JSON object")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = argparse.ArgumentParser(prog="qcompile", description="Low-bit LLM quantization compiler for PyTorch 2")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=command.help, description=command.help)
        _resolve(command.add_arguments)(p)
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, QcompileError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.json:
            check_writable(args.json)
        results = _resolve(COMMANDS[args.command].run)(args)
        if args.json:
            write_json(args.json, results)
    except (QcompileError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"qcompile: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    return 0
