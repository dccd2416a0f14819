"""fold_scales: fold per-input-channel scales (SmoothQuant / AWQ / AQAS) into producer and consumers.

For every ``producer -> consumers`` scale ``s`` in ``ctx.calibration.scales`` (keyed by the producer's
HF module name, ``s`` on the producer's output channels):
  * consumers: ``W -> W diag(s)`` (GQA: V's scales expanded to o_proj's query-head channels);
  * norm producer: ``gamma -> gamma / s``, ``beta -> beta / s`` (a fused, affine-free norm gets
    ``gamma = 1 / s``; a fused RMSNorm gets one ``mul`` by ``1 / s``, the only case with a runtime cost);
  * linear producer (v_proj, up_proj, fc1): rows ``W_p / s`` and ``b_p / s``.
Full-precision outputs are unchanged up to float rounding (zero runtime cost otherwise).
Invariants: no in-place change; ``meta["val"]`` of new nodes inferred.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.folding import expand_kv_scales, scale_columns, scale_rows
from qcompile.passes.fuse_layernorm import _param, _rms_gamma
from qcompile.passes.graph_utils import get_attr_node, get_tensor, infer_val, linear_sites, new_attr
from qcompile.passes.runner import PassResult

__all__ = ["fold_scales"]

aten = torch.ops.aten


def _set_linear(gm, site, weight=None, bias=None):
    node = site.node
    if weight is not None:
        node.replace_input_with(node.args[1], get_attr_node(gm, new_attr(gm, site.module + ".w", weight), node))
    if bias is not None:
        b = get_attr_node(gm, new_attr(gm, site.module + ".b", bias), node)
        node.args = (node.args[0], node.args[1], b)


def _fold_into_norm(gm, x: fx.Node, s: torch.Tensor, consumers) -> str:
    inv = 1.0 / s
    if x.target == aten.layer_norm.default:
        gamma, beta = _param(gm, x.args[2]), _param(gm, x.args[3] if len(x.args) > 3 else None)
        g2 = inv if gamma is None else gamma / s
        args = list(x.args) + [None] * (4 - len(x.args))
        args[2] = get_attr_node(gm, new_attr(gm, "norm.w", g2), x)
        if beta is not None:
            args[3] = get_attr_node(gm, new_attr(gm, "norm.b", beta / s), x)
        x.args = tuple(args)
        return "norm"
    gi = _rms_gamma(x) if x.target == aten.mul.Tensor else None
    if gi is not None:
        gamma = _param(gm, x.args[gi])
        x.replace_input_with(x.args[gi], get_attr_node(gm, new_attr(gm, "norm.w", gamma / s), x))
        return "norm"
    # fused (affine-free) RMSNorm: one element-wise mul by 1/s, placed right before the first consumer
    first = consumers[0].node
    inv_node = get_attr_node(gm, new_attr(gm, "norm.inv_s", inv.to(x.meta["val"].dtype)), first)
    with gm.graph.inserting_before(first):
        mul = gm.graph.call_function(aten.mul.Tensor, (x, inv_node))
    mul.meta["nn_module_stack"] = x.meta.get("nn_module_stack", {})
    for site in consumers:
        site.node.replace_input_with(x, mul)
    infer_val(gm, mul)
    return "mul"


def fold_scales(gm: fx.GraphModule, ctx) -> PassResult:
    scales = getattr(ctx.calibration, "scales", None) or {}
    if not scales:
        return PassResult(0, ["no scales to fold (recipe scaling is 'none' or no calibration)"])
    sites = {s.module: s for s in linear_sites(gm)}
    head_dim = getattr(ctx.config, "head_dim", None) or ctx.config.hidden_size // ctx.config.num_attention_heads
    matches, notes = 0, []
    for group in _groups(ctx):
        s = scales.get(group.producer_full)
        if s is None:
            continue
        consumers = [sites[c] for c in group.consumers_full]
        for site in consumers:
            w = get_tensor(gm, site.node.args[1].target)
            _set_linear(gm, site, weight=scale_columns(w, expand_kv_scales(s, w.shape[1], head_dim)))
        if group.kind == "norm":
            how = _fold_into_norm(gm, consumers[0].node.args[0], s, consumers)
            if how == "mul":
                notes.append(f"{group.producer_full}: fused RMSNorm, scales applied by one mul")
        else:
            prod = sites[group.producer_full]
            w = get_tensor(gm, prod.node.args[1].target)
            b_node = prod.node.args[2] if len(prod.node.args) > 2 else None
            w2, b2 = scale_rows(w, _param(gm, b_node), s)
            _set_linear(gm, prod, weight=w2, bias=b2)
        matches += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(matches, notes)


class _FullGroup:
    def __init__(self, prefix, g):
        self.producer_full = f"{prefix}.{g.producer}"
        self.consumers_full = [f"{prefix}.{c}" for c in g.consumers]
        self.kind = g.kind


def _groups(ctx):
    n_layers = ctx.config.num_hidden_layers
    for i in range(n_layers):
        for g in ctx.arch.groups:
            yield _FullGroup(f"{ctx.arch.layers}.{i}", g)
