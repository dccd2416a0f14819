"""fuse_norm_quant: residual add + LLaMA RMSNorm + the projections' activation quantization in one kernel.

At decode, before the q/k/v and the gate/up projections, a LLaMA layer runs an Inductor kernel (the residual
add and the RMSNorm) and then ``quantize_rows`` on its output: two launches for a 4096-element row. This
pass matches dynamo's trace of HF's ``LlamaRMSNorm`` (the module form: ``qmodules.quantize_linears`` /
``to_module_form``; the graph form's aten-level norm is not matched) feeding lowered sites (after ``share_quant``)::

    h   = add(a, b)                                   # the residual add (optional: layer 0 has none)
    h32 = h.to(float32)
    v   = mul(weight, mul(h32, rsqrt(add(mean(pow(h32, 2), -1, keepdim=True), eps))).to(dtype))
    ys  = w4_linear_codes_shared(v, [codes_q, codes_k, codes_v], ...)
        ->
    h, xq, xs, xz = rmsnorm_quantize_per_token(a, b, weight, eps, act_fmt)     # one launch
    ys  = w4_linear_qcodes(xq, xs, xz, [codes_q, codes_k, codes_v], ...)

and the later users of ``h`` (the next residual add) read the kernel's ``h``. Only decode-sized graphs (at
most ``max_rows`` tokens, rows up to 16384) and int8 per-token activations with per-channel weights.
Numerics: ``rmsnorm_quant_kernel.py`` (the variance's summation order is the kernel's own).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from . import ops as _ops  # noqa: F401  (registers rmsnorm_quantize_per_token)
from .qcodes_sites import Int8Site, call_before, int8_site, is_call, node_val, replace_with_qcodes
from .rmsnorm_quant_kernel import MAX_ROW

__all__ = ["fuse_norm_quant"]

_NORM_QUANT = torch.ops.qcompile_triton.rmsnorm_quantize_per_token.default
_MUL = (operator.mul, torch.mul)
_ADD = (operator.add, torch.add)
_RSQRT = (torch.rsqrt, torch.ops.aten.rsqrt.default)


def _fn(node, targets) -> bool:
    return is_call(node, targets) and not node.kwargs


def _method(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _to_dtype(node):
    """The dtype of a ``.to(dtype)`` call (positional or keyword), else None."""
    if not _method(node, "to"):
        return None
    dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
    return dtype if isinstance(dtype, torch.dtype) and set(node.kwargs) <= {"dtype"} else None


def _other(pair, node):
    a, b = pair
    return b if a is node else a if b is node else None


def _match_norm(v: fx.Node):
    """``(h, weight, eps, chain)`` if ``v`` is the traced RMSNorm of ``h`` (``chain``: its nodes, last first),
    else None."""
    vv = node_val(v)
    if not _fn(v, _MUL) or len(v.args) != 2 or vv is None:
        return None
    for t, weight in (v.args, v.args[::-1]):
        wv = node_val(weight)
        if _to_dtype(t) != vv.dtype or len(t.users) != 1 or not isinstance(wv, torch.Tensor) \
                or tuple(wv.shape) != (vv.shape[-1],) or wv.dtype != vv.dtype:
            continue
        m1 = t.args[0]
        if not _fn(m1, _MUL) or len(m1.users) != 1 or len(m1.args) != 2:
            continue
        for h32, rsq in (m1.args, m1.args[::-1]):
            if not (_fn(rsq, _RSQRT) and len(rsq.users) == 1 and _fn(rsq.args[0], _ADD)
                    and len(rsq.args[0].users) == 1):
                continue
            add_eps = rsq.args[0]
            var, eps = add_eps.args if isinstance(add_eps.args[1], float) else add_eps.args[::-1]
            if not isinstance(eps, float) or not _method(var, "mean") or len(var.users) != 1:
                continue
            dims = var.args[1] if len(var.args) > 1 else var.kwargs.get("dim")
            if dims not in (-1, (-1,), [-1]) or not var.kwargs.get("keepdim", False):
                continue
            pw = var.args[0]
            if not _method(pw, "pow") or len(pw.users) != 1 or list(pw.args) != [h32, 2]:
                continue
            if _to_dtype(h32) != torch.float32 or set(h32.users) != {pw, m1}:
                continue
            return h32.args[0], weight, eps, [v, t, m1, rsq, add_eps, var, pw, h32]
    return None


def _site(node: fx.Node, max_rows: int) -> Int8Site | None:
    """``int8_site(node)`` if it is decode-sized (at most ``max_rows`` rows of at most ``MAX_ROW``) and its
    input feeds nothing else."""
    site = int8_site(node)
    if site is None or site.k > MAX_ROW or set(site.x.users) != {node}:
        return None
    return site if node_val(site.x).numel() // max(site.k, 1) <= max_rows else None


def fuse_norm_quant(gm: fx.GraphModule, max_rows: int = 16) -> int:
    """Rewrite every matching norm + lowered site pair in place (module docstring); returns how many."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for node in list(gm.graph.nodes):
        site = _site(node, max_rows)
        match = _match_norm(site.x) if site is not None else None
        if match is None:
            continue
        h, weight, eps, chain = match
        later = [u for u in h.users if u is not chain[-1]]
        if any(order.get(u, -1) < order[node] for u in later):
            continue  # something reads h before the site: the kernel's h would come too late
        hv = node_val(h)
        residual = (_fn(h, _ADD) and len(h.args) == 2 and all(
            isinstance(a, fx.Node) and node_val(a) is not None and node_val(a).shape == hv.shape
            and node_val(a).dtype == hv.dtype for a in h.args))
        inputs = (h.args[0], h.args[1]) if residual else (h, None)
        h_new, xq, xs, xz = call_before(gm, node, _NORM_QUANT, (*inputs, weight, eps, site.act_fmt), 4)
        replace_with_qcodes(gm, node, site, xq, xs, xz)
        for n in chain:
            gm.graph.erase_node(n)
        if residual:
            h_new.meta.update(h.meta)
            h.replace_all_uses_with(h_new)
            gm.graph.erase_node(h)
        else:
            gm.graph.erase_node(h_new)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
