"""``export_onnx``: a quantized model -> an ONNX file that stock onnxruntime (CPU) runs.

    path = qcompile.export_onnx(qm, "model.onnx")               # exact: the reference's ops and codes
    path = qcompile.export_onnx(qm, "fast.onnx", form="fast")   # integer kernels onnxruntime fuses

"Exact" means every quantizer and dequantizer is the reference's arithmetic bit for bit; float GEMMs
still sum in onnxruntime's order, and in a deep model the rare code that this flips propagates (see
tests/backends/onnx/test_export.py and examples/bench_onnx.py for the measured size).

Steps: trace with ``torch.onnx.export`` keeping the ``qcompile::`` ops as markers
(``markers.trace_to_onnx``), replace the markers (``lower.lower_markers``), then write to a temporary
file in the destination folder, run ``onnx.checker`` (full check) on it and ``os.replace`` it into
place: a failed export leaves no partial file. Weights go to ``<name>.data`` next to the model when
they exceed the 2 GB protobuf limit (or when ``external_data=True``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from qcompile.errors import ExportError

__all__ = ["FORMS", "OPSETS", "export_onnx", "export_onnx_forms"]

FORMS = ("exact", "fast")
# Blocked QuantizeLinear/DequantizeLinear and (u)int4 need opset 21. At 23 torch.onnx's optimizer emits
# RotaryEmbedding nodes that onnxruntime 1.32 rejects for batch > 1 (measured), so 23 is not offered.
OPSETS = (21, 22)
_PROTO_LIMIT = 2**31 - 64 * 2**20  # stay clear of protobuf's 2 GiB with room for the graph itself


def export_onnx(qm, path, opset: int = 21, form: str = "exact", *, external_data: bool | None = None) -> Path:
    """Export a ``QuantizedModel`` to ONNX (``input_ids [batch, seq] int64 -> logits [batch, seq, vocab]``).

    Args:
        qm: the result of ``qcompile.quantize`` (or its ``graph_module``).
        path: destination ``.onnx`` file; its folder must exist and be writable.
        opset: default-domain opset, one of ``OPSETS``.
        form: ``"exact"`` (QDQ graph, the reference numerics) or ``"fast"`` (``MatMulInteger`` /
            ``MatMulNBits`` where they express the recipe; see ``backends.onnx.lower``).
        external_data: store weights in ``<name>.data``; default: only when they exceed 2 GB.

    Returns:
        The path written. The model's ``metadata_props`` record the form, the recipe and how many
        linears each lowering took (``qcompile.lowering``).

    Raises:
        ExportError: bad opset, form or path, or a recipe the exporter cannot express.
    """
    return export_onnx_forms(qm, {form: path}, opset, external_data=external_data)[form]


def export_onnx_forms(qm, paths: dict, opset: int = 21, *, external_data: bool | None = None) -> dict:
    """Trace once and write several forms: ``{"exact": "a.onnx", "fast": "b.onnx"} -> {form: Path}``.

    Tracing (``torch.onnx.export``) is most of an export's time; the forms share it.
    """
    import onnx_ir as ir

    from qcompile.backends.onnx.lower import check_graph_module, lower_markers
    from qcompile.backends.onnx.markers import trace_to_onnx

    gm, recipe = _unwrap(qm)
    if not paths:
        raise ExportError("export_onnx_forms needs at least one {form: path} entry")
    checked = {form: _check_request(p, opset, form) for form, p in paths.items()}
    check_graph_module(gm)
    traced = trace_to_onnx(gm, opset)
    written = {}
    for i, (form, path) in enumerate(checked.items()):
        model = traced if i == len(checked) - 1 else ir.from_proto(ir.to_proto(traced))
        counts = lower_markers(model, form)
        model.metadata_props.update({
            "qcompile.form": form,
            "qcompile.recipe": json.dumps(recipe.to_dict()) if recipe is not None else "",
            "qcompile.lowering": json.dumps(counts, sort_keys=True),
        })
        _save_checked(model, path, external_data)
        written[form] = path
    return written


def _unwrap(qm):
    import torch

    if isinstance(getattr(qm, "graph_module", None), torch.fx.GraphModule):
        return qm.graph_module, getattr(qm, "recipe", None)
    if isinstance(qm, torch.fx.GraphModule):
        return qm, None
    raise ExportError(f"export_onnx needs the QuantizedModel returned by qcompile.quantize, got {type(qm).__name__}")


def _check_request(path, opset, form) -> Path:
    if form not in FORMS:
        raise ExportError(f"ONNX form {form!r} is unknown; choose one of {', '.join(FORMS)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise ExportError(f"opset {opset!r} is not supported; choose one of {list(OPSETS)} (blocked "
                          "QuantizeLinear/DequantizeLinear and int4 types need opset >= 21)")
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{str(path)!r} is a folder; give a file path such as {str(path / 'model.onnx')!r}")
    parent = path.parent.resolve()
    if not parent.is_dir():
        raise ExportError(f"folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"folder {str(parent)!r} is not writable; choose another output path")
    return parent / path.name


def _weight_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _save_checked(model, path: Path, external_data: bool | None) -> None:
    import onnx
    import onnx_ir as ir

    external = _weight_bytes(model) > _PROTO_LIMIT if external_data is None else bool(external_data)
    data_name = path.name + ".data"
    tmpdir = None
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp = tmpdir / path.name
        ir.save(model, tmp, external_data=data_name if external else None)
        onnx.checker.check_model(str(tmp), full_check=True)
        if external:
            os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmp, path)
    except ExportError:
        raise
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph failed onnx.checker: {str(e).splitlines()[0]}") from e
    except OSError as e:
        raise ExportError(f"could not write {str(path)!r}: {e.strerror or e}") from e
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
