"""Replace the ``qcompile`` marker nodes of a traced model by onnxruntime-ready ONNX, in two forms.

**exact**: every marker becomes its reference maths in standard ops: weights as
``DequantizeLinear`` on integer initializers (``weights.dequantize_linear_form``), activations as
in-graph quantize-dequantize (``activations.emit_qdq``); the linear stays ``MatMul`` in float32.
onnxruntime never turns the activation Q/DQ into an integer GEMM. Measured with onnxruntime 1.32: at
its default optimization level it does fuse ``DequantizeLinear(weight) + MatMul`` into ``MatMulNBits``
and gives that ``accuracy_level=4`` (int8 activations inside the kernel: not the reference; see
``parity.ort_session``), which is faster at decode and slower than FP32 at sequence 512.

**fast**: each linear ``MatMul(QdqActivation(x), Transpose(DequantizeWeight(...)))`` takes the first
of these forms that expresses its weights exactly; the rest falls back to the exact form:
  * ``integer_gemm`` - int8 per-token activations x per-channel weights with small integer values
    (INT4 ``q - z``, dINT4 ``2(q - z)``/``+-1``, FP4, INT8): the same uint8 codes as the reference
    (``activations.emit_quantize_per_token``), then ``com.microsoft::MatMulIntegerToFloat`` (MLAS u8s8
    GEMM, weight scale fused) on ``[x_q | z_x ...]`` against ``[b ; zero_point_rows]``:
        y = s_x * w_scale * (x_q @ b - z_x * colsum(b))
    with the zero-point term computed by the GEMM itself (INT8 weights, which carry a zero point,
    keep ``MatMulInteger`` and a float epilogue) - integer-exact; only the float rounding of the
    scaling differs from the reference. Linears reading the same activation (q/k/v, gate/up) share
    one quantization of it;
  * ``matmul_nbits`` - INT4 weights (per-channel or power-of-two group) as ``com.microsoft::MatMulNBits``:
    with int8 per-token activations (group-wise weights: W4A8 g128) the activation QDQ is dropped
    and ``accuracy_level=4`` makes MLAS quantize activations itself (symmetric int8 per block of K -
    *not* the reference's rounding); with float or other activations (W4A16, W4A4) it runs fp32 on
    the reference activations (exact up to float rounding).
dINT4 has no MatMulNBits form (its +-s/2 values are off the INT4 grid): with int8 activations it takes
``integer_gemm`` exactly; otherwise (W4A16-dINT4, group-wise dINT4) it stays in the exact form.
Re-rounding dINT4 to INT4 is never done: it would silently change the model.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.backends.onnx import weights as W
from qcompile.backends.onnx.activations import check_activation_format, emit_qdq, emit_quantize_per_token
from qcompile.backends.onnx.builder import GraphEdit
from qcompile.backends.onnx.markers import DEQUANTIZE_WEIGHT, MARKER_DOMAIN, QDQ_ACTIVATION
from qcompile.errors import ExportError

__all__ = ["check_graph_module", "lower_markers"]

MS_DOMAIN = "com.microsoft"


def _is_marker(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.domain == MARKER_DOMAIN and node.op_type == op_type


def _attr(node: ir.Node, name: str):
    return node.attributes[name].value


def _hint(node: ir.Node) -> str:
    name = node.inputs[0].name or "weight"
    return name.removesuffix("_codes")


def check_graph_module(gm) -> None:
    """Raise ``ExportError`` for anything the lowering cannot express, before the (slow) trace.

    Reads the ``qcompile::`` nodes of the FX graph: weights must dequantize to float32 and parse as
    formats; activations must be float32 and INT at a granularity ``activations.emit_qdq`` knows.
    """
    import torch

    from qcompile.formats import FormatError, FormatSpec

    for node in gm.graph.nodes:
        if node.target is torch.ops.qcompile.dequantize_weight.default:
            fmt, dtype = node.args[3], node.args[6]
            if dtype != "float32":
                raise ExportError(f"{node.name}: weights dequantize to {dtype}; the ONNX export supports float32 "
                                  "models - quantize the model in float32")
            try:
                FormatSpec.parse(fmt)
            except FormatError as e:
                raise ExportError(f"{node.name}: {e}") from None
        elif node.target is torch.ops.qcompile.qdq_activation.default:
            check_activation_format(node.args[1], node.args[2])
            val = getattr(node.args[0], "meta", {}).get("val")
            if val is not None and val.dtype != torch.float32:
                raise ExportError(f"{node.name}: activations are {val.dtype}; the ONNX export supports float32 models")


def _marker_arrays(node: ir.Node):
    if any(v is None or v.const_value is None for v in node.inputs):
        raise ExportError(f"{_hint(node)}: weight codes are not constants of the traced graph")
    codes, scale, zp = (v.const_value.numpy() for v in node.inputs)
    return codes, scale, zp, _attr(node, "fmt"), _attr(node, "granularity"), _attr(node, "in_features")


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Route every use of ``old`` to ``new``, which takes over its name (FX node names stay findable)."""
    new.shape, new.type = old.shape, old.type
    ir.convenience.replace_all_uses_with(old, new)
    graph.outputs[:] = [new if o is old else o for o in graph.outputs]
    name, old.name = old.name, None
    new.name = name


