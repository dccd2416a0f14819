"""backends/onnx/export.py: bad requests fail with one clear ExportError and leave no file behind.

The slow step (torch.onnx tracing) runs once per module: later exports reuse a copy of that trace.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model

import qcompile
from qcompile.backends.onnx import markers
from qcompile.errors import ExportError
from qcompile.recipes import Recipe


@pytest.fixture(scope="module")
def qm():
    return qcompile.quantize(tiny_model("llama"), "w4a8-rtn-dint4", progress=False)


@pytest.fixture(scope="module")
def traced(qm):
    return markers.trace_to_onnx(qm.graph_module, 21)


@pytest.fixture
def fast_trace(traced, monkeypatch):
    """Make export_onnx reuse the module's trace (a fresh copy each time: lowering edits it in place)."""
    import onnx_ir as ir
    calls = []

    def trace(gm, opset, example_ids=None):
        calls.append(opset)
        return ir.from_proto(ir.to_proto(traced))

    monkeypatch.setattr(markers, "trace_to_onnx", trace)
    return calls


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("opset", [20, 11, 23, "21", True, None])
def test_unsupported_opset(qm, tmp_path, opset):
    with pytest.raises(ExportError, match="opset") as err:
        qcompile.export_onnx(qm, tmp_path / "m.onnx", opset=opset)
    assert "21" in one_line(err)
    assert not any(tmp_path.iterdir())


def test_unknown_form(qm, tmp_path):
    with pytest.raises(ExportError, match="form 'fastest' is unknown; choose one of exact, fast"):
        qcompile.export_onnx(qm, tmp_path / "m.onnx", form="fastest")


@pytest.mark.parametrize("where", ["missing_folder", "a_folder", "proc"])
def test_unwritable_path(qm, tmp_path, where, fast_trace):
    path = {"missing_folder": tmp_path / "nope" / "m.onnx", "a_folder": tmp_path,
            "proc": "/proc/qcompile-test.onnx"}[where]
    with pytest.raises(ExportError) as err:
        qcompile.export_onnx(qm, path)
    msg = one_line(err)
    assert {"missing_folder": "does not exist", "a_folder": "is a folder", "proc": "/proc"}[where] in msg
    assert not any(tmp_path.iterdir())
    assert not os.path.exists("/proc/qcompile-test.onnx")


def test_not_a_quantized_model(tmp_path):
    with pytest.raises(ExportError, match="needs the QuantizedModel"):
        qcompile.export_onnx(tiny_model("llama"), tmp_path / "m.onnx")


def test_recipe_the_exporter_cannot_express(tmp_path, monkeypatch):
    recipe = Recipe("fp4-acts", weight_format="int4", act_format="fp4_e2m1")
    qm = qcompile.quantize(tiny_model("opt"), recipe, progress=False)
    monkeypatch.setattr(markers, "trace_to_onnx", lambda *a, **k: pytest.fail("checked before tracing"))
    with pytest.raises(ExportError, match="fp4_e2m1 .*cannot be exported") as err:
        qcompile.export_onnx(qm, tmp_path / "m.onnx")
    one_line(err)
    assert not any(tmp_path.iterdir())


def test_failed_check_leaves_no_partial_file(qm, tmp_path, fast_trace, monkeypatch):
    (tmp_path / "keep.txt").write_text("unrelated")

    def broken(*args, **kwargs):
        raise onnx.checker.ValidationError("synthetic failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(ExportError, match="failed onnx.checker: synthetic failure"):
        qcompile.export_onnx(qm, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # no m.onnx, no temporary folder


def test_existing_file_is_replaced_whole(qm, tmp_path, fast_trace):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    assert qcompile.export_onnx(qm, path) == path
    onnx.checker.check_model(str(path), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_external_data(qm, tmp_path, fast_trace):
    inline = qcompile.export_onnx(qm, tmp_path / "inline.onnx")
    split = qcompile.export_onnx(qm, tmp_path / "split.onnx", external_data=True)
    assert (tmp_path / "split.onnx.data").stat().st_size > 100_000
    big = [t for t in onnx.load(str(split), load_external_data=False).graph.initializer if len(t.dims) == 2]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    from qcompile.backends.onnx.parity import ort_session
    ids = np.random.default_rng(0).integers(0, 128, (1, 9)).astype(np.int64)
    a, b = (ort_session(p).run(None, {"input_ids": ids})[0] for p in (inline, split))
    assert np.array_equal(a, b)
    assert fast_trace == [21, 21]


def test_opset_22(qm, tmp_path):
    path = qcompile.export_onnx(qm, tmp_path / "m.onnx", opset=22, form="fast")
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 22
    r = qcompile.onnx_parity(qm, path, torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert r["mean_abs_logit_error"] < 1e-4


def test_import_stays_light():
    import subprocess
    import sys
    code = ("import sys, qcompile; qcompile.export_onnx, qcompile.onnx_parity; "
            "assert not {'onnx', 'onnxruntime', 'onnx_ir', 'onnxscript'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
