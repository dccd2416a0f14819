"""The numerics report: ``build_report`` writes ``report.html`` (self-contained), the PNG figures and
``report.json`` (every number) into a folder.

Modules, one concern each: ``collect`` (the numbers), ``ranges`` (activation ranges vs sequence length),
``backends`` (onnxruntime / Triton vs the reference, per linear), ``plots`` (matplotlib PNGs), ``html``
(the page). Nothing heavy is imported with this package.
"""
from __future__ import annotations

__all__ = ["build_report"]


def build_report(model, input_ids, out_dir, *, recipe=None, qm=None, title=None, json_path=None, **options) -> dict:
    """Collect, plot and render; returns ``{"html", "json", "plots", "numbers", "qm"}``.

    Args:
        model: the FP HF model. input_ids: ``[1, T]`` tokens (T >= 2048 for every sequence length).
        out_dir: the report folder (created; pass dumps go to ``out_dir/passes``).
        recipe / qm: quantize with ``recipe``, or report on an existing QuantizedModel (artifact).
        json_path: where to write the numbers (default ``out_dir/report.json``).
        options: passed to ``collect.collect`` (``backends``, ``tol``, ``seq_lens``, ``err_tokens``, ...).
    """
    import json
    import time
    from pathlib import Path

    from qcompile.assets import write_atomic
    from qcompile.report.collect import collect
    from qcompile.report.html import render
    from qcompile.report.plots import plot_all

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers, extras = collect(model, input_ids, recipe=recipe, qm=qm, out_dir=out, **options)
    t = time.perf_counter()
    plots = plot_all(numbers, out)
    numbers["seconds"]["plots"] = time.perf_counter() - t
    json_path = Path(json_path) if json_path else out / "report.json"
    t = time.perf_counter()
    name = title or f"qcompile numerics report: {numbers['recipe']['name']}"
    rel = json_path.name if json_path.parent.resolve() == out.resolve() else str(json_path)
    page = render(numbers, plots, name, rel)
    numbers["seconds"]["html"] = time.perf_counter() - t
    write_atomic(json_path, json.dumps(numbers, indent=1) + "\n")
    write_atomic(out / "report.html", page)
    return {"html": out / "report.html", "json": json_path, "plots": plots, "numbers": numbers, "qm": extras["qm"]}
