"""Backends cross-checked against the reference graph, one quantized linear at a time.

* ``onnx`` / ``onnx-exact``: the model exported in the fast (``MatMulIntegerToFloat`` / ``MatMulNBits``) or
  exact (QDQ) form; every quantized linear's output (the ONNX value keeps the FX node's name) is added as a
  graph output and onnxruntime runs the same tokens **end to end**, so a divergence propagates and the
  first linear beyond tolerance is where it starts. The lowering of each site is read from the exported
  graph itself (which kernel produces that output).
* ``triton``: ``backends.triton.lower.lower_linears`` on a copy of the graph says which sites become
  ``qcompile_triton::`` kernels and why the others fall back; each lowered kernel then runs on the
  **reference's own input** of that linear (a local check: only a wrong kernel can diverge). Needs a
  CUDA device; ``device="cpu"`` runs the ops' CPU integer reference instead (tests).
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from qcompile.passes.graph_utils import annotation

__all__ = ["BACKENDS", "compare_backends", "onnx_linear_outputs", "triton_linear_outputs"]

BACKENDS = ("reference", "onnx", "onnx-exact", "triton")


def _quantized_linears(gm) -> dict[str, str]:
    """FX node name -> HF module of every quantized linear, graph order."""
    out = {}
    for n in gm.graph.nodes:
        info = annotation(n)
        if info is not None and info.role == "linear" and (info.weight_format or info.act_format):
            out[n.name] = info.module
    return out


# ------------------------------------------------------------------------------------------------ onnx
_ONNX_KERNELS = {"MatMulIntegerToFloat": "integer_gemm", "MatMulInteger": "integer_gemm",
                 "MatMulNBits": "matmul_nbits", "MatMul": "matmul", "Gemm": "matmul"}


def _onnx_gemm(value, depth: int = 8):
    """The first GEMM-like node above ``value`` (breadth first, a few hops): the node the site lowered to."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            node = v.producer() if v is not None else None
            if node is None:
                continue
            if node.op_type in _ONNX_KERNELS:
                return node
            nxt.extend(node.inputs)
        frontier = nxt
    return None


def _onnx_kernel(value) -> str:
    node = _onnx_gemm(value)
    return _ONNX_KERNELS[node.op_type] if node is not None else "unknown"


def _onnx_gemm_input(value):
    """The float activation a site's GEMM consumes, before its quantization (``QuantizeLinear``'s input for
    the integer forms, found through the ``Concat`` that appends the zero-point columns; the GEMM's own
    float input for MatMulNBits / float MatMul), or None."""
    gemm = _onnx_gemm(value)
    if gemm is None:
        return None
    v = gemm.inputs[0]
    for _ in range(4):
        p = v.producer() if v is not None else None
        if p is None or p.op_type not in ("QuantizeLinear", "DequantizeLinear", "Cast", "Reshape", "Concat"):
            return v if p is None or v is gemm.inputs[0] else None
        if p.op_type == "QuantizeLinear":
            return p.inputs[0]
        v = p.inputs[0]
    return None


def _onnx_reason(kind: str, info, form: str) -> str:
    act = f"{info.act_format} {info.act_granularity}" if info.act_format else "float"
    weight = f"{info.weight_format} {info.weight_granularity}"
    if kind == "integer_gemm":
        return (f"{act} activations x {weight} integer weights: MatMulIntegerToFloat / MatMulInteger "
                "(integer-exact)")
    if kind == "matmul_nbits":
        return f"{weight} as MatMulNBits" + (" (accuracy_level 4: MLAS re-quantizes activations per block)"
                                             if info.act_format == "int8" else " (fp32 on the reference activations)")
    if form == "exact":
        return "exact form: DequantizeLinear weights + float MatMul (by design)"
    if info.weight_format and info.weight_format.startswith("dint") and not (info.act_format or "").startswith("int8"):
        return f"{weight} with {act} activations: no integer form (dINT's +-s/2 values are off the INT4 grid)"
    return f"no fused form for {weight} weights with {act} activations: QDQ + float MatMul"


def onnx_linear_outputs(qm, input_ids, form: str = "fast", onnx_path=None, threads: int | None = None):
    """``({module: output [T, N]}, {module: input [T, K]}, {module: (kernel, reason)})`` from onnxruntime
    on ``input_ids``; a linear's input is the float activation its GEMM (or its activation quantizer) reads."""
    import numpy as np
    import onnx_ir as ir

    from qcompile.backends.onnx.export import export_onnx
    from qcompile.backends.onnx.parity import ort_session

    names = _quantized_linears(qm.graph_module)
    infos = {n.name: annotation(n) for n in qm.graph_module.graph.nodes if n.name in names}
    with tempfile.TemporaryDirectory(prefix="qcompile-report-") as tmp:
        path = Path(onnx_path) if onnx_path else export_onnx(qm, Path(tmp) / "model.onnx", form=form)
        model = ir.load(str(path))
        values = {o.name: o for node in model.graph for o in node.outputs}
        found = [n for n in names if n in values]
        lowering = {names[n]: (k := _onnx_kernel(values[n]), _onnx_reason(k, infos[n], form)) for n in found}
        probes = {names[n]: _onnx_gemm_input(values[n]) for n in found}
        probes = {m: v for m, v in probes.items() if v is not None and v not in model.graph.inputs}
        unique = list(dict.fromkeys(probes.values()))
        for i, v in enumerate(unique):
            v.name = v.name or f"qc_probe_input_{i}"
        model.graph.outputs.extend(values[n] for n in found)
        model.graph.outputs.extend(v for v in unique if v not in model.graph.outputs)
        out_values = list(model.graph.outputs)
        probe = Path(tmp) / "probe.onnx"
        ir.save(model, probe)
        session = ort_session(probe, threads or torch.get_num_threads())
        outs = session.run(None, {"input_ids": input_ids.numpy().astype(np.int64)})
    def flat(y):
        return torch.from_numpy(y).reshape(-1, y.shape[-1]).float()

    by_value = dict(zip(out_values, outs))
    ys = {names[n]: flat(by_value[values[n]]) for n in found}
    xs = {m: flat(by_value[v]) for m, v in probes.items() if v in by_value}
    return ys, xs, lowering


