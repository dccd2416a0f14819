"""An exact clean-up of a traced causal-LM graph, applied to every export (FP32 and quantized alike).

torch.onnx spells ``scaled_dot_product_attention`` below opset 23 as MatMul -> Add(mask) -> Softmax and
then guards the softmax against rows that are masked entirely: ``Where(IsNaN(p), 0, p)``. Our exports
take ``input_ids`` alone, so the only mask is the causal one, which never masks a whole row (every
token sees itself): the guard never changes a value, and at sequence 512 it was 15 % of onnxruntime's
time (two full passes over every ``[heads, seq, seq]`` score tensor). ``drop_softmax_nan_guards``
removes it.
"""
from __future__ import annotations

import onnx_ir as ir

from qcompile.errors import ExportError

__all__ = ["drop_softmax_nan_guards", "simplify"]


def _is_zero_constant(value: ir.Value) -> bool:
    const = value.const_value
    if const is None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        const = attr.value if attr is not None else None
    if const is None:
        return False
    arr = const.numpy()
    return arr.size == 1 and float(arr.reshape(-1)[0]) == 0.0


def drop_softmax_nan_guards(model: ir.Model) -> int:
    """Replace ``Where(IsNaN(Softmax(x)), 0, Softmax(x))`` by the softmax; returns how many.

    Only for graphs whose one input is ``input_ids`` (no padding mask can mask a whole row).
    """
    names = [v.name for v in model.graph.inputs]
    if names != ["input_ids"]:
        raise ExportError(f"drop_softmax_nan_guards needs a causal LM graph with input_ids only, got inputs {names}")
    graph, dropped = model.graph, 0
    for node in list(graph):
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
            continue
        cond, zero, soft = node.inputs
        isnan = cond.producer() if cond is not None else None
        if (isnan is None or isnan.op_type != "IsNaN" or isnan.inputs[0] is not soft or soft.producer() is None
                or soft.producer().op_type != "Softmax" or not _is_zero_constant(zero)):
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        out.replace_all_uses_with(soft)
        graph.remove(node, safe=True)
        if not any(o.uses() for o in isnan.outputs):
            graph.remove(isnan, safe=True)
        dropped += 1
    return dropped


def simplify(model: ir.Model) -> dict[str, int]:
    """The exact clean-ups of this module, in place; returns what each changed."""
    return {"softmax_nan_guards": drop_softmax_nan_guards(model)}
