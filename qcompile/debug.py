"""Numerics debugging: per-linear error of a quantized graph against its full-precision twin, and backends
cross-checked per linear against the reference.

The twin is the same captured graph with only the FP-exact passes applied (``fuse_layernorm`` and
``fold_scales`` with the same calibration scales), so every linear sees inputs in the same space.
Both graphs run on the same tokens; for each quantized linear ``layer_errors`` reports
  * ``sqnr_local_db``: SQNR of ``qdq(x) @ dq(codes)ᵀ`` vs ``x @ Wᵀ`` on the FP twin's input ``x``
    (this layer's own error);
  * ``sqnr_e2e_db``: SQNR of the quantized graph's actual output at that layer vs the twin's
    (error accumulated through every layer before it);
  * the AQAS paper's eq. 4 split of the weight error ``Δ = Ŵ − W`` into underflow (weights quantized
    to zero, ``Δ_u``) and rounding (``Δ_r``): ``E[(Δ_u X)²]``, ``E[(Δ_r X)²]`` — for the recipe's own
    weights and, side by side, for INT4 and dINT4 round-to-nearest of the same FP weight;
  * weight scale statistics and the activation's per-token (or per-group) scale statistics.

``compare`` runs the same tokens through other backends (onnxruntime, Triton) and compares each
quantized linear's output with the reference graph's, flagging the first linear beyond tolerance.

    rows = qcompile.debug.layer_errors(model, qm, input_ids)
    print(rows.to_markdown())                        # or rows[0]["sqnr_e2e_db"], rows.column("module")
    diffs = qcompile.debug.compare(qm, input_ids, backends=("onnx",))
    diffs.meta["first_divergence"]                   # {"onnx": "model.layers.3.mlp.down_proj" or None}
"""
from __future__ import annotations

import math

import torch
from torch import fx

from qcompile.passes.graph_utils import annotation, get_tensor

__all__ = [
    "Table",
    "compare",
    "error_split",
    "format_rows",
    "fp_twin",
    "layer_errors",
    "record_linears",
    "rel_error",
    "sqnr_db",
]

_QDQ = "qcompile.qdq_activation"
_DQ = "qcompile.dequantize_weight"
SPLIT_FORMATS = ("int4", "dint4")  # the side-by-side comparison of AQAS Fig. 4(b)/(d)


class Table(list):
    """Rows (dicts with the same keys) that print as a markdown table; ``meta`` holds table-wide facts."""

    def __init__(self, rows=(), meta: dict | None = None):
        super().__init__(rows)
        self.meta = dict(meta or {})

    @property
    def columns(self) -> list[str]:
        return list(self[0]) if self else []

    def column(self, key: str) -> list:
        return [r.get(key) for r in self]

    def to_markdown(self, keys=None) -> str:
        return format_rows(self, keys or self.columns)

    def to_pandas(self):
        """A pandas DataFrame (pandas is optional: imported here only)."""
        import pandas as pd
        return pd.DataFrame(list(self))

    def __str__(self) -> str:
        return self.to_markdown() if self else "(empty table)"


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(‖ref‖² / ‖ref − approx‖²)`` in dB (inf when equal)."""
    noise = (ref.double() - approx.double()).pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def rel_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``‖approx − ref‖ / ‖ref‖`` (0 when equal)."""
    noise = (ref.double() - approx.double()).norm().item()
    return noise / max(ref.double().norm().item(), 1e-30)


def fp_twin(model, qm, captured=None):
    """The captured graph with only FP-exact passes (fusion, scale folding) of ``qm``'s recipe.

    Args:
        captured: a fresh ``capture(prepare_model(model, qm.recipe))`` to use (it is modified) instead
            of capturing again.
    """
    from qcompile.capture import capture
    from qcompile.passes.fold_scales import fold_scales
    from qcompile.passes.fuse_layernorm import fuse_layernorm
    from qcompile.passes.runner import run_passes
    from qcompile.pipeline import _context, prepare_model

    gm = capture(prepare_model(model, qm.recipe)) if captured is None else captured
    passes = ([("fuse_layernorm", fuse_layernorm)] if qm.recipe.fuse_layernorm else []) + [("fold_scales", fold_scales)]
    run_passes(gm, _context(qm.recipe, qm.config, qm.calibration), passes=passes)
    return gm


# ------------------------------------------------------------------------------------------ recording
def _is(node, name) -> bool:
    return node.op == "call_function" and str(node.target).startswith(name)


class LinearRecord:
    """One annotated linear of a run: its pre-QDQ input ``x`` ``[T, K]``, output ``y`` ``[T, N]``, weight node."""

    def __init__(self, gm, node, info):
        self.gm, self.node, self.info = gm, node, info
        self.x = self.y = None

    def weight(self) -> torch.Tensor:
        """The weight the linear multiplies with (dequantized when it is quantized), float32 ``[N, K]``."""
        w = self.node.args[1] if len(self.node.args) > 1 else None
        if not isinstance(w, fx.Node):
            raise ValueError(f"{self.info.module}: the weight is not a graph node")
        return _evaluate(self.gm, w).float()

    def weight_qparams(self):
        """``(scale, zero_point)`` tensors of a dequantized weight, else None."""
        w = self.node.args[1]
        if not _is(w, _DQ):
            return None
        return _evaluate(self.gm, w.args[1]), _evaluate(self.gm, w.args[2])