# ---------------------------------------------------------------------------------------------- triton
def triton_linear_outputs(qm, reference_records: dict, device=None):
    """``({module: kernel output}, {module: (kernel or "fallback", reason)}, status)``.

    The lowering decisions come from ``lower_linears`` on a copy of the graph; every lowered kernel runs
    on the reference input of its linear on ``device`` (default CUDA; without it only decisions).
    """
    from torch import fx

    from qcompile.backends.triton.lower import lower_linears
    from qcompile.debug import _evaluate

    # a new module over a copy of the graph: the lowering registers its packed buffers there, and the
    # tensors it shares with qm are never modified
    gm = fx.GraphModule(qm.graph_module, copy.deepcopy(qm.graph_module.graph))
    report = lower_linears(gm)
    lowering = _match_modules(gm, {s.name: (s.kernel or "fallback", s.reason) for s in report.sites})
    device = device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        return {}, lowering, "not available on this machine (no CUDA device)"
    ys = {}
    for node in gm.graph.nodes:
        info = annotation(node)
        if info is None or node.op != "call_function" or "qcompile_triton" not in str(node.target):
            continue
        rec = reference_records.get(info.module)
        if rec is None:
            continue
        args = [rec.x] + [_evaluate(gm, a) for a in node.args[1:]]  # this linear's reference input
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.no_grad():
            ys[info.module] = node.target(*args).float().cpu()
    status = "ok" if str(device).startswith("cuda") else f"ok (ops on {device}: the CPU integer reference, not kernels)"
    return ys, lowering, status


def _match_modules(gm, lowering: dict) -> dict:
    """Re-key ``lower_linears``' site names (``model_layers_0_mlp_up_proj``) to HF module names."""
    modules = [i.module for i in (annotation(n) for n in gm.graph.nodes)
               if i is not None and i.role == "linear" and (i.weight_format or i.act_format)]
    flat = {m.replace(".", "_"): m for m in modules}
    out = {}
    for name, value in lowering.items():
        key = name if name in modules else flat.get(name.replace(".", "_"), name)
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------- compare
def _rows_for(backend, ref: dict, ys: dict, xs: dict | None, lowering: dict, tol: float):
    """One row per linear. ``xs`` (the backend's own inputs of each linear, end-to-end runs) lets the check
    subtract the error a linear received: it diverges when ``rel_err - in_rel_err > tol``, so error that
    merely propagates (int8 codes flipped by float rounding upstream) is not blamed on it."""
    from qcompile.debug import rel_error, sqnr_db

    rows, first = [], None
    for module, rec in ref.items():
        kernel, reason = lowering.get(module, ("-", ""))
        y = ys.get(module)
        row = {"backend": backend, "module": module, "lowering": kernel, "reason": reason, "rel_err": None,
               "in_rel_err": None, "excess_err": None, "max_abs_err": None, "sqnr_db": None, "diverged": False,
               "first": False}
        if y is not None and y.shape == rec.y.shape:
            row.update(rel_err=rel_error(rec.y, y), max_abs_err=(rec.y - y).abs().max().item(),
                       sqnr_db=sqnr_db(rec.y, y))
            x = (xs or {}).get(module)
            same_input = x is not None and x.shape == rec.x.shape
            row["in_rel_err"] = rel_error(rec.x, x) if same_input else (0.0 if xs is None else None)
            row["excess_err"] = row["rel_err"] - (row["in_rel_err"] or 0.0)
            row["diverged"] = row["excess_err"] > tol
            if row["diverged"] and first is None:
                first, row["first"] = module, True
        rows.append(row)
    return rows, first


def compare_backends(qm, input_ids, backends=("onnx", "triton"), tol: float = 2e-2, *, onnx_path=None,
                     device=None, reference_records=None, threads=None):
    """See ``qcompile.debug.compare``."""
    from qcompile.debug import Table, record_linears
    from qcompile.errors import QcompileError

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise QcompileError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    input_ids = input_ids[:1]
    ref = reference_records or record_linears(qm.graph_module, input_ids)
    quantized = set(_quantized_linears(qm.graph_module).values())
    ref = {m: r for m, r in ref.items() if m in quantized}
    rows, first, status = [], {}, {}
    for backend in backends:
        if backend == "reference":
            continue
        if backend.startswith("onnx"):
            form = "exact" if backend == "onnx-exact" else "fast"
            ys, xs, lowering = onnx_linear_outputs(qm, input_ids, form, onnx_path, threads)
            status[backend] = "ok"
        else:  # local: every kernel ran on the reference's own input
            (ys, lowering, status[backend]), xs = triton_linear_outputs(qm, ref, device), None
        b_rows, first[backend] = _rows_for(backend, ref, ys, xs, lowering, tol)
        rows += b_rows
    return Table(rows, {"first_divergence": first, "status": status, "tol": tol,
                        "tokens": int(input_ids.shape[1])})
