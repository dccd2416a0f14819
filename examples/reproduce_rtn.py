"""RTN formats on the default model (issue 3): Wikipedia-sample perplexity, FP32 and every RTN scheme.

    python examples/reproduce_rtn.py [--max-windows 8] [--threads 2]

Rows: FP32; W8A8; W4A16 per-channel INT4 / dINT4 / FP4-E3M0 / FP4-E2M1 / FP4-E1M2 (the AQAS paper's
Tables 13-14 analogue); W4A8 per-channel INT4 and dINT4; W4A8V4 INT4 and dINT4; W4A4 g64 (weights and
activations); W4A4 per-channel/per-token; W4A4 with 1 % / 10 % FP16 salient channels (their channel
statistics come from the C4 sample). All linears of the decoder layers are quantized, lm_head is kept.
The table goes between ``<!-- BEGIN rtn-table -->`` and ``<!-- END rtn-table -->`` in README.md, the
numbers to examples/results/rtn.json (a rerun reuses rows already measured with the same recipe and
window count; ``--fresh`` measures everything again).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_common as C  # noqa: E402

from qcompile.recipes import Recipe  # noqa: E402

W4A16 = dict(act_format=None)
ROWS = [
    # label, description, recipe (None = FP32)
    ("fp32", "FP32", None),
    ("w8a8", "W8A8: INT8 per-channel W, INT8 per-token A", Recipe.from_preset("w8a8-rtn")),
    ("w4a16-int4", "W4A16 per-channel INT4", Recipe.from_preset("w4a16-rtn-int4")),
    ("w4a16-dint4", "W4A16 per-channel dINT4", Recipe("w4a16-rtn-dint4", weight_format="dint4", **W4A16)),
    ("w4a16-fp4-e3m0", "W4A16 per-channel FP4-E3M0", Recipe("w4a16-rtn-fp4-e3m0", weight_format="fp4_e3m0", **W4A16)),
    ("w4a16-fp4-e2m1", "W4A16 per-channel FP4-E2M1", Recipe("w4a16-rtn-fp4-e2m1", weight_format="fp4_e2m1", **W4A16)),
    ("w4a16-fp4-e1m2", "W4A16 per-channel FP4-E1M2", Recipe("w4a16-rtn-fp4-e1m2", weight_format="fp4_e1m2", **W4A16)),
    ("w4a8-int4", "W4A8 per-channel INT4, INT8 per-token", Recipe.from_preset("w4a8-rtn-int4")),
    ("w4a8-dint4", "W4A8 per-channel dINT4, INT8 per-token", Recipe.from_preset("w4a8-rtn-dint4")),
    ("w4a8v4-int4", "W4A8V4: W4A8 INT4 + V INT4 per channel", Recipe.from_preset("w4a8v4-rtn-int4")),
    ("w4a8v4-dint4", "W4A8V4 with dINT4 weights", Recipe.from_preset("w4a8v4-rtn-dint4")),
    ("w4a4-g64", "W4A4 g64 (weights and activations)", Recipe.from_preset("w4a4-g64-rtn")),
    ("w4a4", "W4A4 per-channel / per-token", Recipe.from_preset("w4a4-rtn")),
    ("w4a4-mixed1", "W4A4 per-channel/token, 1 % FP16 salient channels", Recipe.from_preset("w4a4-mixed1-rtn")),
    ("w4a4-mixed10", "W4A4 per-channel/token, 10 % FP16 salient channels", Recipe.from_preset("w4a4-mixed10-rtn")),
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(p, "rtn.json")
    args = p.parse_args(argv)
    model, tok, wiki, c4 = C.setup(args.threads, args.device)
    res = C.Results(args.json, args.fresh)
    meta = {"model": "SmolLM2-135M-Instruct (default)", "text": "Wikipedia sample", "window": 2048,
            "windows": args.max_windows, "machine": C.machine()}
    only = {s for s in args.only.split(",") if s}
    rows = [r for r in ROWS if not only or r[0] in only or r[0] == "fp32"]
    for i, (label, desc, recipe) in enumerate(rows, 1):
        rd = None if recipe is None else recipe.to_dict()
        if res.get(label, rd, args.max_windows):
            print(f"[{i}/{len(rows)}] {label}: cached ppl {res.data[label]['ppl']:.3f}", flush=True)
            continue
        print(f"[{i}/{len(rows)}] {label}: {desc}", flush=True)
        t = time.perf_counter()
        entry = C.measure(model, tok, wiki, c4, recipe, args.max_windows)
        entry.update(desc=desc, total_s=round(time.perf_counter() - t, 1), measured=time.strftime("%Y-%m-%d %H:%M"))
        res.put(label, entry, meta)
    fp = res.data["fp32"]["ppl"]
    table, shown = [], []
    for label, desc, recipe in ROWS:
        e = res.data.get(label)
        if e is None or e.get("windows") != args.max_windows:
            continue
        shown.append(e)
        q = "" if recipe is None else f"`{recipe.name}`"
        table.append([desc, q, e["ppl"], None if recipe is None else f"{100 * (e['ppl'] / fp - 1):+.1f} %",
                      e.get("quantize_s")])
    text = (f"SmolLM2-135M-Instruct, Wikipedia sample, {args.max_windows} windows × 2048 tokens, "
            f"`python examples/reproduce_rtn.py --max-windows {args.max_windows}` on "
            f"{C.machine_line(shown, meta['machine'])}. "
            "All 210 decoder linears quantized (lm_head kept); RTN, asymmetric min-max unless FP4.\n\n"
            + C.markdown_table(["scheme", "recipe", "ppl", "vs FP32", "quantize s"], table))
    where = C.write_block("rtn-table", text, args.no_readme)
    print(text)
    print(f"table -> {where}; numbers -> {args.json}")
    return res.data


if __name__ == "__main__":
    main()
