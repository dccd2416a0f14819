"""Ablation sweep: one preset, many field changes, one perplexity table.

    python examples/sweep_recipe.py --base w4a8v4-aqas-optq-dint4 \
        --vary clip_search=true --vary calib_samples=64 --vary "calib_samples=64,clip_search=true" \
        [--rtn w4a8v4-rtn-int4] [--max-windows 8] [--device cuda] [--json PATH] [--md PATH]

Each ``--vary`` is a comma-separated list of ``field=value`` changes to the base recipe. Values parse as
Python literals (``64``, ``0.1``, ``None``), ``true``/``false`` as booleans, anything else as a string
(``scaling=none``). The base itself is always the first row.
Gap closed is measured against ``--rtn`` (default: the base's grid with RTN rounding and no scaling).
Rows are cached in the JSON by recipe and window count, so a sweep can be resumed or extended.
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_common as C  # noqa: E402

from qcompile.recipes import PRESETS, Recipe, RecipeError  # noqa: E402

_WORDS = {"true": True, "false": False}  # None: write None (a bare "none" stays the string)


def parse_changes(text: str) -> dict:
    """``"a=1,b=true,c=dint4"`` -> ``{"a": 1, "b": True, "c": "dint4"}`` (bad syntax: ValueError)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--vary item {part!r} is not field=value")
        raw = raw.strip()
        if raw.lower() in _WORDS:
            value = _WORDS[raw.lower()]
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[key.strip()] = value
    return out


def label_of(changes: dict) -> str:
    return "base" if not changes else ",".join(f"{k}={v}" for k, v in changes.items())


def build_rows(base: Recipe, varies: list[str]) -> list[tuple[str, Recipe]]:
    fields = set(Recipe.__dataclass_fields__)
    rows = [("base", base)]
    for text in varies:
        changes = parse_changes(text)
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}; fields: {sorted(fields)}")
        label = label_of(changes)
        rows.append((label, base.replace(name=f"{base.name}[{label}]", **changes)))
    return rows


def rtn_of(recipe: Recipe) -> Recipe:
    return recipe.replace(name=f"{recipe.name}[rtn]", scaling="none", rounding="rtn", clip_search=False)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(p, "sweep.json")
    p.add_argument("--base", required=True, help="preset name the rows change")
    p.add_argument("--vary", action="append", default=[], help="field=value[,field=value...] (repeatable)")
    p.add_argument("--rtn", default=None, help="preset of the RTN reference (default: the base's grid, RTN)")
    p.add_argument("--md", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.base not in PRESETS:
        p.error(f"--base {args.base!r} is not a preset; presets: {', '.join(sorted(PRESETS))}")
    if args.rtn is not None and args.rtn not in PRESETS:
        p.error(f"--rtn {args.rtn!r} is not a preset")
    base = PRESETS[args.base]
    try:
        rows = build_rows(base, args.vary)
    except (ValueError, RecipeError) as e:
        p.error(str(e))
    rtn = PRESETS[args.rtn] if args.rtn else rtn_of(base)

    model, tok, wiki, c4 = C.setup(args.threads, args.device)
    res = C.Results(args.json, args.fresh)
    meta = {"base": base.name, "windows": args.max_windows, "machine": C.machine()}
    plan = [("fp32", None), ("rtn", rtn)] + rows
    for i, (label, recipe) in enumerate(plan, 1):
        rd = None if recipe is None else recipe.to_dict()
        if res.get(label, rd, args.max_windows) is not None:
            print(f"[{i}/{len(plan)}] {label}: cached", flush=True)
            continue
        print(f"[{i}/{len(plan)}] {label}", flush=True)
        t = time.perf_counter()
        entry = C.measure(model, tok, wiki, c4, recipe, args.max_windows)
        entry.update(total_s=round(time.perf_counter() - t, 1), measured=time.strftime("%Y-%m-%d %H:%M"))
        res.put(label, entry, meta)

    fp, ref = res.data["fp32"]["ppl"], res.data["rtn"]["ppl"]
    body = []
    for label, _ in rows:
        e = res.data[label]
        gap = C.gap_closed(e["ppl"], ref, fp)
        body.append([f"`{label}`", e["ppl"], None if gap is None else f"{gap:.0f} %", e.get("calibrate_s")])
    md = (f"Sweep of `{base.name}` on SmolLM2-135M-Instruct, Wikipedia sample, {args.max_windows} windows x 2048 "
          f"(FP32 {fp:.2f}, RTN `{rtn.name}` {ref:.2f}); "
          f"{C.machine_line([res.data['fp32'], res.data['rtn']] + [res.data[lb] for lb, _ in rows], C.machine())}.\n\n"
          + C.markdown_table(["change", "ppl", "gap closed", "calibration s"], body))
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    return res.data


if __name__ == "__main__":
    main()
