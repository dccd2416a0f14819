"""share_activation_quantization: sibling W4A8 linears of one input quantize that input once.

After ``lower_linears``, a LLaMA layer's q/k/v projections (and gate/up) are separate
``w4_linear_codes`` nodes on the same activation, each quantizing it per token again (at decode,
one extra ~3 us launch each). This pass groups them::

    q = w4_linear_codes(x, codes_q, ...)              ys = w4_linear_codes_shared(x, [codes_q, codes_k, codes_v], ...)
    k = w4_linear_codes(x, codes_k, ...)     ->       q, k, v = ys[0], ys[1], ys[2]
    v = w4_linear_codes(x, codes_v, ...)

Grouped: the same input node, int8 per-token activations (same format), per-channel weights of one
format and ``in_features``, and weight / bias operands that are graph inputs or attributes (so the
shared node can sit before the first member). The weights stay separate tensors (nothing is
concatenated or baked in), each GEMM is the same kernel on the same codes: outputs are bitwise the
same as without the pass. Not run by ``debug.compare``, which wants one node per site.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .qcodes_sites import node_val

__all__ = ["share_activation_quantization"]

_KERNEL = torch.ops.qcompile_triton.w4_linear_codes.default
_SHARED = torch.ops.qcompile_triton.w4_linear_codes_shared.default


def _shareable(node: fx.Node) -> tuple | None:
    """Group key of a lowered site, or None if it cannot share."""
    if node.op != "call_function" or node.target is not _KERNEL:
        return None
    x, codes, scale, zp, fmt, gran, k, act_fmt, bias = node.args
    if str(gran) != "channel" or str(act_fmt) not in ("int8", "int8_sym"):
        return None
    operands = [codes, scale, zp] + ([bias] if bias is not None else [])
    if not all(isinstance(o, fx.Node) and o.op in ("placeholder", "get_attr") for o in operands):
        return None
    return (x, str(fmt), int(k), str(act_fmt))


def share_activation_quantization(gm: fx.GraphModule) -> int:
    """Rewrite groups of >= 2 sibling lowered linears in place; returns the number of groups."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        key = _shareable(node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    count = 0
    for (x, fmt, k, act_fmt), members in groups.items():
        if len(members) < 2:
            continue
        cols = list(zip(*(m.args[1:4] for m in members)))
        biases = [m.args[8] for m in members]
        with gm.graph.inserting_before(members[0]):
            shared = gm.graph.call_function(_SHARED, (x, list(cols[0]), list(cols[1]), list(cols[2]), fmt, "channel",
                                                      k, act_fmt, biases))
            vals = [node_val(m) for m in members]
            if all(v is not None for v in vals):
                shared.meta["val"] = vals
            for i, member in enumerate(members):
                item = gm.graph.call_function(operator.getitem, (shared, i))
                item.meta.update(member.meta)
                member.replace_all_uses_with(item)
        for member in members:
            gm.graph.erase_node(member)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
