"""quantize_weights: replace each in-scope linear's weight by integer codes + qparams + a dequantize op.

Rewrites ``linear(x, W, b)`` -> ``linear(x, qcompile.dequantize_weight(codes, scale, zp, fmt, gran, K), b)``
where ``codes`` are packed two per byte for formats of at most 4 bits. The codes come from calibration
(OPTQ rounding, ``ctx.calibration.weights[module]``) when present, else round-to-nearest with the
reference quantizer (``qcompile.formats.quantize``). A group size that does not divide K is rejected
with a message naming the layer (no padding: padding would change the reduction the kernels see).

Invariants: annotates each rewritten linear with ``SiteInfo`` under ``meta[QMETA]``; ``meta["val"]`` of
the dequantize node inferred (same shape/dtype as the weight it replaces); original weights untouched.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

from qcompile import formats as F
from qcompile import ops
from qcompile.passes.graph_utils import (
    SiteInfo,
    annotate,
    annotation,
    get_attr_node,
    get_tensor,
    infer_val,
    linear_sites,
    new_attr,
)
from qcompile.passes.runner import PassResult, in_scope

__all__ = ["quantize_weights"]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def quantize_weights(gm: fx.GraphModule, ctx) -> PassResult:
    recipe = ctx.recipe
    fmt, gran = recipe.weight_spec, recipe.weight_gran
    if fmt is None:
        return PassResult(0, ["recipe keeps weights in floating point"])
    precomputed = getattr(ctx.calibration, "weights", None) or {}
    matches, n_calibrated = 0, 0
    for site in linear_sites(gm):
        info = annotation(site.node) or SiteInfo(site.module)
        if info.role != "linear" or not in_scope(site.module, recipe) or site.weight.op != "get_attr":
            continue
        w = get_tensor(gm, site.weight.target)
        if site.module in precomputed and info.fp16_channels == 0:
            codes, scale, zp = precomputed[site.module]
            how = "calibrated"
        else:
            try:
                codes, scale, zp = F.quantize(w, fmt, gran)
            except F.FormatError as e:
                raise F.FormatError(f"cannot quantize {site.module} (weight {tuple(w.shape)}): {e}") from None
            how = "rtn"
        node = site.node
        attrs = [get_attr_node(gm, new_attr(gm, f"{site.module}.{k}", t), node)
                 for k, t in (("codes", ops.pack_weight_codes(codes, fmt)), ("scale", scale), ("zp", zp))]
        with gm.graph.inserting_before(node):
            dq = gm.graph.call_function(torch.ops.qcompile.dequantize_weight.default,
                                        (*attrs, fmt.name, gran.name, w.shape[1], _DTYPE_NAMES[w.dtype]))
        dq.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        infer_val(gm, dq)
        node.replace_input_with(site.weight, dq)
        annotate(node, dataclasses.replace(info, weight_format=fmt.name, weight_granularity=gran.name))
        matches += 1
        n_calibrated += how == "calibrated"
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(matches, [f"{fmt.name} {gran.name}: {n_calibrated} calibrated, {matches - n_calibrated} rtn"])
