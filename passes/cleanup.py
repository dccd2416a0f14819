"""cleanup: dead code, unused attributes, lint, recompile. Changes no numerics."""
from __future__ import annotations

from torch import fx

from qcompile.passes.graph_utils import check_graph
from qcompile.passes.runner import PassResult

__all__ = ["cleanup"]


def cleanup(gm: fx.GraphModule, ctx=None) -> PassResult:
    removed = gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name in [n for n, _ in gm.named_buffers(recurse=False) if n.startswith("_q_") and n not in used]:
        delattr(gm, name)
        dropped += 1
    gm.delete_all_unused_submodules()
    check_graph(gm)
    gm.recompile()
    return PassResult(int(bool(removed)) + dropped, [f"dropped {dropped} unused attributes"] if dropped else [])
