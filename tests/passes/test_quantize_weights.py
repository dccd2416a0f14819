"""quantize_weights: every in-scope linear gets codes + dequantize; lm_head skipped; bad groups rejected."""
import pytest
import torch

from qcompile import formats as F
from qcompile.architectures import architecture_of
from qcompile.capture import capture
from qcompile.passes.graph_utils import annotation, check_graph, get_tensor, linear_sites
from qcompile.passes.quantize_weights import quantize_weights
from qcompile.passes.runner import PassContext
from qcompile.recipes import Recipe

DQ = torch.ops.qcompile.dequantize_weight.default


def _run(model, **kw):
    gm = capture(model)
    res = quantize_weights(gm, PassContext(Recipe(**kw), architecture_of(model.config), model.config))
    check_graph(gm)
    return gm, res


@pytest.mark.parametrize("fmt,gran", [("int4", "channel"), ("dint4", "group32"), ("fp4_e2m1", "channel"),
                                      ("int8", "channel")])
def test_all_decoder_linears_quantized(model, fmt, gran):
    gm, res = _run(model, weight_format=fmt, weight_granularity=gran)
    per_layer = 6 if model.config.model_type == "opt" else 7  # 4 attention + 2 (OPT fc1/fc2) or 3 (LLaMA MLP)
    assert res.matches == per_layer * model.config.num_hidden_layers
    sites = linear_sites(gm)
    assert sum(s.weight.target == DQ for s in sites) == res.matches
    head = [s for s in sites if s.module == "lm_head"]
    assert head and head[0].weight.op == "get_attr"  # lm_head kept in floating point


def test_codes_are_the_reference_codes(model):
    gm, _ = _run(model, weight_format="dint4", weight_granularity="group16")
    site = next(s for s in linear_sites(gm) if s.module.endswith("layers.1.self_attn.k_proj"))
    codes_node, s_node, z_node = site.weight.args[:3]
    w = model.get_submodule(site.module).weight
    codes, s, z = F.quantize(w, F.FormatSpec.parse("dint4"), F.Granularity.parse("group16"))
    assert torch.equal(F.unpack_int4(get_tensor(gm, codes_node.target), w.shape[1]), codes)
    assert torch.equal(get_tensor(gm, s_node.target), s)
    assert annotation(site.node).weight_format == "dint4"


def test_group_not_dividing_k_names_the_layer(model):
    with pytest.raises(F.FormatError, match=r"cannot quantize model\..*layers\.0\..*does not divide"):
        _run(model, weight_format="int4", weight_granularity="group48")
