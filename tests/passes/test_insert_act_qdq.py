"""insert_act_qdq: per-token / per-group QDQ on every quantized linear input, V per channel."""
import torch

from qcompile.architectures import architecture_of
from qcompile.capture import capture
from qcompile.passes.graph_utils import annotation, check_graph, linear_sites
from qcompile.passes.insert_act_qdq import insert_act_qdq
from qcompile.passes.runner import PassContext
from qcompile.recipes import Recipe

QDQ = torch.ops.qcompile.qdq_activation.default


def test_counts_and_sharing(model):
    gm = capture(model)
    recipe = Recipe(weight_format=None, act_format="int8", v_format="int4")
    res = insert_act_qdq(gm, PassContext(recipe, architecture_of(model.config), model.config))
    check_graph(gm)
    n_layers = model.config.num_hidden_layers
    per_layer = 6 if model.config.model_type == "opt" else 7
    assert res.matches == (per_layer + 1) * n_layers  # every linear input + one V per layer
    qdq = [n for n in gm.graph.nodes if n.target == QDQ]
    # q/k/v share one input QDQ (and gate/up in LLaMA): OPT 4 inputs per layer, LLaMA 4, plus V
    assert len(qdq) == 5 * n_layers
    v_nodes = [n for n in qdq if n.args[2] == "vchannel"]
    assert len(v_nodes) == n_layers and all(annotation(n).role == "v" for n in v_nodes)
    for s in linear_sites(gm):
        quantized = s.module != "lm_head"
        assert (s.node.args[0].target == QDQ) == quantized


def test_group_activations(model, input_ids):
    gm = capture(model)
    recipe = Recipe(weight_format=None, act_format="int4", act_granularity="group32")
    insert_act_qdq(gm, PassContext(recipe, architecture_of(model.config), model.config))
    assert all(n.args[1:] == ("int4", "group32") for n in gm.graph.nodes if n.target == QDQ)
    assert gm(input_ids).shape == (2, 16, 128)
