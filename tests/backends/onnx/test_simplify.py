"""The exact graph clean-up of every export: softmax NaN guards dropped, outputs unchanged."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import tiny_model

from qcompile.backends.onnx.markers import trace_to_onnx
from qcompile.backends.onnx.parity import ort_session
from qcompile.backends.onnx.simplify import drop_softmax_nan_guards
from qcompile.capture import capture
from qcompile.errors import ExportError


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_export_has_no_nan_guards_and_the_same_logits(family, tmp_path):
    model = tiny_model(family).eval()
    onnx_model = trace_to_onnx(capture(model), 21)
    ops = _ops(onnx_model)
    assert "IsNaN" not in ops and ops.count("Softmax") == model.config.num_hidden_layers
    path = tmp_path / "fp32.onnx"
    ir.save(onnx_model, path)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    got = ort_session(path).run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want = model(ids).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _guarded_graph(input_name: str = "input_ids") -> ir.Model:
    x = ir.Value(name=input_name, shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    soft = ir.node("Softmax", [x], attributes={"axis": -1})
    isnan = ir.node("IsNaN", [soft.outputs[0]])
    zero = ir.Value(name="zero", const_value=ir.tensor(np.zeros((), np.float32)))
    where = ir.node("Where", [isnan.outputs[0], zero, soft.outputs[0]])
    add = ir.node("Add", [where.outputs[0], x])
    graph = ir.Graph([x], add.outputs, nodes=[soft, isnan, where, add], initializers=[zero], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_guard_is_bypassed_and_removed():
    model = _guarded_graph()
    assert drop_softmax_nan_guards(model) == 1
    assert _ops(model) == ["Softmax", "Add"]
    add = list(model.graph)[-1]
    assert add.inputs[0].producer().op_type == "Softmax"


def test_only_for_input_ids_graphs():
    with pytest.raises(ExportError, match="input_ids only"):
        drop_softmax_nan_guards(_guarded_graph("x"))
