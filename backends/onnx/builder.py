"""A small helper to emit ONNX nodes and initializers into an existing ``onnx_ir`` graph."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["GraphEdit"]


class GraphEdit:
    """Records nodes (``op``) and initializers (``const``); ``commit(before)`` splices the nodes in.

    Initializers are registered on the graph at once with unique names; identical small constants
    (scalars, axes) are shared.
    """

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self._nodes: list[ir.Node] = []
        self._small: dict[tuple, ir.Value] = {}

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", outputs: int = 1, **attrs):
        """Record one node; returns its output value (or the tuple of them when ``outputs > 1``)."""
        node = ir.Node(domain, op_type, inputs, attributes=ir.convenience.convert_attributes(attrs),
                       num_outputs=outputs)
        self._nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def const(self, array: np.ndarray, hint: str) -> ir.Value:
        """A new initializer holding ``array`` (its numpy dtype gives the ONNX type; ml_dtypes for 4 bit)."""
        name, i = hint, 0
        while name in self.graph.initializers:
            i += 1
            name = f"{hint}_{i}"
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def small(self, value, dtype=np.float32) -> ir.Value:
        """A shared scalar or 1-D constant (``small(0.0)``, ``small([-1], np.int64)``)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._small:
            self._small[key] = self.const(array, f"qc_const_{len(self._small)}")
        return self._small[key]

    def commit(self, before: ir.Node | None = None) -> None:
        """Insert the recorded nodes, in order, just before ``before`` (at the end when None)."""
        if self._nodes and before is not None:
            self.graph.insert_before(before, self._nodes)
        elif self._nodes:
            self.graph.extend(self._nodes)
        self._nodes = []
