"""``qcompile report``: the numerics report of one recipe on one model, as HTML + PNGs + JSON.

    qcompile report --model default --recipe w4a8v4-rtn-int4 --out report/ [--backends reference,onnx,triton]
    qcompile report --recipe w4a8v4-aqas-optq-dint4 --artifact saved/ --out report-aqas/

``--artifact DIR`` reuses a saved QuantizedModel (``qcompile.save``) when DIR holds one, and otherwise
quantizes and saves there, so a calibrated recipe is calibrated once. The evaluation tokens are the
first ``--tokens`` of the Wikipedia sample (calibration uses C4: never the same text).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qcompile.cli import (
    add_model_argument,
    add_recipe_arguments,
    add_threads_argument,
    apply_threads,
    check_writable,
    csv_list,
    read_user_text,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_recipe_arguments(parser, default=None, recipe_help="a preset name or a YAML/JSON recipe file "
                         "(default w4a8v4-rtn-int4, or the recipe of --artifact)")
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder (report.html, PNGs, report.json)")
    parser.add_argument("--backends", type=csv_list, default=["reference"], metavar="LIST",
                        help="comma-separated: reference, onnx (fast form), onnx-exact, triton (CUDA only)")
    parser.add_argument("--artifact", default=None, metavar="DIR",
                        help="load the quantized model from this saved artifact, or save it there after quantizing")
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="UTF-8 text for the evaluation tokens (default: the Wikipedia sample)")
    parser.add_argument("--calib-text", default=None, metavar="FILE", help="calibration text (default: C4 sample)")
    parser.add_argument("--tokens", type=int, default=2048, metavar="T",
                        help="window for activation ranges (sequence lengths 32/128/512/2048 up to T)")
    parser.add_argument("--err-tokens", type=int, default=256, metavar="T",
                        help="tokens for per-linear errors and backend comparisons")
    parser.add_argument("--tol", type=float, default=2e-2,
                        help="a backend diverges at a linear when ||y - y_ref|| / ||y_ref|| exceeds this")
    parser.add_argument("--check-browser", action="store_true",
                        help="open the report in headless Chromium: fail on console messages or figures that did "
                        "not load; saves screenshot.png in --out")
    add_threads_argument(parser)


def _check(args) -> None:
    from qcompile.errors import QcompileError
    from qcompile.report.backends import BACKENDS

    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        raise QcompileError(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if args.check_browser:
        from qcompile.report.browser import find_chromium

        if find_chromium() is None:
            raise QcompileError("--check-browser needs chromium (Debian: apt-get install chromium)")
    if args.tokens < 2 or args.err_tokens < 2:
        raise QcompileError(f"--tokens and --err-tokens must be at least 2, got {args.tokens} and {args.err_tokens}")
    if not 0 < args.tol < 1:
        raise QcompileError(f"--tol must be in (0, 1), got {args.tol}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise QcompileError(f"--out {args.out} exists and is not a folder")
    check_writable(out / "report.html" if out.is_dir() else out, "the --out folder")


def _tokens(args, tokenizer):
    import torch

    from qcompile.assets import read_text
    from qcompile.errors import QcompileError

    text = read_user_text(args.text) if args.text else read_text("wiki")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max(args.tokens, args.err_tokens)]
    if len(ids) < 2:
        raise QcompileError("the evaluation text has fewer than 2 tokens")
    return torch.tensor(ids, dtype=torch.long)[None]


def _load_artifact(args, model):
    import qcompile
    from qcompile.errors import QcompileError

    qm = qcompile.load(Path(args.artifact).expanduser())
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if getattr(qm.config, key, None) != getattr(model.config, key, None):
            raise QcompileError(f"--artifact {args.artifact} was made from another model ({key} "
                                f"{getattr(qm.config, key, None)} vs {getattr(model.config, key, None)})")
    return qm


def run(args: argparse.Namespace) -> dict:
    import torch
    from tqdm import tqdm

    import qcompile
    from qcompile.commands.quantize import _calibration_text, resolve_cli_recipe
    from qcompile.errors import QcompileError
    from qcompile.models import load_model, load_tokenizer
    from qcompile.report import build_report

    start = time.perf_counter()
    _check(args)
    apply_threads(args)
    artifact = Path(args.artifact).expanduser() if args.artifact else None
    reuse = artifact is not None and (artifact / "manifest.json").is_file()
    recipe = resolve_cli_recipe(args.recipe or "w4a8v4-rtn-int4", args.overrides) if not reuse or args.recipe else None
    tokenizer = load_tokenizer(args.model)
    ids = _tokens(args, tokenizer)
    model = load_model(args.model, dtype=torch.float32)
    qm = _load_artifact(args, model) if reuse else None
    if qm is not None and recipe is not None and recipe.name != qm.recipe.name:
        raise QcompileError(f"--artifact {args.artifact} holds recipe {qm.recipe.name!r}, not {recipe.name!r}; "
                            "drop --recipe or choose another --artifact folder")
    calib = _calibration_text(args, recipe) if qm is None else None
    bar = tqdm(total=7, desc="report", file=sys.stderr, leave=False)

    def step(name):
        bar.set_description(f"report: {name}")
        bar.update(1)

    result = build_report(model, ids, args.out, recipe=recipe, qm=qm, calibration=calib, tokenizer=tokenizer,
                          backends=tuple(args.backends), tol=args.tol, seq_lens=(32, 128, 512, 2048),
                          err_tokens=args.err_tokens, progress=True, step=step)
    bar.close()
    if artifact is not None and not reuse:
        qcompile.save(result["qm"], artifact)
    n = result["numbers"]
    rows = n["layers"]
    worst = min(rows, key=lambda r: r["sqnr_e2e_db"]) if rows else None
    seconds = time.perf_counter() - start
    print(f"report: {result['html']} ({len(rows)} linears, {len(result['plots'])} figures) in {seconds:.1f} s "
          f"on {torch.get_num_threads()} threads", file=sys.stderr)
    flat = {"html": str(result["html"]), "json": str(result["json"]), "recipe": n["recipe"]["name"],
            "linears": len(rows), "figures": len(result["plots"]), "seconds": round(seconds, 1),
            **{f"seconds.{k}": round(v, 2) for k, v in n["seconds"].items()}}
    if worst:
        flat.update(worst_e2e_linear=worst["module"], worst_sqnr_e2e_db=round(worst["sqnr_e2e_db"], 3),
                    mean_sqnr_e2e_db=round(sum(r["sqnr_e2e_db"] for r in rows) / len(rows), 3))
    if n["split_summary"]:
        s = n["split_summary"]
        flat.update({"dint4_lowers_underflow": s["dint4_lowers_underflow"], "int4_underflow": s["int4"]["underflow"],
                     "dint4_underflow": s["dint4"]["underflow"]})
    for backend, status in ((n.get("backends") or {}).get("status") or {}).items():
        flat[f"{backend}.status"] = status
        flat[f"{backend}.first_divergence"] = n["backends"]["first_divergence"].get(backend)
    if args.check_browser:  # after the report's own timing: the build is what the 2-minute target is about
        from qcompile.report.browser import check_in_browser

        t = time.perf_counter()
        check = check_in_browser(result["html"], screenshot=Path(result["html"]).parent / "screenshot.png")
        print(check.summary() + f" ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
        flat.update({"browser.ok": check.ok, "browser.console": len(check.console),
                     "browser.images_ok": check.images_ok, "browser.layer_rows": check.layer_rows})
        if not check.ok:
            raise QcompileError("the report did not render cleanly in Chromium: " + "; ".join(check.console[:3]))
    return flat