def _evaluate(gm, node):
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return get_tensor(gm, node.target)
    if node.op == "call_function":
        args = fx.node.map_arg(node.args, lambda a: _evaluate(gm, a))
        with torch.no_grad():
            return node.target(*args)
    raise ValueError(f"cannot evaluate node {node.name} ({node.op}) outside a run")


def _input_node(node):
    x = node.args[0]
    return x.args[0] if _is(x, _QDQ) else x


class _Recorder(fx.Interpreter):
    """Keeps, per annotated linear, its pre-QDQ input and output, sliced to the first ``keep_tokens``;
    ``on_input(modules, x)`` sees each distinct full-length input once (activation statistics)."""

    def __init__(self, gm, keep_tokens=None, on_input=None):
        super().__init__(gm)
        self.keep, self.on_input = keep_tokens, on_input
        self.records, self.inputs = {}, {}
        for node in gm.graph.nodes:
            info = annotation(node)
            if info is None or info.role != "linear" or node.op != "call_function" or len(node.args) < 2:
                continue
            self.records[info.module] = LinearRecord(gm, node, info)
            self.inputs.setdefault(_input_node(node), []).append(info.module)
        self.by_node = {r.node: r for r in self.records.values()}

    def _keep(self, t):
        t = t.detach()
        t = t.reshape(-1, t.shape[-1]) if t.dim() > 2 else t
        return (t[: self.keep] if self.keep else t).float().clone()

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.inputs:
            x3 = out.detach()
            for m in self.inputs[n]:
                self.records[m].x = self._keep(x3[:, : self.keep] if self.keep and x3.dim() == 3 else x3)
            if self.on_input is not None:
                self.on_input(self.inputs[n], x3)
        rec = self.by_node.get(n)
        if rec is not None:
            rec.y = self._keep(out[:, : self.keep] if self.keep and out.dim() == 3 else out)
        return out


def record_linears(gm, input_ids: torch.Tensor, keep_tokens: int | None = None, on_input=None) -> dict:
    """Run ``gm`` on ``input_ids`` (one row: ``[1, T]``); per annotated linear (HF module name, graph order)
    a ``LinearRecord`` with its pre-QDQ input and output flattened to ``[tokens, features]``."""
    rec = _Recorder(gm, keep_tokens, on_input)
    with torch.no_grad():
        rec.run(input_ids)
    return {m: r for m, r in rec.records.items() if r.y is not None}


# ---------------------------------------------------------------------------------------- error maths
def error_split(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor, signal: float | None = None) -> dict:
    """AQAS eq. 4: ``E[(Δ_u X)²]`` (weights quantized to zero) and ``E[(Δ_r X)²]`` (the rest), with the
    signal ``E[(W X)²]`` and the total ``E[(Δ X)²]``; expectations over output channels and tokens.
    Two GEMMs (``Δ_u X`` and ``Δ X``; ``Δ_r X`` is their difference); ``signal`` skips a third."""
    delta = w_hat - w
    under = (w_hat == 0) & (w != 0)
    e_u_x = x @ (delta * under).T  # Δ_u X
    e_x = x @ delta.T              # Δ X
    return {"underflow": e_u_x.pow(2).mean().item(), "rounding": (e_x - e_u_x).pow(2).mean().item(),
            "total": e_x.pow(2).mean().item(),
            "signal": (x @ w.T).pow(2).mean().item() if signal is None else signal,
            "zero_frac": under.float().mean().item()}


def _stats(prefix: str, t: torch.Tensor) -> dict:
    t = t.reshape(-1).float()
    return {f"{prefix}_min": t.min().item(), f"{prefix}_median": t.median().item(), f"{prefix}_max": t.max().item()}


def _format_rows(w: torch.Tensor, x: torch.Tensor, gran: str | None, signal: float, own=None) -> dict:
    """INT4 vs dINT4 round-to-nearest of the same FP weight: the eq. 4 split of each, side by side.
    ``own = (w_hat, split)`` of the recipe is reused where it is exactly that RTN weight."""
    from qcompile import formats as F

    gran = F.Granularity.parse(gran or "channel")
    row = {}
    for name in SPLIT_FORMATS:
        try:
            w_hat = F.fake_quantize(w, F.FormatSpec.parse(name), gran)
        except F.FormatError:
            w_hat = F.fake_quantize(w, F.FormatSpec.parse(name), F.Granularity("channel"))
        s = own[1] if own is not None and torch.equal(own[0], w_hat) else error_split(w, w_hat, x, signal)
        row.update({f"{name}_underflow": s["underflow"], f"{name}_rounding": s["rounding"],
                    f"{name}_total": s["total"], f"{name}_zero_frac": s["zero_frac"],
                    f"{name}_sqnr_db": 10 * math.log10(max(s["signal"], 1e-30) / max(s["total"], 1e-30))})
    return row


