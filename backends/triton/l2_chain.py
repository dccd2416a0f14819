"""chain_l2_prefetch: each lowered linear learns which weights the next one reads, to prefetch them into L2.

At decode a LLaMA layer is four weight streams (q/k/v, o, gate/up, down GEMVs) with latency-bound work
between them: norms, rotary, the KV-cache writes, attention, activation quantization. During that work
HBM idles. This pass gives every lowered site the codes of the lowered site after it in graph order::

    ys = w4_linear_codes_shared(x, [codes_q, codes_k, codes_v], ..., bias)
    ...                                                          (rotary, attention...)
    o  = w4_linear_codes(a, codes_o, ..., bias)
        ->
    ys = w4_linear_codes_shared(x, [codes_q, codes_k, codes_v], ..., bias, next0=codes_o)

and the GEMV, once its own weights are read, asks the copy engine to bring (the start of) those into L2
(``_common.l2_prefetch``: one ``cp.async.bulk.prefetch.L2`` per program; ``DISPATCH.l2_prefetch`` and
``l2_prefetch_mb`` say when and how much). The next GEMV then finds part of its stream in L2. Only a
hint: outputs are bitwise the same with or without it, and a wrong guess (Inductor running the sites in
another order) costs bandwidth, not correctness. The ops look the packed form up in the packing cache
and never pack for a hint (``codes_ops._next_weights``).
"""
from __future__ import annotations

import torch
from torch import fx

from . import codes_ops as _codes_ops  # noqa: F401  (registers the ops)

__all__ = ["chain_l2_prefetch"]

_KERNEL = torch.ops.qcompile_triton.w4_linear_codes.default
_SHARED = torch.ops.qcompile_triton.w4_linear_codes_shared.default
_N_ARGS = 9  # the ops' arguments before next0, next1, next2 (the next site's codes; up to 3 weights)


def _is_site(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (_KERNEL, _SHARED)


def chain_l2_prefetch(gm: fx.GraphModule) -> int:
    """Set ``next0..2`` of every lowered site that has a lowered site after it; returns how many."""
    sites = [n for n in gm.graph.nodes if _is_site(n)]
    for site, nxt in zip(sites, sites[1:]):
        codes = nxt.args[1]
        site.args = (*site.args[:_N_ARGS], *(list(codes) if isinstance(codes, (list, tuple)) else [codes])[:3])
    count = max(len(sites) - 1, 0)
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