# --- exact form ---------------------------------------------------------------------------------
def _lower_weight_exact(ed: GraphEdit, node: ir.Node) -> ir.Value:
    form = W.dequantize_linear_form(W.weight_codes(*_marker_arrays(node)))
    hint = _hint(node)
    zp = ed.const(form.zero_point, f"{hint}_zero_point") if form.zero_point is not None else None
    return ed.op("DequantizeLinear", ed.const(form.values, f"{hint}_q"), ed.const(form.scale, f"{hint}_scale"),
                 zp, **form.attributes)


def _lower_activation_exact(ed: GraphEdit, node: ir.Node) -> ir.Value:
    x = node.inputs[0]
    k = x.shape[-1] if x.shape is not None else None
    if not isinstance(k, int):
        raise ExportError(f"activation {x.name} has no static last dimension; cannot quantize it in-graph")
    return emit_qdq(ed, x, k, _attr(node, "fmt"), _attr(node, "granularity"))


def _lower_remaining(graph: ir.Graph, ed: GraphEdit, counts: Counter) -> None:
    for node in list(graph):
        if _is_marker(node, DEQUANTIZE_WEIGHT):
            y, key = _lower_weight_exact(ed, node), "dequantize_linear"
        elif _is_marker(node, QDQ_ACTIVATION):
            y, key = _lower_activation_exact(ed, node), "activation_qdq"
        else:
            continue
        ed.commit(node)
        _replace(graph, node.outputs[0], y)
        graph.remove(node, safe=True)
        counts[key] += 1


# --- fast form ----------------------------------------------------------------------------------
@dataclass
class LinearMatch:
    """A linear of the traced graph: ``MatMul(a, Transpose(W))`` or ``Gemm(a, W, bias?, transB=1)``,
    where ``W`` is a DequantizeWeight marker and ``a`` is ``QdqActivation(x)``, a Reshape of it to
    ``[-1, K]`` (OPT's fc1/fc2), or a float tensor."""

    node: ir.Node
    weight: ir.Node
    dead: list                   # nodes that go away with the linear (Transpose, weight marker)
    act: ir.Node | None          # the QdqActivation marker feeding the linear, if any
    reshape: ir.Node | None      # the Reshape between that marker and the linear, if any
    bias: ir.Value | None
    codes: W.WeightCodes

    @property
    def act_int8_token(self) -> bool:
        return (self.act is not None and _attr(self.act, "granularity") == "token"
                and _attr(self.act, "fmt") in ("int8", "int8_sym"))

    def raw_input(self, ed: GraphEdit) -> ir.Value:
        """The activation *before* its QDQ, in the shape the linear consumes."""
        x = self.act.inputs[0]
        return ed.op("Reshape", x, self.reshape.inputs[1]) if self.reshape is not None else x


def _gemm_ok(node: ir.Node) -> bool:
    a = {k: v.value for k, v in node.attributes.items()}
    return a.get("transA", 0) == 0 and a.get("transB", 0) == 1 and a.get("alpha", 1.0) == 1.0 \
        and a.get("beta", 1.0) == 1.0


