"""keep_salient_fp16: keep the top-r salient input channels of each linear in floating point.

The W4A4 paper's mixed-precision method (§2.2): channels with the largest mean |activation| on the
calibration batches are "salient"; both their activations and the matching weight columns stay in
floating point, the rest is quantized. Rewrites
    ``linear(x, W, b)`` -> ``add(linear(index_select(x, -1, rest), W[:, rest], b),
                                 linear(index_select(x, -1, sal), W[:, sal]))``
The first linear is annotated ``role="linear"`` (quantized later by quantize_weights/insert_act_qdq),
the second ``role="salient"`` (left alone). Needs ``ctx.calibration.act_stats[module]["absmean"]``.
Invariants: outputs unchanged in full precision (up to summation order); ``meta["val"]`` inferred.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.errors import CalibrationError
from qcompile.passes.graph_utils import (
    SiteInfo,
    annotate,
    get_attr_node,
    get_tensor,
    infer_val,
    linear_sites,
    new_attr,
)
from qcompile.passes.runner import PassResult, in_scope

__all__ = ["keep_salient_fp16", "salient_channels"]

aten = torch.ops.aten


def salient_channels(absmean: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(salient, rest)`` (each sorted) of the top ``ratio`` share of channels by magnitude."""
    k = absmean.numel()
    n = max(1, int(round(ratio * k))) if ratio > 0 else 0
    order = torch.argsort(absmean.float(), descending=True)
    return order[:n].sort().values, order[n:].sort().values


def keep_salient_fp16(gm: fx.GraphModule, ctx) -> PassResult:
    ratio = ctx.recipe.fp16_ratio
    stats = getattr(ctx.calibration, "act_stats", None) or {}
    matches = 0
    for site in linear_sites(gm):
        if not in_scope(site.module, ctx.recipe):
            continue
        if site.module not in stats:
            raise CalibrationError(f"keep_salient_fp16 needs activation statistics for {site.module}: "
                                   "pass calibration data to qcompile.quantize")
        sal, rest = salient_channels(stats[site.module]["absmean"], ratio)
        node, x = site.node, site.node.args[0]
        w = get_tensor(gm, site.weight.target)
        sal, rest = sal.to(w.device), rest.to(w.device)  # statistics may come back on the CPU
        bias = node.args[2] if len(node.args) > 2 else None
        g = gm.graph
        idx_r, idx_s = (get_attr_node(gm, new_attr(gm, site.module + n, t), node) for n, t in (
            (".rest_idx", rest), (".sal_idx", sal)))
        w_r, w_s = (get_attr_node(gm, new_attr(gm, site.module + n, t), node) for n, t in (
            (".w_rest", w[:, rest]), (".w_sal", w[:, sal])))
        with g.inserting_before(node):
            x_r = g.call_function(aten.index_select.default, (x, -1, idx_r))
            x_s = g.call_function(aten.index_select.default, (x, -1, idx_s))
            y_r = g.call_function(aten.linear.default, (x_r, w_r, bias))
            y_s = g.call_function(aten.linear.default, (x_s, w_s))
            y = g.call_function(aten.add.Tensor, (y_r, y_s))
        for n in (x_r, x_s, y_r, y_s, y):
            n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            infer_val(gm, n)
        annotate(y_r, SiteInfo(site.module, fp16_channels=len(sal)))
        annotate(y_s, SiteInfo(site.module, fp16_channels=len(sal), role="salient"))
        node.replace_all_uses_with(y)
        g.erase_node(node)
        matches += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(matches, [f"{ratio:.0%} of input channels kept in floating point"])