def linear_row(t: LinearRecord, q: LinearRecord, max_tokens: int = 512) -> dict | None:
    """All numbers of one quantized linear from its twin (``t``) and quantized (``q``) records."""
    info = q.info
    if not (info.weight_format or info.act_format):
        return None
    w, w_hat = t.weight(), q.weight()
    if w.shape != w_hat.shape:  # salient split: compare only where shapes agree
        return None
    x = t.x[:max_tokens]
    xq = x if not info.act_format else torch.ops.qcompile.qdq_activation(x, info.act_format, info.act_granularity)
    y_ref = x @ w.T
    s = error_split(w, w_hat, x, y_ref.pow(2).mean().item())
    row = {"module": info.module, "weight": info.weight_format or "-", "w_gran": info.weight_granularity or "-",
           "act": info.act_format or "-", "a_gran": info.act_granularity or "-",
           "out_features": w.shape[0], "in_features": w.shape[1],
           "sqnr_local_db": sqnr_db(y_ref, xq @ w_hat.T), "sqnr_e2e_db": sqnr_db(t.y, q.y),
           "underflow_err": s["underflow"], "rounding_err": s["rounding"], "total_err": s["total"],
           "signal": s["signal"], "zero_frac": s["zero_frac"], "x_min": x.min().item(), "x_max": x.max().item()}
    qp = q.weight_qparams()
    if qp is not None:
        row.update(_stats("w_scale", qp[0]))
        row["w_zp_mean"] = qp[1].float().mean().item()
    if info.act_format:
        from qcompile import formats as F
        a_scale, _ = F.choose_qparams(x, F.FormatSpec.parse(info.act_format), F.Granularity.parse(info.act_granularity))
        row.update(_stats("a_scale", a_scale))
    row.update(_format_rows(w, x, info.weight_granularity, s["signal"], (w_hat, s)))
    return row


def layer_errors(model, qm, input_ids: torch.Tensor, max_tokens: int = 4096, twin=None,
                 twin_records: dict | None = None, quant_records: dict | None = None) -> Table:
    """Per quantized linear (graph order): SQNR, the underflow/rounding split and scale statistics.

    Args:
        model: the FP model ``qm`` was made from (its twin is captured unless ``twin`` is given).
        qm: the QuantizedModel.
        input_ids: ``[1, T]`` tokens; statistics use the first ``max_tokens``.
        twin: an already built ``fp_twin(model, qm)``; twin_records / quant_records: runs already made.
    """
    input_ids = input_ids[:1, :max_tokens]
    if twin_records is None:
        twin_records = record_linears(twin if twin is not None else fp_twin(model, qm), input_ids, max_tokens)
    if quant_records is None:
        quant_records = record_linears(qm.graph_module, input_ids, max_tokens)
    rows = []
    for module, q in quant_records.items():
        t = twin_records.get(module)
        row = linear_row(t, q, max_tokens) if t is not None else None
        if row is not None:
            rows.append(row)
    return Table(rows, {"tokens": int(min(input_ids.shape[1], max_tokens))})


def compare(qm, input_ids: torch.Tensor, backends=("onnx", "triton"), tol: float = 2e-2, **options) -> Table:
    """Run ``input_ids`` through the reference graph and each backend; compare each quantized linear's output.

    Args:
        qm: the QuantizedModel (its graph is the reference).
        input_ids: ``[1, T]`` tokens.
        backends: any of ``"onnx"`` (fast form under onnxruntime), ``"onnx-exact"``, ``"triton"``.
        tol: a linear diverges when its ``rel_err = ‖y_backend − y_ref‖ / ‖y_ref‖`` exceeds the relative error
            of its own input in that backend (``in_rel_err``, 0 for Triton's local check) by more than ``tol``.
        options: ``onnx_path`` (an exported file to check instead of exporting), ``device`` (Triton; default
            CUDA when present), ``reference_records`` (a ``record_linears`` run of ``qm`` to reuse).

    Returns:
        A Table, one row per backend and linear (``backend, module, lowering, reason, rel_err, in_rel_err,
        excess_err, max_abs_err, sqnr_db, diverged, first``); ``meta["first_divergence"][backend]`` is the first
        diverging linear (or None), ``meta["status"][backend]`` says whether it ran ("ok") or why not.
    """
    from qcompile.report.backends import compare_backends
    return compare_backends(qm, input_ids, backends, tol, **options)


def format_rows(rows: list[dict], keys=("module", "weight", "w_gran", "act", "sqnr_local_db", "sqnr_e2e_db",
                                        "underflow_err", "rounding_err")) -> str:
    """A markdown table of dict rows (``layer_errors``, ``compare``)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 or math.isinf(v) else f"{v:.2e}"
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