def _match_linear(node: ir.Node) -> LinearMatch | None:
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
        return None
    dead, bias = [], None
    w = node.inputs[1].producer()
    if node.op_type == "MatMul":
        if w is None or w.op_type != "Transpose" or list(_attr(w, "perm")) != [1, 0] \
                or len(w.outputs[0].uses()) != 1:
            return None
        dead.append(w)
        w = w.inputs[0].producer()
    else:
        if not _gemm_ok(node):
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
    if not _is_marker(w, DEQUANTIZE_WEIGHT) or len(w.outputs[0].uses()) != 1:
        return None
    act, reshape = node.inputs[0].producer(), None
    if act is not None and act.op_type == "Reshape" and node.op_type == "Gemm":
        reshape, act = act, act.inputs[0].producer()
    if not _is_marker(act, QDQ_ACTIVATION):
        act, reshape = None, None
    return LinearMatch(node, w, [*dead, w], act, reshape, bias, W.weight_codes(*_marker_arrays(w)))


def _linear_groups(graph: ir.Graph) -> list[list[LinearMatch]]:
    """Matched linears grouped by the activation they read (q/k/v, gate/up), in graph order."""
    groups: dict[tuple, list[LinearMatch]] = {}
    for node in list(graph):
        m = _match_linear(node)
        if m is not None:
            key = (id(m.act), id(m.reshape)) if m.act is not None else (id(m.node),)
            groups.setdefault(key, []).append(m)
    return list(groups.values())


_AUG_MAX = 64  # |value| of a zero-point row: like the weights, never saturates MLAS's u8s8 pairs (vpmaddubsw)


def zero_point_rows(colsum: np.ndarray, rows: int) -> np.ndarray:
    """``[rows, N]`` int8 with column sums ``-colsum`` and every entry within +-64.

    Appending ``rows`` columns equal to the token's zero-point ``z_x`` to the uint8 activations and these
    rows to the weights makes the integer GEMM itself subtract ``z_x * colsum``: exact in int32.
    """
    need = -colsum.astype(np.int64)
    out = np.zeros((rows, need.shape[0]), dtype=np.int64)
    left = need.copy()
    for j in range(rows):
        out[j] = np.clip(left, -_AUG_MAX, _AUG_MAX)
        left -= out[j]
    if np.any(left):
        raise ExportError(f"zero-point rows: {rows} rows cannot hold column sums up to {np.abs(need).max()}")
    return out.astype(np.int8)


