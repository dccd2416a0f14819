"""All the report's numbers, as one JSON-able dict: pass log, per-linear errors, ranges, backends.

One ``capture`` serves both graphs (the quantized one and its FP twin): ``torch.export`` is the slowest
step of a report on the default model. The twin runs once on the longest window (activation ranges
for every sequence length, see ``ranges``); its first ``err_tokens`` positions feed the per-linear
errors, which the quantized graph computes on the same ``err_tokens`` tokens.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

__all__ = ["collect", "summarize_split"]


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e300 if v > 0 else -1e300)
    return v


def _clean(obj):
    """JSON-safe: inf/nan out, tensors to lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    return _finite(obj)


def summarize_split(rows: list[dict]) -> dict:
    """The paper's qualitative check (Fig. 4(b)/(d)): does dINT4 lower the underflow error vs INT4?"""
    if not rows:
        return {}
    tot = {f: {k: sum(r[f"{f}_{k}"] for r in rows) for k in ("underflow", "rounding", "total")}
           for f in ("int4", "dint4")}
    lower = sum(r["dint4_underflow"] < r["int4_underflow"] for r in rows)
    return {"int4": tot["int4"], "dint4": tot["dint4"], "linears": len(rows), "dint4_lower_underflow": lower,
            "dint4_lowers_underflow": tot["dint4"]["underflow"] < tot["int4"]["underflow"],
            "dint4_lowers_total": tot["dint4"]["total"] < tot["int4"]["total"]}


def _pass_log(qm, dump_dir: Path | None) -> list[dict]:
    rows = []
    for i, entry in enumerate(qm.pass_log, start=1):
        row = asdict(entry)
        for kind in ("txt", "diff"):
            f = dump_dir / f"{i:02d}_{entry.name}.{kind}" if dump_dir else None
            row[kind] = f"passes/{f.name}" if f is not None and f.is_file() else None
        rows.append(row)
    return rows


def collect(model, input_ids: torch.Tensor, *, recipe=None, qm=None, calibration=None, tokenizer=None,
            out_dir: Path | None = None, seq_lens=(32, 128, 512, 2048), err_tokens: int = 512,
            backends=(), tol: float = 2e-2, device=None, progress: bool = True, step=None) -> tuple[dict, dict]:
    """Quantize (unless ``qm`` is given), run twin and quantized graphs, compare backends.

    Args:
        model: the FP HF model. input_ids: ``[1, T]`` evaluation tokens (T >= max(seq_lens) for all lengths).
        recipe / qm: quantize ``model`` with ``recipe``, or use a QuantizedModel (e.g. a loaded artifact).
        out_dir: pass dumps go to ``out_dir/passes``. step: ``step(name)`` called before each stage.

    Returns:
        ``(numbers, extras)``: the JSON-able numbers and what plots need beyond them (``ranges`` collector).
    """
    from qcompile.capture import capture
    from qcompile.debug import fp_twin, layer_errors, record_linears
    from qcompile.pipeline import prepare_model, quantize
    from qcompile.report.backends import compare_backends
    from qcompile.report.ranges import RangeCollector

    step = step or (lambda name: None)
    seconds, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        seconds[name] = time.perf_counter() - t
        t = time.perf_counter()

    dump = out_dir / "passes" if out_dir is not None else None
    twin_src = None
    if qm is None:
        step("capture")
        captured = capture(prepare_model(model, recipe))
        twin_src = copy.deepcopy(captured)
        lap("capture")
        step("quantize")
        qm = quantize(model, recipe, calibration=calibration, tokenizer=tokenizer, progress=progress,
                      dump_dir=dump, captured=captured)
        lap("quantize")
    step("fp twin")
    twin = fp_twin(model, qm, captured=twin_src)
    lap("fp_twin")
    n = int(input_ids.shape[1])
    lens = tuple(s for s in seq_lens if s <= n) or (n,)
    err_tokens = min(err_tokens, n)
    run_tokens = max(*lens, err_tokens)
    step(f"FP twin run ({run_tokens} tokens)")
    ranges = RangeCollector(lens)
    twin_records = record_linears(twin, input_ids[:1, :run_tokens], keep_tokens=err_tokens, on_input=ranges)
    del twin
    lap("twin_run")
    step(f"quantized run ({err_tokens} tokens)")
    ids = input_ids[:1, :err_tokens]
    quant_records = record_linears(qm.graph_module, ids, keep_tokens=err_tokens)
    lap("quant_run")
    step("per-linear errors")
    layers = layer_errors(model, qm, ids, err_tokens, twin_records=twin_records, quant_records=quant_records)
    lap("layer_errors")
    compared = None
    wanted = [b for b in backends if b != "reference"]
    if wanted:
        step(f"backends {','.join(wanted)}")
        compared = compare_backends(qm, ids, wanted, tol, device=device, reference_records=quant_records)
        lap("backends")
    numbers = {
        "recipe": qm.recipe.to_dict(), "tokens": {"ranges": max(lens), "errors": err_tokens},
        "pass_log": _pass_log(qm, dump), "pass_dumps": dump is not None and dump.is_dir(),
        "layers": list(layers), "split_summary": summarize_split(layers),
        "ranges": ranges.result(),
        "backends": None if compared is None else {
            "tol": tol, "status": compared.meta["status"], "first_divergence": compared.meta["first_divergence"],
            "rows": list(compared)},
        "seconds": seconds, "quantize_seconds": dict(qm.seconds),
    }
    return _clean(numbers), {"qm": qm}
