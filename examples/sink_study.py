"""Why plain OPTQ hurts SmolLM2: the attention sink, layer by layer.

    python examples/sink_study.py [--layers 3,10,20] [--sink-weight 128] [--threads 2] [--md PATH]

For the chosen decoder layers' attention and MLP linears of the default model, OPTQ-rounds each weight
(INT4 per channel, the Hessian from 8 C4 windows of 2048 tokens run through the FP model) with and
without the sink weight (``Recipe.sink_weight``), and RTN as the yardstick. It then measures, on a
held-out Wikipedia window, the relative output error ``|(W - Ŵ) x|² / |W x|²`` of the first token (the
attention sink) and the mean over the other tokens. Plain OPTQ lowers the ordinary tokens' error but can
multiply the sink's, because the sink's input lies where ordinary tokens put little energy: the
Hessian lets OPTQ park rounding error there. Every later token reads the sink's key and value, so a
broken sink costs far more perplexity than its one-token share of the Hessian says.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_common as C  # noqa: E402

from qcompile.calibration.engine import _Stats  # noqa: E402
from qcompile.calibration.optq import optq_quantize  # noqa: E402
from qcompile.formats import FormatSpec, Granularity, dequantize, quantize  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")
WINDOW = 2048


def _inputs(model, names, windows):
    rec = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: rec[n].append(a[0].detach().float())) for n in names]
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=w[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in rec.items()}  # [windows, T, K]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="3,10,20", help="decoder layer indices (default 3,10,20)")
    p.add_argument("--sink-weight", type=float, default=128.0, help="sink weight to compare with 1 (default 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--md", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    model, tok, wiki, c4 = C.setup(args.threads)
    n_layers = model.config.num_hidden_layers
    try:
        layers = [int(s) for s in args.layers.split(",") if s.strip()]
    except ValueError:
        p.error(f"--layers {args.layers!r}: give comma-separated integers")
    if not layers or any(not 0 <= i < n_layers for i in layers):
        p.error(f"--layers must be in [0, {n_layers})")
    if args.sink_weight < 1:
        p.error("--sink-weight must be >= 1")
    c4_ids = torch.tensor(tok(c4, add_special_tokens=False)["input_ids"])
    wiki_ids = torch.tensor(tok(wiki[:50_000], add_special_tokens=False)["input_ids"])
    calib = [c4_ids[i * 4000:i * 4000 + WINDOW] for i in range(8)]
    names = [f"model.layers.{i}.{n}" for i in layers for n in LINEARS]
    xc, xw = _inputs(model, names, calib), _inputs(model, names, [wiki_ids[:WINDOW]])
    fmt, gran = FormatSpec.parse("int4"), Granularity("channel")
    body = []
    for name in names:
        w = model.get_submodule(name).weight.detach().float()
        x = xw[name][0]
        y2 = (x @ w.T).pow(2).sum(-1)

        def rel(wq, x=x, y2=y2, w=w):
            e = (x @ (w - wq).T).pow(2).sum(-1) / y2
            return float(e[0]), float(e[1:].mean())

        row = [name.replace("model.layers.", ""), f"{float(x[0].norm() / x.norm(dim=-1).median()):.1f}"]
        errs = [rel(dequantize(*quantize(w, fmt, gran), fmt, gran))]
        for sw in (1.0, args.sink_weight):
            st = _Stats(w.shape[1], True, 1, torch.Generator().manual_seed(0), sink_weight=sw)
            st.add(xc[name])
            errs.append(rel(dequantize(*optq_quantize(w, st.hessian, fmt, gran), fmt, gran)))
        row += [f"{e[0]:.3f}" for e in errs] + [f"{e[1]:.4f}" for e in errs]
        body.append(row)
        print(" | ".join(row), flush=True)
    sw = f"{args.sink_weight:g}"
    md = (f"Relative output error of INT4 per-channel weights, SmolLM2-135M, Hessian from 8 C4 windows x {WINDOW}, "
          f"measured on a Wikipedia window (`python examples/sink_study.py --layers {args.layers} --sink-weight {sw}`)."
          "\n\n" + C.markdown_table(
              ["linear", "sink |x| / median |x|", "sink: RTN", "sink: OPTQ", f"sink: OPTQ, sink weight {sw}",
               "others: RTN", "others: OPTQ", f"others: OPTQ, sink weight {sw}"], body))
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    return md


if __name__ == "__main__":
    main()
