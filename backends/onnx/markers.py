"""Trace a quantized GraphModule to ONNX with the ``qcompile::`` ops kept as marker nodes.

``torch.onnx.export(..., dynamo=True)`` translates every aten op; the two ``qcompile::`` ops are
mapped (``custom_translation_table``) to marker nodes of the private domain ``qcompile``:

* ``qcompile.DequantizeWeight(codes, scale, zp)`` with attributes ``fmt``, ``granularity``,
  ``in_features``, ``dtype`` - its inputs stay initializers, so the lowering can read the integer codes;
* ``qcompile.QdqActivation(x)`` with attributes ``fmt``, ``granularity``.

Markers never reach a saved file: ``backends.onnx.lower`` replaces each by standard ONNX (or
``com.microsoft``) nodes. Keeping them opaque until then lets the lowering see the whole
``MatMul(QdqActivation(x), Transpose(DequantizeWeight(...)))`` pattern and choose a graph form.
"""
from __future__ import annotations

import torch

from qcompile import ops  # noqa: F401  (registers the qcompile:: ops)
from qcompile.errors import ExportError

__all__ = ["DEQUANTIZE_WEIGHT", "MARKER_DOMAIN", "QDQ_ACTIVATION", "trace_to_onnx"]

MARKER_DOMAIN = "qcompile"
DEQUANTIZE_WEIGHT = "DequantizeWeight"
QDQ_ACTIVATION = "QdqActivation"


def _register_marker_schemas() -> None:
    """Give the marker ops an ONNX schema once per process (onnxscript needs one to record a node)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(QDQ_ACTIVATION, MARKER_DOMAIN):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    s, i = OpSchema.AttrType.STRING, OpSchema.AttrType.INT
    specs = {
        QDQ_ACTIVATION: (["x"], [("fmt", s), ("granularity", s)]),
        DEQUANTIZE_WEIGHT: (["codes", "scale", "zp"], [("fmt", s), ("granularity", s), ("in_features", i),
                                                       ("dtype", s)]),
    }
    for name, (inputs, attrs) in specs.items():
        onnx.defs.register_schema(OpSchema(
            name, MARKER_DOMAIN, 1, doc=f"qcompile export marker {name} (replaced before saving)",
            inputs=[OpSchema.FormalParameter(n, "T" if n == "x" else "Q") for n in inputs],
            outputs=[OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", floats, "float values"), ("Q", ["tensor(uint8)", *floats], "codes, qparams")],
            attributes=[OpSchema.Attribute(a, t, a) for a, t in attrs]))


def _translation_table() -> dict:
    import onnxscript

    _register_marker_schemas()
    opset = onnxscript.values.Opset(MARKER_DOMAIN, 1)
    dq_op = onnxscript.values.Op(opset, DEQUANTIZE_WEIGHT)
    qdq_op = onnxscript.values.Op(opset, QDQ_ACTIVATION)

    def dequantize_weight(codes, scale, zero_point, fmt: str, granularity: str, in_features: int, dtype: str):
        return dq_op(codes, scale, zero_point, fmt=fmt, granularity=granularity, in_features=in_features,
                     dtype=dtype)

    def qdq_activation(x, fmt: str, granularity: str):
        return qdq_op(x, fmt=fmt, granularity=granularity)

    return {torch.ops.qcompile.dequantize_weight.default: dequantize_weight,
            torch.ops.qcompile.qdq_activation.default: qdq_activation}


def trace_to_onnx(module: torch.nn.Module, opset: int, example_ids: torch.Tensor | None = None):
    """``input_ids [batch, seq] -> logits`` as an ``onnx_ir.Model`` with dynamic batch and seq axes.

    Args:
        module: a GraphModule (or any module) taking ``input_ids`` and returning logits.
        opset: default-domain opset of the result.
        example_ids: tracing input; default ``[2, 16]`` zeros (values do not matter, shapes are dynamic).
    """
    import warnings

    if example_ids is None:
        example_ids = torch.zeros(2, 16, dtype=torch.long)
    # The bounds repeat the capture's guards (torch.export specialises sizes 0/1, so its graphs say
    # 2 <= size); ONNX keeps only the names, and onnxruntime runs batch 1 and seq 1 as well.
    max_seq = (getattr(module, "meta", {}).get("qcompile") or {}).get("max_seq_len", 2**16)
    dims = {0: torch.export.Dim("batch", max=65536), 1: torch.export.Dim("seq", max=max_seq)}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example_ids,), dynamo=True, opset_version=opset,
                                        custom_translation_table=_translation_table(), dynamic_shapes=(dims,),
                                        input_names=["input_ids"], output_names=["logits"], verbose=False,
                                        optimize=True)
    except Exception as e:  # torch.onnx raises many types; keep the cause chained for debugging
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"torch.onnx.export could not trace the quantized graph at opset {opset}: "
                          f"{type(e).__name__}: {first}") from e
    from qcompile.backends.onnx.simplify import simplify

    simplify(program.model)  # exact: drops softmax NaN guards a causal mask never needs
    return program.model
