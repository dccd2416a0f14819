"""What the passes that quantize a lowered site's activation outside its kernel op share.

``inductor_quant.py`` (torch ops Inductor fuses), ``swiglu_quant.py`` (``silu(gate) * up`` in the
quantization kernel) and ``norm_quant.py`` (residual add + RMSNorm in it) each find a lowered W4A8 site
(``int8_site``), insert the op that computes its activation codes their own way (``call_before``), and hand
the codes to ``w4_linear_qcodes`` in the site's place (``replace_with_qcodes``).
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import fx

from . import codes_ops as _codes_ops  # noqa: F401  (registers the ops)

__all__ = ["Int8Site", "call_before", "int8_site", "is_call", "node_val", "replace_with_qcodes"]

_KERNEL = torch.ops.qcompile_triton.w4_linear_codes.default
_SHARED = torch.ops.qcompile_triton.w4_linear_codes_shared.default
_QCODES = torch.ops.qcompile_triton.w4_linear_qcodes.default
_INT8 = ("int8", "int8_sym")


def node_val(node):
    """The example value (``meta["val"]``, else ``meta["example_value"]``) of an FX node, else None."""
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None


def is_call(node, targets) -> bool:
    """Whether ``node`` is an FX ``call_function`` node of one of ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def call_before(gm: fx.GraphModule, node: fx.Node, target, args: tuple, outputs: int) -> list:
    """``target(*args)`` put before ``node``, as one ``getitem`` node per output (``outputs`` of them): how
    each pass inserts the op that computes a site's activation codes."""
    with gm.graph.inserting_before(node):
        call = gm.graph.call_function(target, args)
        return [gm.graph.call_function(operator.getitem, (call, i)) for i in range(outputs)]


class Int8Site(NamedTuple):
    """A lowered site's operands, weights as lists (one entry for ``w4_linear_codes``)."""

    x: fx.Node
    codes: list
    scale: list
    zp: list
    fmt: str
    k: int
    act_fmt: str
    biases: list
    single: bool  # w4_linear_codes (one weight), not w4_linear_codes_shared


def int8_site(node: fx.Node) -> Int8Site | None:
    """The site if ``node`` is a lowered linear (single or shared) with per-channel weights, int8 per-token
    activations and an example value for its input, else None."""
    if not is_call(node, (_KERNEL, _SHARED)):
        return None
    x, codes, scale, zp, fmt, gran, k, act_fmt, bias = node.args[:9]
    if str(gran) != "channel" or str(act_fmt) not in _INT8 or node_val(x) is None:
        return None
    single = node.target is _KERNEL
    if single:
        codes, scale, zp, bias = [codes], [scale], [zp], [bias]
    return Int8Site(x, list(codes), list(scale), list(zp), str(fmt), int(k), str(act_fmt), list(bias), single)


def replace_with_qcodes(gm: fx.GraphModule, node: fx.Node, site: Int8Site, xq, xs, xz) -> fx.Node:
    """Put ``w4_linear_qcodes(xq, xs, xz, <site's weights>)`` before ``node`` (with a ``getitem`` for a single
    site), give it ``node``'s meta and users, erase ``node``; returns what now stands for its output."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(_QCODES, (xq, xs, xz, site.codes, site.scale, site.zp, site.fmt, site.k,
                                               site.act_fmt, site.biases, node_val(site.x).dtype))
        out = gm.graph.call_function(operator.getitem, (new, 0)) if site.single else new
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return out
