"""insert_act_qdq: dynamic quantize-dequantize on linear inputs and on attention Values.

Rewrites
  * ``linear(x, W)`` -> ``linear(qcompile.qdq_activation(x, act_fmt, act_gran), W)`` for every in-scope
    linear (per-token, or per-group g along K); linears sharing one input (q/k/v) share one qdq node;
  * ``v = linear_v(x)`` -> ``qcompile.qdq_activation(v, v_fmt, "vchannel")``: V quantized per channel
    over the tokens (AQAS paper appendix A.1, W4A8V4).
Linears marked ``role="salient"`` by keep_salient_fp16 keep floating-point inputs.
Invariants: ``meta["val"]`` inferred for every new node; annotations updated under ``meta[QMETA]``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

from qcompile import ops  # noqa: F401  (registers the qcompile:: ops)
from qcompile.passes.graph_utils import SiteInfo, annotate, annotation, infer_val, linear_sites
from qcompile.passes.runner import PassResult, in_scope

__all__ = ["insert_act_qdq"]

_QDQ = torch.ops.qcompile.qdq_activation.default


def _qdq_after(gm, x: fx.Node, fmt: str, gran: str, anchor: fx.Node) -> fx.Node:
    with gm.graph.inserting_after(x) if x.op != "placeholder" else gm.graph.inserting_before(anchor):
        q = gm.graph.call_function(_QDQ, (x, fmt, gran))
    q.meta["nn_module_stack"] = anchor.meta.get("nn_module_stack", {})
    infer_val(gm, q)
    return q


def insert_act_qdq(gm: fx.GraphModule, ctx) -> PassResult:
    recipe = ctx.recipe
    matches, notes = 0, []
    shared: dict[tuple, fx.Node] = {}
    for site in linear_sites(gm):
        info = annotation(site.node) or SiteInfo(site.module)
        if recipe.act_format is None or info.role != "linear" or not in_scope(site.module, recipe):
            continue
        x = site.node.args[0]
        key = (x, recipe.act_format, recipe.act_granularity)
        if key not in shared:
            shared[key] = _qdq_after(gm, x, recipe.act_format, recipe.act_granularity, site.node)
        site.node.replace_input_with(x, shared[key])
        annotate(site.node, dataclasses.replace(info, act_format=recipe.act_format,
                                                act_granularity=recipe.act_granularity))
        matches += 1
    if recipe.v_format is not None:
        for site in linear_sites(gm):
            if not site.module.endswith("." + ctx.arch.v_proj):
                continue
            users = list(site.node.users)
            q = _qdq_after(gm, site.node, recipe.v_format, "vchannel", site.node)
            for u in users:
                u.replace_input_with(site.node, q)
            annotate(q, SiteInfo(site.module, act_format=recipe.v_format, act_granularity="vchannel", role="v"))
            matches += 1
    if recipe.act_format is not None and recipe.act_gran.kind == "group":
        notes.append(f"per-group activations, g={recipe.act_gran.group_size}")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(matches, notes)
