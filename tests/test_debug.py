"""qcompile.debug: the eq. 4 error split, per-linear errors against the FP twin, backends compared per linear."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

import qcompile
from qcompile import debug

IDS = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def llama_qm():
    model = tiny_model("llama")
    return model, qcompile.quantize(model, "w4a8v4-rtn-int4", progress=False)


def test_error_split_hand_worked():
    w = torch.tensor([[1.0, 0.1, -0.2]])
    w_hat = torch.tensor([[1.0, 0.0, -0.25]])      # 0.1 underflows to 0; -0.2 rounds to -0.25
    x = torch.tensor([[1.0, 2.0, 4.0], [0.0, 1.0, 0.0]])
    s = debug.error_split(w, w_hat, x)
    # Δ_u X: [-0.2, -0.1] -> mean sq 0.025; Δ_r X: [-0.2, 0] -> 0.02; ΔX: [-0.4, -0.1] -> 0.085
    assert s["underflow"] == pytest.approx(0.025)
    assert s["rounding"] == pytest.approx(0.02)
    assert s["total"] == pytest.approx(0.085)
    assert s["zero_frac"] == pytest.approx(1 / 3)


def test_layer_errors_table(llama_qm):
    model, qm = llama_qm
    rows = debug.layer_errors(model, qm, IDS)
    assert isinstance(rows, debug.Table) and len(rows) == 14  # 2 layers x 7 linears, lm_head skipped
    assert rows[0]["module"] == "model.layers.0.self_attn.q_proj"
    # the first linear sees the FP input in both graphs: local and end-to-end SQNR agree
    assert rows[0]["sqnr_e2e_db"] == pytest.approx(rows[0]["sqnr_local_db"], abs=1e-3)
    for r in rows:
        assert 5 < r["sqnr_local_db"] < 60 and math.isfinite(r["sqnr_e2e_db"])
        assert r["w_scale_min"] > 0 and r["a_scale_min"] > 0
        for fmt in ("int4", "dint4"):
            assert r[f"{fmt}_underflow"] >= 0 and r[f"{fmt}_rounding"] > 0
    text = rows.to_markdown(["module", "sqnr_e2e_db"])
    assert text.splitlines()[0] == "| module | sqnr_e2e_db |" and len(text.splitlines()) == 16
    assert str(rows).startswith("| module |")


def test_dint4_lowers_underflow_on_random_weights(llama_qm):
    model, qm = llama_qm
    rows = debug.layer_errors(model, qm, IDS)
    # AQAS Fig. 4(d): dINT4's +-s/2 codes catch most of what INT4 rounds to zero
    assert all(r["dint4_underflow"] < r["int4_underflow"] for r in rows)
    assert all(r["dint4_zero_frac"] < r["int4_zero_frac"] for r in rows)


def test_recipe_split_matches_int4_column_for_rtn(llama_qm):
    model, qm = llama_qm
    rows = debug.layer_errors(model, qm, IDS)
    for r in rows:  # the recipe is INT4 RTN per channel: its own split is the INT4 column
        assert r["underflow_err"] == pytest.approx(r["int4_underflow"], rel=1e-5)
        assert r["rounding_err"] == pytest.approx(r["int4_rounding"], rel=1e-5)


def _perturb_onnx_scale(path, module: str, factor: float):
    import numpy as np
    import onnx_ir as ir

    model = ir.load(str(path))
    name = "_q_" + module.replace(".", "_") + "_int_scale"
    value = model.graph.initializers[name]
    value.const_value = ir.tensor(value.const_value.numpy() * np.float32(factor), name=name)
    ir.save(model, str(path))


def test_compare_onnx_clean_then_planted_bug(llama_qm, tmp_path):
    _, qm = llama_qm
    clean = debug.compare(qm, IDS, backends=("onnx",))
    assert clean.meta["status"]["onnx"] == "ok" and clean.meta["first_divergence"]["onnx"] is None
    assert {r["lowering"] for r in clean} == {"integer_gemm"}
    assert all(r["in_rel_err"] is not None for r in clean)  # each linear's own ONNX input was found
    assert max(r["rel_err"] for r in clean) < 1e-5  # measured 3e-7: integer-exact, float order only
    path = qcompile.export_onnx(qm, tmp_path / "m.onnx", form="fast")
    target = "model.layers.1.self_attn.o_proj"
    _perturb_onnx_scale(path, target, 1.05)
    bad = debug.compare(qm, IDS, backends=("onnx",), onnx_path=path)
    assert bad.meta["first_divergence"]["onnx"] == target
    flagged = [r["module"] for r in bad if r["first"]]
    assert flagged == [target]
    order = [r["module"] for r in bad]
    before = bad[:order.index(target)]
    assert len(before) == 10
    assert all(not r["diverged"] for r in before)


def test_compare_triton_lowering_on_cpu_reference(llama_qm):
    _, qm = llama_qm
    t = debug.compare(qm, IDS, backends=("triton",), device="cpu")
    assert t.meta["status"]["triton"].startswith("ok (ops on cpu")
    assert {r["lowering"] for r in t} == {"w4a8"} and len(t) == 14
    assert t.meta["first_divergence"]["triton"] is None
    assert max(r["rel_err"] for r in t) < 1e-5


def test_compare_triton_fallback_reasons():
    model = tiny_model("llama")
    qm = qcompile.quantize(model, "w4a16-rtn-int4", progress=False)
    t = debug.compare(qm, IDS, backends=("triton",), device="cpu")
    assert {r["lowering"] for r in t} == {"fallback"}
    assert all("W4A16" in r["reason"] for r in t)
    assert all(r["rel_err"] is None for r in t)


def test_compare_unknown_backend(llama_qm):
    from qcompile.errors import QcompileError

    with pytest.raises(QcompileError, match="unknown backend"):
        debug.compare(llama_qm[1], IDS, backends=("tpu",))


def test_layer_errors_of_a_loaded_calibrated_artifact(tmp_path):
    """Artifacts keep the folded scales, so the FP twin of a loaded model is the same as of the original."""
    from conftest import word_text, word_tokenizer

    model = tiny_model("llama")
    recipe = qcompile.Recipe("sq", weight_format="int4", act_format="int8", scaling="smoothquant",
                             calib_samples=4, calib_seq_len=32)
    qm = qcompile.quantize(model, recipe, calibration=word_text(400), tokenizer=word_tokenizer(), progress=False)
    loaded = qcompile.load(qcompile.save(qm, tmp_path / "a"))
    assert set(loaded.calibration.scales) == set(qm.calibration.scales)
    a, b = debug.layer_errors(model, qm, IDS), debug.layer_errors(model, loaded, IDS)
    assert [r["module"] for r in a] == [r["module"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["sqnr_local_db"] == pytest.approx(ra["sqnr_local_db"], abs=1e-4)
        assert rb["underflow_err"] == pytest.approx(ra["underflow_err"], rel=1e-4)


def test_compare_triton_planted_scale_bug(llama_qm, monkeypatch):
    """A wrong weight scale in one lowered kernel is flagged at exactly that linear (local check)."""
    from qcompile.backends.triton import lower
    from qcompile.passes.graph_utils import annotation, get_tensor

    target, orig = "model.layers.0.mlp.up_proj", lower.lower_linears

    def planted(gm, *args):
        report = orig(gm, *args)
        node = next(n for n in gm.graph.nodes if "qcompile_triton" in str(n.target) and annotation(n).module == target)
        gm.register_buffer("_planted_scale", get_tensor(gm, node.args[2].target) * 1.05)
        with gm.graph.inserting_before(node):
            node.replace_input_with(node.args[2], gm.graph.get_attr("_planted_scale"))
        return report

    monkeypatch.setattr(lower, "lower_linears", planted)
    t = debug.compare(llama_qm[1], IDS, backends=("triton",), device="cpu")
    assert t.meta["first_divergence"]["triton"] == target
    assert [r["module"] for r in t if r["diverged"]] == [target]  # local: nothing downstream is blamed
