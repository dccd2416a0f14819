"""``qcompile passes``: run the pipeline with every pass's graph dumped, then an SQNR table per linear.

    qcompile passes --model default --recipe w4a8v4-rtn-int4 --dump-dir passes/

``DIR`` gets ``00_captured.txt``, then ``NN_<pass>.txt`` (the graph after the pass) and ``NN_<pass>.diff``
(against the graph before it) for every pass in order, ``pass_log.md`` (matches, nodes added/removed,
seconds) and ``linears.md`` / ``linears.json``: per quantized linear (HF module name) its formats and the
SQNR in dB of its output vs floating point on one calibration batch, locally (same FP input) and end to
end (the input the quantized model really sees), with the AQAS eq. 4 underflow/rounding split.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qcompile.cli import (
    add_model_argument,
    add_recipe_arguments,
    add_threads_argument,
    apply_threads,
    check_writable,
    format_rows,
    read_user_text,
)
from qcompile.commands.quantize import _calibration_text, resolve_cli_recipe

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_recipe_arguments(parser)
    parser.add_argument("--dump-dir", required=True, metavar="DIR", help="where the per-pass graphs and tables go")
    parser.add_argument("--calib-text", default=None, metavar="FILE",
                        help="UTF-8 text for calibration and the SQNR batch (default: the C4 sample)")
    parser.add_argument("--tokens", type=int, default=512, metavar="T", help="length of the SQNR batch in tokens")
    add_threads_argument(parser)


def _pass_log_table(entries) -> str:
    rows = [("#", "pass", "matches", "nodes added", "nodes removed", "ms", "notes")]
    rows += [(i + 1, e.name, e.matches, e.nodes_added, e.nodes_removed, f"{e.seconds * 1000:.1f}", "; ".join(e.notes))
             for i, e in enumerate(entries)]
    return format_rows(rows)


def run(args: argparse.Namespace) -> dict:
    import torch

    from qcompile.assets import read_text
    from qcompile.calibration.engine import calibration_batches
    from qcompile.debug import format_rows as markdown_rows
    from qcompile.debug import layer_errors
    from qcompile.errors import QcompileError
    from qcompile.models import load_model, load_tokenizer
    from qcompile.pipeline import quantize

    if args.tokens < 2:
        raise QcompileError(f"--tokens must be at least 2, got {args.tokens}")
    recipe = resolve_cli_recipe(args.recipe, args.overrides)
    dump = Path(args.dump_dir).expanduser()
    check_writable(dump, "the --dump-dir folder")
    apply_threads(args)
    calib_text = _calibration_text(args, recipe)
    probe_text = calib_text or (read_user_text(args.calib_text) if args.calib_text else read_text("c4"))
    tokenizer = load_tokenizer(args.model)
    batch = calibration_batches(probe_text, tokenizer, 1, args.tokens, recipe.seed + 1)
    model = load_model(args.model, dtype=torch.float32)

    qm = quantize(model, recipe, calibration=calib_text, tokenizer=tokenizer, dump_dir=dump,
                  log=lambda line: print(line, file=sys.stderr))
    log_table = _pass_log_table(qm.pass_log)
    (dump / "pass_log.md").write_text(f"# Passes of {recipe.name}\n\n```\n{log_table}\n```\n", encoding="utf-8")
    rows = layer_errors(model, qm, batch)
    (dump / "linears.md").write_text(f"# Per-linear SQNR, {recipe.name}, {args.tokens} tokens\n\n"
                                     + markdown_rows(rows) + "\n", encoding="utf-8")
    (dump / "linears.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")

    print(log_table)
    print()
    print(format_rows([("module", "weight", "act", "SQNR local dB", "SQNR e2e dB")] + [
        (r["module"], f"{r['weight']}/{r['w_gran']}", f"{r['act']}/{r['a_gran']}", f"{r['sqnr_local_db']:.2f}",
         f"{r['sqnr_e2e_db']:.2f}") for r in rows]))
    files = sorted(p.name for p in dump.iterdir())
    print(f"wrote {len(files)} files to {dump}", file=sys.stderr)
    worst = min(rows, key=lambda r: r["sqnr_local_db"]) if rows else None
    return {"recipe": recipe.name, "dump_dir": str(dump), "passes": len(qm.pass_log), "linears": len(rows),
            **{f"pass.{e.name}.matches": e.matches for e in qm.pass_log},
            **({"worst_linear": worst["module"], "worst_sqnr_local_db": round(worst["sqnr_local_db"], 3)}
               if worst else {}),
            "mean_sqnr_local_db": round(sum(r["sqnr_local_db"] for r in rows) / max(len(rows), 1), 3)}
