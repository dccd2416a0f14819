"""Small helpers shared by the passes: finding linear sites, reading/writing attributes, metadata.

Invariants every pass keeps (checked by ``check_graph``):
  * quantization annotations live only under ``node.meta[QMETA]`` as frozen ``SiteInfo`` objects;
  * every call_function node has a valid ``node.meta["val"]`` (fake tensor), recomputed by ``infer_val``;
  * passes never modify a tensor in place: new weights are registered as new attributes, so the
    user's original model (whose parameters the captured graph shares) is never changed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

__all__ = [
    "PREFIX",
    "QMETA",
    "LinearSite",
    "SiteInfo",
    "annotate",
    "annotation",
    "check_graph",
    "get_attr_node",
    "get_tensor",
    "infer_val",
    "linear_sites",
    "module_of",
    "new_attr",
    "node_module_path",
]

QMETA = "qcompile"
PREFIX = "hf."  # capture wraps the HF model as attribute ``hf``


@dataclass(frozen=True)
class SiteInfo:
    """What the passes decided for one linear (``node.meta[QMETA]``)."""

    module: str                 # HF module name, e.g. "model.layers.3.self_attn.q_proj"
    weight_format: str | None = None
    weight_granularity: str | None = None
    act_format: str | None = None
    act_granularity: str | None = None
    fp16_channels: int = 0      # input channels kept in floating point (keep_salient_fp16)
    role: str = "linear"        # "linear" | "salient" (the FP part of a split linear) | "v" (V qdq)


@dataclass
class LinearSite:
    node: fx.Node        # the aten.linear node
    module: str          # HF module name
    weight: fx.Node      # the node producing the weight (get_attr, or a dequantize op)


def node_module_path(node: fx.Node) -> str:
    """HF module path of the innermost module that produced ``node`` (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix(PREFIX)


def module_of(weight_target: str) -> str:
    """``"hf.model.layers.0.fc1.weight"`` -> ``"model.layers.0.fc1"``."""
    name = weight_target.removeprefix(PREFIX)
    return name.rsplit(".", 1)[0]


def annotation(node: fx.Node) -> SiteInfo | None:
    return node.meta.get(QMETA)


def annotate(node: fx.Node, info: SiteInfo) -> None:
    node.meta[QMETA] = info


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every ``aten.linear`` whose weight is a module parameter (or its dequantized codes), in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        w = node.args[1]
        info = annotation(node)
        if info is not None:
            sites.append(LinearSite(node, info.module, w))
        elif isinstance(w, fx.Node) and w.op == "get_attr":
            sites.append(LinearSite(node, module_of(w.target), w))
    return sites


def get_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def new_attr(gm: fx.GraphModule, hint: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` as a fresh buffer of ``gm`` and return its (unique) attribute name."""
    base = f"_q_{hint.replace('.', '_')}"
    name, i = base, 0
    while hasattr(gm, name):  # deterministic names: the same passes give the same attributes (artifacts)
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor.detach().clone().contiguous())
    return name


def get_attr_node(gm: fx.GraphModule, name: str, before: fx.Node) -> fx.Node:
    """A get_attr node for ``name`` inserted before ``before``, with its ``meta["val"]``."""
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = _fake_mode(gm).from_tensor(get_tensor(gm, name), static_shapes=True)
    return node


def _fake_mode(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


def infer_val(gm: fx.GraphModule, node: fx.Node) -> None:
    """Recompute ``node.meta["val"]`` by running its target on the fake values of its inputs."""
    def val(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a

    from torch._dispatch.python import enable_python_dispatcher

    args = fx.node.map_aggregate(node.args, val)
    kwargs = fx.node.map_aggregate(node.kwargs, val)
    # the Python dispatcher runs composite ops' decompositions (aten.linear -> matmul) with symbolic
    # sizes; without it the C++ matmul of a CUDA fake tensor asks for a concrete numel() and fails
    with _fake_mode(gm), enable_python_dispatcher():
        node.meta["val"] = node.target(*args, **kwargs)


def check_graph(gm: fx.GraphModule) -> None:
    """Lint the graph and check every call_function node carries a fake ``val``."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            raise AssertionError(f"node {node.name} ({node.target}) has no meta['val']")
