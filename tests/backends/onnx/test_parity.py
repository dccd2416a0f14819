"""backends/onnx/parity.py: logit errors and perplexities, checked on a lookup-table "model" (no tracing)."""
from __future__ import annotations

import math

import onnx_ir as ir
import pytest
import torch

import qcompile
from qcompile.errors import ExportError


@pytest.fixture(scope="module")
def table_model(tmp_path_factory):
    """``logits = table[input_ids]`` as an ONNX file and as a torch callable; the file's table is off by +delta."""
    from qcompile.backends.onnx.builder import GraphEdit

    g = torch.Generator().manual_seed(0)
    table = torch.randn(32, 32, generator=g) * 3
    delta = 1e-3
    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "seq"]), type=ir.TensorType(ir.DataType.INT64))
    graph = ir.Graph([ids], [], nodes=[], opset_imports={"": 21}, name="table")
    ed = GraphEdit(graph)
    out = ed.op("Gather", ed.const((table + delta).numpy(), "table"), ids, axis=0)
    ed.commit()
    out.name = "logits"
    graph.outputs.append(out)
    path = tmp_path_factory.mktemp("table") / "table.onnx"
    ir.save(ir.Model(graph, ir_version=10), path)
    return (lambda x: table[x]), path, delta


def test_errors_and_perplexities(table_model):
    model, path, delta = table_model
    batches = [torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    r = qcompile.onnx_parity(model, path, batches)
    assert r["max_abs_logit_error"] == pytest.approx(delta, rel=1e-3)
    assert r["mean_abs_logit_error"] == pytest.approx(delta, rel=1e-3)
    assert r["tokens"] == 3 * 2 * 11 and r["batches"] == 3
    # a constant shift of every logit leaves the softmax, hence the perplexity, unchanged
    assert r["ppl_onnx"] == pytest.approx(r["ppl_reference"], rel=1e-7)  # float32 table + delta: measured 1.6e-8
    ref = qcompile.perplexity(model, torch.cat([b.flatten() for b in batches]), window=12, progress=False)
    assert r["ppl_reference"] == pytest.approx(ref["ppl"], rel=1e-6)
    assert math.isfinite(r["ppl_rel_diff"])


def test_single_tensor_of_batches(table_model):
    model, path, _ = table_model
    ids = torch.randint(0, 32, (4, 10), generator=torch.Generator().manual_seed(9))
    assert qcompile.onnx_parity(model, path, ids, threads=2)["tokens"] == 4 * 9


@pytest.mark.parametrize("bad", [torch.rand(2, 8), torch.zeros(2, 1, dtype=torch.long), []])
def test_bad_batches(table_model, bad):
    model, path, _ = table_model
    with pytest.raises(ExportError, match="batch"):
        qcompile.onnx_parity(model, path, bad)


def test_missing_file(table_model, tmp_path):
    with pytest.raises(ExportError, match="does not exist; export it first"):
        qcompile.onnx_parity(table_model[0], tmp_path / "none.onnx", torch.zeros(1, 4, dtype=torch.long))


def test_reference_attention_kernel(table_model):
    """The reference runs under the SDPA math kernel by default (the exported formula), else PyTorch's choice."""
    table, path, _ = table_model
    seen = []

    def model(x):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return table(x)

    ids = torch.randint(0, 32, (1, 6), generator=torch.Generator().manual_seed(1))
    assert qcompile.onnx_parity(model, path, ids)["reference_attention"] == "math"
    assert seen[-1] == (False, True)
    assert qcompile.onnx_parity(model, path, ids, attention="default")["reference_attention"] == "default"
    assert seen[-1] == (True, True)
    assert torch.backends.cuda.flash_sdp_enabled()  # the context is restored



def test_bad_reference_attention(table_model):
    with pytest.raises(ExportError, match="attention must be one of"):
        qcompile.onnx_parity(table_model[0], table_model[1], torch.zeros(1, 4, dtype=torch.long), attention="flash")
