"""``qcompile quantize``: quantize a model with a recipe and compare it with floating point.

    qcompile quantize --model default --recipe w4a8v4-aqas-optq-dint4 --tasks wiki-ppl --max-windows 4

Order of work (every input is checked before the slow part starts): recipe and ``--set`` overrides ->
output paths -> evaluation and calibration texts -> model -> FP evaluation -> calibrate + passes ->
quantized evaluation -> ``--save``. Results (``--json``): ``fp.<task>.<metric>``,
``quant.<task>.<metric>``, ``quantize_seconds`` and ``seconds.<stage>``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qcompile.cli import (
    add_eval_arguments,
    add_model_argument,
    add_recipe_arguments,
    add_threads_argument,
    apply_threads,
    check_writable,
    eval_texts,
    format_rows,
    read_user_text,
    resolve_tasks,
    run_evaluation,
)
from qcompile.errors import QcompileError

__all__ = ["add_arguments", "resolve_cli_recipe", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_recipe_arguments(parser, default="w4a8v4-aqas-optq-dint4", recipe_help="a preset name (see `qcompile "
                         "quantize --list-recipes`) or a YAML/JSON recipe file")
    parser.add_argument("--calib-text", default=None, metavar="FILE",
                        help="UTF-8 calibration text (default: the recipe's calib_source sample, C4)")
    add_eval_arguments(parser)
    parser.add_argument("--no-fp", action="store_true", help="skip the floating-point evaluation")
    parser.add_argument("--save", default=None, metavar="DIR", help="write the quantized artifact there (atomic)")
    parser.add_argument("--dump-dir", default=None, metavar="DIR",
                        help="write the graph after every pass and a diff per pass there")
    parser.add_argument("--device", default=None, help="calibration device, e.g. cuda (default: the model's)")
    parser.add_argument("--list-recipes", action="store_true", help="print the presets and exit")
    add_threads_argument(parser)


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def resolve_cli_recipe(name: str, overrides: list[str]):
    """The recipe named on the command line with ``FIELD=VALUE`` overrides applied (validated)."""
    from qcompile.recipes import Recipe, RecipeError, resolve_recipe

    recipe = resolve_recipe(name)
    if not overrides:
        return recipe
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r} is not FIELD=VALUE")
        changes[key.strip()] = _parse_value(value)
    data = {**recipe.to_dict(), **changes}
    if "name" not in changes:
        data["name"] = recipe.name + "+" + ",".join(f"{k}={v}" for k, v in changes.items())
    return Recipe.from_dict(data)


def _list_recipes() -> dict:
    from qcompile.recipes import PRESETS

    def fmt(r):
        act = f"{r.act_format}/{r.act_granularity}" if r.act_format else "-"
        return (r.name, f"{r.weight_format}/{r.weight_granularity}" if r.weight_format else "-", act,
                r.v_format or "-", r.scaling, r.rounding, r.fp16_ratio or "-")

    print(format_rows([("preset", "weights", "activations", "V", "scaling", "rounding", "fp16")]
                      + [fmt(r) for r in PRESETS.values()]))
    return {"presets": ",".join(PRESETS)}


def _delta(fp, q) -> str:
    if not isinstance(fp, (int, float)) or not isinstance(q, (int, float)) or fp == 0:
        return ""
    return f"{100.0 * (q - fp) / abs(fp):+.2f}%"


def comparison_table(fp: dict | None, quant: dict) -> str:
    """``task  metric  FP  quantized  change`` rows."""
    from qcompile.evaluate import _fmt

    rows = [("task", "metric", "FP", "quantized", "change")]
    for task, metrics in quant.items():
        for metric, value in metrics.items():
            if metric.endswith("stderr") or metric in ("tokens", "windows", "n"):
                continue
            ref = (fp or {}).get(task, {}).get(metric)
            rows.append((task, metric, _fmt(ref) if ref is not None else "-", _fmt(value), _delta(ref, value)))
    return format_rows(rows)


def _calibration_text(args, recipe) -> str | None:
    from qcompile.assets import read_text
    from qcompile.calibration.engine import needs_calibration

    if not needs_calibration(recipe):
        return None
    if args.calib_text:
        return read_user_text(args.calib_text)
    return read_text(recipe.calib_source)


def _prepare_save(path: str) -> Path:
    target = Path(path).expanduser()
    check_writable(target, "the --save artifact")
    if target.exists() and not target.is_dir():
        raise QcompileError(f"--save {path} exists and is not a folder")
    if target.is_dir() and not (target / "manifest.json").is_file():  # qcompile.save would refuse it, but late
        raise QcompileError(f"--save {path} exists and is not a qcompile artifact; choose another folder")
    return target


def run(args: argparse.Namespace) -> dict:
    import torch

    from qcompile.evaluate import flatten_results
    from qcompile.models import load_model, load_tokenizer
    from qcompile.pipeline import check_model, quantize

    if args.list_recipes:
        return _list_recipes()
    start = time.perf_counter()
    recipe = resolve_cli_recipe(args.recipe, args.overrides)
    save_dir = _prepare_save(args.save) if args.save else None
    if args.dump_dir:
        dump = Path(args.dump_dir).expanduser()  # created by the pass runner when missing: its parent must exist
        check_writable(dump / "x" if dump.is_dir() else dump, "the --dump-dir folder")
    tasks = resolve_tasks(args)
    apply_threads(args)
    texts = eval_texts(args, tasks)
    calib_text = _calibration_text(args, recipe)
    tokenizer = load_tokenizer(args.model)
    if calib_text is not None:  # too little calibration text fails now, not after the FP evaluation
        from qcompile.calibration.engine import calibration_batches

        calibration_batches(calib_text, tokenizer, 1, recipe.calib_seq_len, recipe.seed)
    model = load_model(args.model, dtype=torch.float32)
    check_model(model, recipe)  # NaN weights, group sizes vs K: refused before the FP evaluation
    from qcompile.calibration.distributed import init_from_env
    placement = init_from_env()  # under torchrun: data-parallel calibration; rank 0 evaluates and saves
    main_rank = placement is None or placement.is_main
    stages: dict[str, float] = {}
    fp = None
    if not args.no_fp and main_rank:
        t = time.perf_counter()
        fp = run_evaluation(model, tokenizer, args, tasks, texts)
        stages["eval_fp"] = time.perf_counter() - t
    print(f"quantizing {args.model} with {recipe.name} ...", file=sys.stderr)
    qm = quantize(model, recipe, calibration=calib_text, tokenizer=tokenizer, dump_dir=args.dump_dir,
                  device=args.device, placement=placement)
    if not main_rank:
        return {"recipe": recipe.name, "rank": placement.rank}
    stages.update(qm.seconds)
    quantize_seconds = sum(qm.seconds.values())
    t = time.perf_counter()
    quant = run_evaluation(qm, tokenizer, args, tasks, texts)
    stages["eval_quant"] = time.perf_counter() - t
    if save_dir is not None:
        from qcompile.artifacts import save

        t = time.perf_counter()
        save(qm, save_dir)
        stages["save"] = time.perf_counter() - t

    print(comparison_table(fp, quant))
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
          + f" | quantize total {quantize_seconds:.1f} s, {torch.get_num_threads()} threads", file=sys.stderr)
    if save_dir is not None:
        print(f"saved {save_dir}", file=sys.stderr)
    results = {"recipe": recipe.name, "model": args.model, "quantize_seconds": round(quantize_seconds, 2),
               **{f"seconds.{k}": round(v, 2) for k, v in stages.items()},
               **{f"quant.{k}": v for k, v in flatten_results(quant).items()},
               "total_seconds": round(time.perf_counter() - start, 1)}
    if fp is not None:
        results.update({f"fp.{k}": v for k, v in flatten_results(fp).items()})
    if save_dir is not None:
        results["save"] = str(save_dir)
    return results
