"""lower_attention: decode-step ``scaled_dot_product_attention`` calls of an FX graph -> the decode-attention kernel.

Pattern (dynamo's trace of an HF decoder stepping a KV cache: one query token, a boolean or additive mask
over the cache slots)::

    o = scaled_dot_product_attention(q [B, H, 1, D], k [B, Hkv, L, D], v, attn_mask=m, dropout_p=0.0,
                                     is_causal=False, scale=s, enable_gqa=...)
    -> o = qcompile_triton::decode_attention(q, k, v, m, s)

Only calls whose example values show one query token, no dropout, no causal flag (with one query it would
mean "key 0 only"), a head dim that is a power of two in [16, 256], floating q / k / v of one dtype with a
contiguous last dim, and H a multiple of Hkv (equal unless ``enable_gqa``) are rewritten; the others stay
for Inductor, and the report says why. Prefill graphs (more than one query token) are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .attention_ops import check_decode_attention  # (importing it registers qcompile_triton::decode_attention)

__all__ = ["SDPA_TARGETS", "AttentionSite", "lower_attention"]

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention,
                torch.ops.aten.scaled_dot_product_attention.default)
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
_KERNEL = torch.ops.qcompile_triton.decode_attention.default


@dataclass(frozen=True)
class AttentionSite:
    """One attention call: its node name and why it stayed as it was (``None``: lowered)."""

    name: str
    reason: str | None

    @property
    def lowered(self) -> bool:
        return self.reason is None


def _val(arg):
    return arg.meta.get("example_value", arg.meta.get("val")) if isinstance(arg, fx.Node) else arg


def _why_not(a: dict) -> str | None:
    """Why this call cannot take the kernel (None: it can): what the op itself rejects
    (``attention_ops.check_decode_attention`` on the example values), then what SDPA's other arguments ask for."""
    q, k, v, mask = (_val(a[n]) for n in ("query", "key", "value", "attn_mask"))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "no example values for q / k / v"
    try:
        check_decode_attention(q, k, v, mask)
    except (TypeError, ValueError) as err:
        return str(err)
    if isinstance(a["dropout_p"], fx.Node) or a["dropout_p"] != 0.0:
        return "dropout"
    if isinstance(a["is_causal"], fx.Node) or (a["is_causal"] and k.shape[2] != 1):
        return "is_causal with a cache (means key 0 only for one query)"
    if isinstance(a["scale"], fx.Node):
        return "scale is a tensor"
    if q.device.type not in ("cuda", "cpu"):
        return f"device {q.device}"
    if q.shape[1] != k.shape[1] and not a["enable_gqa"]:
        return f"{q.shape[1]} query heads on {k.shape[1]} KV heads without enable_gqa"
    return None


def lower_attention(gm: fx.GraphModule) -> list[AttentionSite]:
    """Rewrite the graph's decode-step SDPA calls into ``qcompile_triton::decode_attention`` (module
    docstring); returns every SDPA call with what happened to it, in graph order."""
    sites = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        a = dict(_DEFAULTS, **dict(zip(_PARAMS, node.args)), **node.kwargs)
        reason = _why_not(a)
        sites.append(AttentionSite(node.name, reason))
        if reason is not None:
            continue
        scale = None if a["scale"] is None else float(a["scale"])
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(_KERNEL, (a["query"], a["key"], a["value"], a["attn_mask"], scale))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if any(s.lowered for s in sites):
        gm.graph.lint()
        gm.recompile()
    return sites