def _integer_gemm(ed: GraphEdit, group: list[LinearMatch]) -> list[ir.Value] | None:
    """One per-token quantization of the group's input, then one integer GEMM per linear.

    ``com.microsoft::MatMulIntegerToFloat`` (MLAS u8s8 GEMM with the per-column weight scale fused into
    its output) on ``[x_q | z_x ... z_x]``: the appended zero-point columns times ``zero_point_rows``
    subtract ``z_x * colsum`` inside the GEMM, so one broadcast ``* s_x`` is the whole epilogue (it was
    five passes over the output: Mul, Sub, Cast, Mul, Mul). Weights stored with a zero-point (INT8)
    keep the plain ``MatMulInteger`` form.
    (Concatenating q/k/v into one GEMM and splitting after was measured too: 9 % faster at decode,
    2 % slower at sequence 512 - the Split copies - so it is not done.)
    """
    m0 = group[0]
    mats = [W.integer_matrix(m.codes) for m in group] if m0.act_int8_token else [None]
    if any(mat is None for mat in mats):
        return None
    xq, sx, zx = emit_quantize_per_token(ed, m0.raw_input(ed), m0.codes.shape[1], _attr(m0.act, "fmt"))
    fused = all(mat.b_zero_point is None for mat in mats)
    if fused:
        rows = max(-(-int(np.abs(mat.colsum).max(initial=0)) // _AUG_MAX) for mat in mats)
        x_aug = xq
        if rows:
            z8 = ed.op("Cast", zx, to=ir.DataType.UINT8)
            shape = ed.op("Concat", ed.op("Shape", z8, end=-1), ed.small([rows], np.int64), axis=0)
            x_aug = ed.op("Concat", xq, ed.op("Expand", z8, shape), axis=-1)
        one = ed.small([1.0])
    outputs = []
    for m, mat in zip(group, mats):
        hint = _hint(m.weight)
        if fused:
            b = mat.b if not rows else np.concatenate([mat.b, zero_point_rows(mat.colsum, rows)], axis=0)
            y = ed.op("MatMulIntegerToFloat", x_aug, ed.const(np.ascontiguousarray(b), f"{hint}_int"), one,
                      ed.const(mat.w_scale, f"{hint}_int_scale"), domain=MS_DOMAIN)    # acc * w_scale
            outputs.append(ed.op("Mul", y, sx))
            continue
        bzp = ed.const(mat.b_zero_point, f"{hint}_int_zero_point")
        acc = ed.op("MatMulInteger", xq, ed.const(mat.b, f"{hint}_int"), None, bzp)          # [.., N] int32
        acc = ed.op("Sub", acc, ed.op("Mul", zx, ed.const(mat.colsum, f"{hint}_colsum")))  # - z_x * colsum
        scale = ed.op("Mul", sx, ed.const(mat.w_scale, f"{hint}_int_scale"))               # s_x * w_scale
        outputs.append(ed.op("Mul", ed.op("Cast", acc, to=ir.DataType.FLOAT), scale))
    return outputs


def _matmul_nbits(ed: GraphEdit, m: LinearMatch) -> ir.Value | None:
    blocks = W.nbits_blocks(m.codes)
    if blocks is None:
        return None
    n, k = m.codes.shape
    x, level = m.node.inputs[0], 0
    if m.act_int8_token:
        x, level = m.raw_input(ed), 4   # MLAS quantizes activations to int8 itself
    hint = _hint(m.weight)
    return ed.op("MatMulNBits", x, ed.const(blocks.b, f"{hint}_nbits"), ed.const(blocks.scales, f"{hint}_nbits_scale"),
                 ed.const(blocks.zero_points, f"{hint}_nbits_zero_point"), domain=MS_DOMAIN, K=k, N=n, bits=4,
                 block_size=blocks.block_size, accuracy_level=level)


def _remove_if_dead(graph: ir.Graph, *nodes: ir.Node | None) -> None:
    for node in nodes:
        if node is not None and not any(o.uses() for o in node.outputs):
            graph.remove(node, safe=True)


def _finish(graph: ir.Graph, ed: GraphEdit, group: list[LinearMatch], outputs: list[ir.Value]) -> None:
    """Add biases, splice the new nodes in before the group's first linear, drop what became dead."""
    outputs = [ed.op("Add", y, m.bias) if m.bias is not None else y for m, y in zip(group, outputs)]
    ed.commit(group[0].node)
    for m, y in zip(group, outputs):
        _replace(graph, m.node.outputs[0], y)
        _remove_if_dead(graph, m.node, *m.dead, m.reshape)
    _remove_if_dead(graph, group[0].act)


def _lower_fast(graph: ir.Graph, ed: GraphEdit, counts: Counter) -> None:
    for group in _linear_groups(graph):
        outputs = _integer_gemm(ed, group)
        if outputs is not None:
            _finish(graph, ed, group, outputs)
            counts["integer_gemm"] += len(group)
            continue
        for m in group:
            y = _matmul_nbits(ed, m)
            if y is not None:
                _finish(graph, ed, [m], [y])
                counts["matmul_nbits"] += 1


def lower_markers(model: ir.Model, form: str) -> dict[str, int]:
    """Rewrite all markers of ``model`` in place; returns how many sites each lowering took."""
    from onnx_ir.passes import common

    graph = model.graph
    ed, counts = GraphEdit(graph), Counter()
    if form == "fast":
        _lower_fast(graph, ed, counts)
    _lower_remaining(graph, ed, counts)
    if counts["matmul_nbits"] or counts["integer_gemm"]:
        model.opset_imports[MS_DOMAIN] = 1
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedOpsetsPass()(model)
    common.ClearMetadataAndDocStringPass()(model)  # the tracer's per-node stack traces: size and local paths
    model.opset_imports.pop(MARKER_DOMAIN, None)
    graph.sort()
    return dict(counts)
