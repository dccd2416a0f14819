"""fuse_swiglu_quant: a SwiGLU MLP's ``silu(gate) * up`` is computed inside the down projection's quantization.

After ``lower_linears`` a LLaMA MLP's down projection quantizes ``silu(gate) * up``, which Inductor computes
in a kernel of its own: at decode one more launch per layer (~1.5 µs each on the H100, 47 µs per 7B step).
This pass moves that product into the activation quantization kernel (``quantize_rows(x, up=...)``)::

    h = mul(silu(gate), up)                              xq, xs, xz = swiglu_quantize_per_token(gate, up, act_fmt)
    y = w4_linear_codes(h, codes, ...)          ->      y = w4_linear_qcodes(xq, xs, xz, [codes], ...)[0]

Matched: a lowered per-channel site with int8 per-token activations whose input is ``silu(a) * b`` (either
order), the product and the silu read by nothing else. Numerics: the kernel rounds ``silu`` and the product
to the activation dtype as eager torch does (``quantize_kernel._load_values``), so the codes are those of
the eager reference; Inductor's fused ``silu * mul`` keeps the silu in fp32 instead, so codes may differ
from the unfused compiled graph's by one step where that rounding matters.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from . import ops as _ops  # noqa: F401  (registers swiglu_quantize_per_token)
from .qcodes_sites import call_before, int8_site, is_call, node_val, replace_with_qcodes

__all__ = ["fuse_swiglu_quant"]

_SWIGLU_QUANT = torch.ops.qcompile_triton.swiglu_quantize_per_token.default
_SILU = (torch.nn.functional.silu, torch.ops.aten.silu.default, torch.ops.aten.silu)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def _gate_up(x) -> tuple | None:
    """``(gate, up, the silu node)`` if ``x`` is ``silu(gate) * up`` (or ``up * silu(gate)``) read only by its
    one user."""
    if not is_call(x, _MUL) or len(x.users) != 1:
        return None
    if len(x.args) != 2 or x.kwargs:
        return None
    for silu, up in (x.args, x.args[::-1]):
        if (is_call(silu, _SILU) and len(silu.users) == 1 and not silu.kwargs.get("inplace", False)
                and len(silu.args) == 1):
            gv, uv = node_val(silu.args[0]), node_val(up)
            if isinstance(gv, torch.Tensor) and isinstance(uv, torch.Tensor) and gv.shape == uv.shape \
                    and gv.dtype == uv.dtype:
                return silu.args[0], up, silu
    return None


def fuse_swiglu_quant(gm: fx.GraphModule) -> int:
    """Rewrite every matching down projection in place (module docstring); returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        site = int8_site(node)
        match = _gate_up(site.x) if site is not None and site.single else None
        if match is None:
            continue
        gate, up, silu = match
        xq, xs, xz = call_before(gm, node, _SWIGLU_QUANT, (gate, up, site.act_fmt), 3)
        replace_with_qcodes(gm, node, site, xq, xs, xz)
        gm.graph.erase_node(site.x)
        gm.graph.erase_node(silu)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
