"""fuse_layernorm: folds norm affines into the linears; FP outputs preserved; match counts."""
import torch

from qcompile.architectures import architecture_of
from qcompile.capture import capture
from qcompile.passes.fuse_layernorm import fuse_layernorm
from qcompile.passes.graph_utils import check_graph
from qcompile.passes.runner import PassContext
from qcompile.recipes import Recipe


def _ctx(model, **kw):
    return PassContext(Recipe(**kw), architecture_of(model.config), model.config)


def test_fuse_layernorm_preserves_outputs(model, input_ids):
    ref = model(input_ids).logits
    gm = capture(model)
    result = fuse_layernorm(gm, _ctx(model))
    check_graph(gm)
    # two norms per layer (attention, MLP); the final norm feeds the skipped lm_head and stays
    assert result.matches == 2 * model.config.num_hidden_layers
    err = (gm(input_ids) - ref).abs().max().item()
    assert err <= 1e-5  # measured ~1e-6: float reassociation of W diag(gamma)
    # the user's model is untouched
    assert torch.equal(model(input_ids).logits, ref)


def test_fuse_layernorm_removes_affines(model):
    gm = capture(model)
    fuse_layernorm(gm, _ctx(model))
    aten = torch.ops.aten
    for n in gm.graph.nodes:
        if n.target == aten.layer_norm.default and "final_layer_norm" not in str(n.meta.get("nn_module_stack")):
            assert n.args[2] is None
    # LLaMA: the gamma mul of every decoder RMSNorm is gone
    muls = [n for n in gm.graph.nodes
            if n.target == aten.mul.Tensor and "RMSNorm" in str(n.meta.get("nn_module_stack", {}))
            and any(a.op == "get_attr" for a in n.args if isinstance(a, torch.fx.Node))]
    assert len(muls) <= 1  # only the final model.norm (feeds lm_head)


def test_skipped_consumer_blocks_fusion(model):
    gm = capture(model)
    result = fuse_layernorm(gm, _ctx(model, skip=("lm_head", "*.q_proj")))
    assert result.matches == model.config.num_hidden_layers  # only the MLP norms
