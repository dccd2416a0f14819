"""quantize_float_linears: round-to-nearest quantization of a dynamo graph's float linears (``lowbit``'s
``options={"recipe": ...}``), straight to the kernel op where one applies.

Each ``linear(x, W, b)`` whose ``W`` is the weight parameter of an in-scope linear becomes

    qcompile_triton::w4_linear_rtn(x, W, fmt, gran, act_fmt, b)          (a Triton kernel applies)
    linear(qdq_activation(x, act_fmt, act_gran), qdq_activation(W, fmt, gran), b)   (otherwise)

plus ``qdq_activation(y, v_fmt, "vchannel")`` after V projections. ``w4_linear_rtn`` quantizes ``W``
with ``formats.quantize`` (the codes of ``passes/quantize_weights.py`` with RTN) on first use and
caches the packed result per weight tensor (``codes_ops.py``). The fallback fake-quantizes ``W`` on
every call (``qdq_activation`` is ``formats.fake_quantize``, any granularity): correct, not fast.
The module name comes from dynamo's placeholder name (``L_self_modules_model_modules_layers_modules_0_
..._parameters_weight_`` -> ``model.layers.0...``), so ``recipe.skip`` (``lm_head`` by default) applies.
"""
from __future__ import annotations

import re

import torch
from torch import fx

from qcompile import ops as _qops  # noqa: F401  (registers qcompile::qdq_activation)

from .codes_ops import packed_for_weight
from .lower import SiteReport, _Constants, _is_linear, _linear_args, act_plan, module_path

__all__ = ["module_name", "quantize_float_linears"]

_RTN = torch.ops.qcompile_triton.w4_linear_rtn.default
_QDQ = torch.ops.qcompile.qdq_activation.default


def module_name(weight_node: fx.Node) -> str | None:
    """Module path of a dynamo parameter placeholder (``..._modules_q_proj_parameters_weight_``)."""
    m = re.fullmatch(r"(L_.*)_parameters_weight_", str(weight_node.target))
    return module_path(m.group(1)) if m else None


def _site(name, weight, fmt, gran, recipe) -> SiteReport:
    """What this linear gets: the kernel (if the activation side and the weight format allow) or why not."""
    kernel, act, reason = act_plan(recipe.act_format, recipe.act_granularity, gran)
    if fmt is None:
        kernel, reason = None, "recipe keeps weights in floating point"
    if kernel is not None:
        try:
            packed_for_weight(weight, fmt.name, gran.name)  # validates, and warms the cache
        except (ValueError, TypeError) as e:
            kernel, reason = None, str(e).split(". ")[0]
    weight_desc = f"{fmt.name} {gran.name}" if fmt is not None else "float"
    return SiteReport(name, kernel, "rtn" if kernel else reason, weight_desc, act, weight.shape[0], weight.shape[1])


def _replacement(gm, node, x, w, bias, site, recipe, fmt, gran) -> fx.Node:
    g = gm.graph
    with g.inserting_before(node):
        if site.lowered:
            return g.call_function(_RTN, (x, w, fmt.name, gran.name, recipe.act_format, bias))
        if recipe.act_format is not None:
            x = g.call_function(_QDQ, (x, recipe.act_format, recipe.act_granularity))
        if fmt is not None:
            w = g.call_function(_QDQ, (w, fmt.name, gran.name))
        return g.call_function(torch.ops.aten.linear.default, (x, w, bias))


def quantize_float_linears(gm: fx.GraphModule, example_inputs, recipe) -> list[SiteReport]:
    """Quantize every in-scope float linear of ``gm`` in place (RTN); returns a report per site."""
    from qcompile.passes.runner import in_scope
    from qcompile.recipes import resolve_recipe

    from .qmodules import ModuleFormError

    recipe = resolve_recipe(recipe)
    if recipe.scaling != "none" or recipe.rounding != "rtn" or recipe.fp16_ratio or recipe.fuse_layernorm:
        raise ModuleFormError(f"lowbit options['recipe'] quantizes round-to-nearest only; recipe {recipe.name!r} "
                              "needs calibration: quantize with qcompile.quantize and compile the result")
    fmt, gran = recipe.weight_spec, recipe.weight_gran
    consts, sites = _Constants(gm, example_inputs), []
    for node in list(gm.graph.nodes):
        if not _is_linear(node):
            continue
        x, w, bias = _linear_args(node)
        name = module_name(w) if isinstance(w, fx.Node) and w.op == "placeholder" else None
        weight = consts.get(w)
        if name is None or weight is None or weight.dim() != 2 or not in_scope(name, recipe):
            continue
        site = _site(name, weight, fmt, gran, recipe)
        new = _replacement(gm, node, x, w, bias, site, recipe, fmt, gran)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if recipe.v_format is not None and name.endswith(".v_proj"):
            with gm.graph.inserting_after(new):
                v = gm.graph.call_function(_QDQ, (new, recipe.v_format, "vchannel"))
            new.replace_all_uses_with(v, delete_user_cb=lambda u: u is not v)
            v.meta.update(new.meta)
        sites.append(site)
    gm.graph.lint()
    gm.recompile()
    return sites
