"""quantize(): the graph's logits equal an independent module-level fake-quant on the same codes."""
import copy

import pytest
import torch

import qcompile
from qcompile.architectures import architecture_of
from qcompile.calibration.fake_quant import fake_quantize_layer
from qcompile.errors import CalibrationError, ModelError
from qcompile.recipes import resolve_recipe


def module_level_fake_quant(model, recipe):
    """Quantize a copy of ``model`` module by module (no graph): RTN codes from qcompile.formats."""
    m = copy.deepcopy(model)
    arch = architecture_of(m.config)
    for i, layer in enumerate(m.get_submodule(arch.layers)):
        fake_quantize_layer(layer, arch, recipe, {}, prefix=f"{arch.layers}.{i}")
    return m


@pytest.mark.parametrize("recipe", ["w4a8v4-rtn-int4", "w4a8-rtn-dint4", "w8a8-rtn", "w4a4-g64-rtn",
                                    "w4a16-rtn-int4"])
def test_graph_equals_module_level_fake_quant(model, input_ids, recipe):
    r = resolve_recipe(recipe)
    if r.weight_gran.kind == "group" and model.config.hidden_size % r.weight_gran.group_size:
        pytest.skip("group does not divide K")
    qm = qcompile.quantize(model, r, progress=False)
    ref = module_level_fake_quant(model, r)
    with torch.no_grad():
        a, b = qm(input_ids), ref(input_ids).logits
    assert torch.equal(a, b)  # bit-exact: same codes, same ops
    assert (a - model(input_ids).logits).abs().max() > 0  # and it did quantize


def test_pass_log_and_sites(model):
    qm = qcompile.quantize(model, "w4a8v4-rtn-int4", progress=False)
    names = [e.name for e in qm.pass_log]
    assert names == ["fold_scales", "quantize_weights", "insert_act_qdq", "cleanup"]
    sites = qm.quantized_sites()
    assert not any(s.module == "lm_head" for s in sites)


def test_calibrated_recipe_without_data_is_an_error(model):
    with pytest.raises(CalibrationError, match="needs calibration data"):
        qcompile.quantize(model, resolve_recipe("w4a4-mixed10-rtn"), progress=False)


def test_nan_weights_rejected(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(m.parameters())).view(-1)[0] = float("nan")
    with pytest.raises(ModelError, match="NaN or Inf"):
        qcompile.quantize(m, "w8a8-rtn", progress=False)


def test_mixed_precision_with_token_calibration(model, input_ids):
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))
    r = resolve_recipe("w4a4-mixed10-rtn").replace(calib_samples=4, calib_seq_len=32)
    qm = qcompile.quantize(model, r, calibration=ids, progress=False)
    assert [e.name for e in qm.pass_log][:3] == ["fold_scales", "keep_salient_fp16", "quantize_weights"]
    assert torch.isfinite(qm(input_ids)).all()
