"""Numerics debugging: per-linear error of a quantized graph against its full-precision twin.

The twin is the same captured graph with only the FP-exact passes applied (``fuse_layernorm`` and
``fold_scales`` with the same calibration scales), so every linear sees inputs in the same space.
Both graphs run on the same tokens; for each quantized linear we report
  * ``sqnr_local_db``: SQNR of ``qdq(x) @ dq(codes)ᵀ`` vs ``x @ Wᵀ`` on the FP twin's input ``x``
    (this layer's own error);
  * ``sqnr_e2e_db``: SQNR of the quantized graph's actual output at that layer vs the twin's
    (error accumulated through every layer before it);
  * the AQAS paper's eq. 4 split of the weight error ``Δ = Ŵ − W`` into underflow (weights quantized
    to zero, ``Δ_u``) and rounding (``Δ_r``): ``E[(Δ_u X)²]``, ``E[(Δ_r X)²]``.

    rows = qcompile.debug.layer_errors(model, qm, input_ids)
    print(qcompile.debug.format_rows(rows))
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from qcompile.passes.graph_utils import annotation

__all__ = ["fp_twin", "record_linears", "layer_errors", "format_rows", "sqnr_db"]

_QDQ = "qcompile.qdq_activation"
_DQ = "qcompile.dequantize_weight"


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(‖ref‖² / ‖ref − approx‖²)`` in dB (inf when equal)."""
    noise = (ref.double() - approx.double()).pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def fp_twin(model, qm):
    """The captured graph with only FP-exact passes (fusion, scale folding) of ``qm``'s recipe."""
    from qcompile.capture import capture
    from qcompile.passes.fold_scales import fold_scales
    from qcompile.passes.fuse_layernorm import fuse_layernorm
    from qcompile.passes.runner import run_passes
    from qcompile.pipeline import _context

    gm = capture(model)
    passes = ([("fuse_layernorm", fuse_layernorm)] if qm.recipe.fuse_layernorm else []) + [("fold_scales", fold_scales)]
    run_passes(gm, _context(qm.recipe, model.config, qm.calibration), passes=passes)
    return gm


def _is(node, name):
    return node.op == "call_function" and str(node.target).startswith(name)


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm, garbage_collect_values=False)  # inputs are read after their last use
        self.records = {}

    def run_node(self, n):
        out = super().run_node(n)
        info = annotation(n)
        if info is not None and info.role == "linear" and n.target == torch.ops.aten.linear.default:
            x_node = n.args[0]
            pre = x_node.args[0] if _is(x_node, _QDQ) else x_node
            w_node = n.args[1]
            rec = {"x": self.env[pre], "y": out, "w": self.env[w_node], "info": info}
            if _is(w_node, _DQ):
                rec["codes_zero"] = self.env[w_node] == 0
            self.records[info.module] = rec
        return out


def record_linears(gm, input_ids: torch.Tensor) -> dict:
    """Run ``gm`` on ``input_ids`` and keep, per annotated linear: its input (before QDQ), output, weight."""
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(input_ids)
    return rec.records


def layer_errors(model, qm, input_ids: torch.Tensor, max_tokens: int = 4096) -> list[dict]:
    """Per quantized linear (graph order): local and end-to-end SQNR, and the underflow/rounding split."""
    twin = record_linears(fp_twin(model, qm), input_ids)
    quant = record_linears(qm.graph_module, input_ids)
    rows = []
    for module, q in quant.items():
        info, t = q["info"], twin.get(module)
        if t is None or not (info.weight_format or info.act_format):
            continue
        x = t["x"].reshape(-1, t["x"].shape[-1])[:max_tokens].float()
        w, w_hat = t["w"].float(), q["w"].float()
        if w.shape != w_hat.shape:  # salient split: compare only where shapes agree
            continue
        xq = x if not info.act_format else torch.ops.qcompile.qdq_activation(x, info.act_format, info.act_granularity)
        y_ref, y_loc = x @ w.T, xq @ w_hat.T
        delta = w_hat - w
        under = (w_hat == 0) & (w != 0)
        e_u = ((delta * under) @ x.T).pow(2).mean().item()
        e_r = ((delta * ~under) @ x.T).pow(2).mean().item()
        rows.append({
            "module": module, "weight": info.weight_format or "-", "w_gran": info.weight_granularity or "-",
            "act": info.act_format or "-", "a_gran": info.act_granularity or "-",
            "sqnr_local_db": sqnr_db(y_ref, y_loc), "sqnr_e2e_db": sqnr_db(t["y"], q["y"]),
            "underflow_err": e_u, "rounding_err": e_r, "zero_frac": under.float().mean().item(),
            "x_min": x.min().item(), "x_max": x.max().item(),
        })
    return rows


def format_rows(rows: list[dict], keys=("module", "weight", "w_gran", "act", "sqnr_local_db", "sqnr_e2e_db",
                                        "underflow_err", "rounding_err")) -> str:
    """A markdown table of ``layer_errors`` rows."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
