"""fuse_layernorm: fold a norm's affine parameters into the linears it feeds.

Rewrites
  * OPT:   ``linear(layer_norm(x, shape, gamma, beta), W, b)``
           -> ``linear(layer_norm(x, shape), W diag(gamma), b + W beta)``
  * LLaMA: ``linear(mul(gamma, rmsnorm_chain(x)), W)``        -> ``linear(rmsnorm_chain(x), W diag(gamma))``
           (RMSNorm is matched from its decomposed ``pow/mean/add/rsqrt/mul`` chain: the final ``mul`` by a
           1-D parameter inside an ``*RMSNorm`` module).
Only norms whose every user is an in-scope linear reading it as input are fused (so the final norm
feeding a skipped ``lm_head`` stays). Full-precision outputs are unchanged up to float rounding.

Invariants: new weights are new attributes (nothing modified in place); ``meta["val"]`` unchanged for
the linears (same shapes) and dropped nodes are erased; records fused norm module names in
``gm.meta["qcompile"]["fused_norms"]`` for ``fold_scales``.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.folding import fuse_norm_into_linear
from qcompile.passes.graph_utils import get_attr_node, get_tensor, linear_sites, new_attr, node_module_path
from qcompile.passes.runner import PassResult, in_scope

__all__ = ["find_norms", "fuse_layernorm"]

aten = torch.ops.aten


def _param(gm, node):
    return get_tensor(gm, node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def find_norms(gm: fx.GraphModule) -> list[tuple[fx.Node, str, str]]:
    """``(node, kind, module)`` for every affine norm: kind "layer_norm" (the op) or "rms_mul" (the γ mul)."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.layer_norm.default and len(node.args) > 2 and node.args[2] is not None:
            out.append((node, "layer_norm", node_module_path(node)))
        elif node.target == aten.mul.Tensor and _rms_gamma(node) is not None:
            out.append((node, "rms_mul", node_module_path(node)))
    return out


def _rms_gamma(node: fx.Node):
    stack = node.meta.get("nn_module_stack") or {}
    if not stack or "RMSNorm" not in str(list(stack.values())[-1][1]):
        return None
    for i, a in enumerate(node.args[:2]):
        if isinstance(a, fx.Node) and a.op == "get_attr" and a.meta.get("val") is not None and a.meta["val"].dim() == 1:
            return i
    return None


def _consumers(gm, node, recipe):
    sites = {s.node: s for s in linear_sites(gm)}
    users = list(node.users)
    if not users or any(u not in sites or u.args[0] is not node or not in_scope(sites[u].module, recipe)
                        for u in users):
        return None
    return [sites[u] for u in users]


def fuse_layernorm(gm: fx.GraphModule, ctx) -> PassResult:
    matches, notes = 0, []
    fused = gm.meta.setdefault("qcompile", {}).setdefault("fused_norms", [])
    for node, kind, module in find_norms(gm):
        consumers = _consumers(gm, node, ctx.recipe)
        if consumers is None:
            notes.append(f"kept {module}: not every user is an in-scope linear")
            continue
        if kind == "layer_norm":
            gamma, beta = _param(gm, node.args[2]), _param(gm, node.args[3] if len(node.args) > 3 else None)
        else:
            gi = _rms_gamma(node)
            gamma, beta = _param(gm, node.args[gi]), None
        for site in consumers:
            w = get_tensor(gm, site.weight.target)
            b_node = site.node.args[2] if len(site.node.args) > 2 else None
            w2, b2 = fuse_norm_into_linear(w, _param(gm, b_node), gamma, beta)
            new_w = get_attr_node(gm, new_attr(gm, site.module + ".w", w2), site.node)
            site.node.replace_input_with(site.weight, new_w)
            if b2 is not None:
                b_attr = get_attr_node(gm, new_attr(gm, site.module + ".b", b2), site.node)
                site.node.args = (site.node.args[0], site.node.args[1], b_attr)
        if kind == "layer_norm":
            node.args = (node.args[0], node.args[1], None, None, *node.args[4:])
        else:
            other = node.args[1 - _rms_gamma(node)]
            node.replace_all_uses_with(other)
            gm.graph.erase_node(node)
        fused.append(module)
        matches += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(matches, notes)
