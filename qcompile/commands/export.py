"""``qcompile export``: quantize (or load a saved artifact) and write an ONNX model onnxruntime runs.

    qcompile export --model default --recipe w4a8v4-rtn-int4 --out model.onnx --form both --check

``--form exact`` writes the QuantizeLinear/DequantizeLinear graph (the reference numerics); ``fast``
the form onnxruntime's CPU kernels fuse (MatMulIntegerToFloat / MatMulNBits); ``both`` writes ``OUT`` (exact)
and ``OUT`` with ``.fast.onnx`` (fast) from one trace. ``--check`` runs onnxruntime and the reference
on the first ``--max-windows`` Wikipedia windows and reports logit errors and both perplexities
(keys ``parity.<form>.*``); the reference runs PyTorch's SDPA math kernel, the formula the graph holds
(``--reference-attention default`` for PyTorch's default kernel; see ``backends/onnx/parity.py``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qcompile.cli import (
    add_model_argument,
    add_recipe_arguments,
    add_threads_argument,
    apply_threads,
    format_rows,
    read_user_text,
)
from qcompile.errors import QcompileError

if TYPE_CHECKING:
    import torch

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_recipe_arguments(parser)
    parser.add_argument("--artifact", default=None, metavar="DIR",
                        help="export this saved artifact (`qcompile quantize --save`) instead of quantizing")
    parser.add_argument("--calib-text", default=None, metavar="FILE", help="calibration text (default: C4 sample)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    parser.add_argument("--form", choices=("exact", "fast", "both"), default="exact")
    parser.add_argument("--opset", type=int, default=21)
    parser.add_argument("--check", action="store_true", help="parity of onnxruntime vs the reference")
    parser.add_argument("--check-text", default=None, metavar="FILE", help="--check: text (default: Wikipedia)")
    parser.add_argument("--max-windows", type=int, default=2, metavar="N", help="--check: Wikipedia windows")
    parser.add_argument("--window", type=int, default=2048, metavar="T", help="--check: window length in tokens")
    parser.add_argument("--reference-attention", choices=("math", "default"), default="math",
                        help="--check: the reference's SDPA kernel; math = the formula the ONNX graph holds")
    add_threads_argument(parser)


def _paths(out: Path, form: str) -> dict[str, Path]:
    if form != "both":
        return {form: out}
    return {"exact": out, "fast": out.with_name(out.stem + ".fast.onnx")}


def _quantized_model(args):
    import torch

    from qcompile.commands.quantize import _calibration_text, resolve_cli_recipe

    if args.artifact:
        from qcompile.artifacts import load

        return load(args.artifact)
    from qcompile.models import load_model, load_tokenizer
    from qcompile.pipeline import quantize

    recipe = resolve_cli_recipe(args.recipe, args.overrides)
    calib_text = _calibration_text(args, recipe)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32)
    return quantize(model, recipe, calibration=calib_text, tokenizer=tokenizer)


def _parity_batches(args) -> torch.Tensor:
    import torch

    from qcompile.assets import read_text
    from qcompile.evaluate import encode
    from qcompile.models import load_tokenizer

    if args.max_windows < 1 or args.window < 2:
        raise QcompileError("--check needs --max-windows >= 1 and --window >= 2")
    text = read_user_text(args.check_text) if args.check_text else read_text("wiki")
    ids = torch.tensor(encode(load_tokenizer(args.model), text), dtype=torch.long)
    n = min(args.max_windows, ids.numel() // args.window)
    if n < 1:
        raise QcompileError(f"the parity text has {ids.numel()} tokens, fewer than one --window of {args.window}")
    return [ids[i * args.window:(i + 1) * args.window][None] for i in range(n)]


def run(args: argparse.Namespace) -> dict:
    import torch

    from qcompile.backends.onnx.export import _check_request, export_onnx_forms

    start = time.perf_counter()
    paths = _paths(Path(args.out).expanduser(), args.form)
    for form, p in paths.items():  # bad opset / form / folder fails before any work
        _check_request(p, args.opset, form)
    apply_threads(args)
    batches = _parity_batches(args) if args.check else None
    qm = _quantized_model(args)
    t = time.perf_counter()
    written = export_onnx_forms(qm, paths, args.opset)
    results = {"recipe": qm.recipe.name, "opset": args.opset, "export_seconds": round(time.perf_counter() - t, 1)}
    rows = [("form", "file", "MB")]
    for form, p in written.items():
        size = sum(f.stat().st_size for f in p.parent.glob(p.name + "*")) / 2**20
        rows.append((form, str(p), f"{size:.1f}"))
        results[f"{form}.path"], results[f"{form}.mb"] = str(p), round(size, 2)
    print(format_rows(rows))
    if batches is not None:
        from qcompile.backends.onnx.parity import onnx_parity

        prow = [("form", "max |dlogit|", "mean |dlogit|", "ppl reference", "ppl onnx", "ppl diff")]
        for form, p in written.items():
            r = onnx_parity(qm, p, batches, threads=torch.get_num_threads(), attention=args.reference_attention)
            prow.append((form, f"{r['max_abs_logit_error']:.4g}", f"{r['mean_abs_logit_error']:.4g}",
                         f"{r['ppl_reference']:.4f}", f"{r['ppl_onnx']:.4f}", f"{100 * r['ppl_rel_diff']:+.3f}%"))
            results.update({f"parity.{form}.{k}": v for k, v in r.items()})
        print(format_rows(prow))
        print(f"reference attention: PyTorch SDPA {args.reference_attention} kernel"
              + (" (the MatMul-Softmax-MatMul formula the graph holds)" if args.reference_attention == "math" else ""))
    print(f"export: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return results
