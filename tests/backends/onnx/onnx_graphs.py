"""Test helper: build a small ONNX graph with ``GraphEdit`` and run it under onnxruntime (1 thread)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.backends.onnx.builder import GraphEdit


def run_graph(build, feeds: dict[str, np.ndarray], opset: int = 21, symbolic: bool = True) -> list[np.ndarray]:
    """``build(ed, *input_values) -> [outputs]``; inputs get symbolic dims (but the last) when ``symbolic``."""
    import onnxruntime as ort

    inputs = []
    for name, arr in feeds.items():
        dims = [f"{name}_d{i}" if symbolic and i < arr.ndim - 1 else d for i, d in enumerate(arr.shape)]
        inputs.append(ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype))))
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": opset, "com.microsoft": 1}, name="test")
    ed = GraphEdit(graph)
    outputs = build(ed, *inputs)
    ed.commit()
    graph.outputs.extend(outputs)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
