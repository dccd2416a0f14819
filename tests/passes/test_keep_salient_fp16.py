"""keep_salient_fp16: salient input channels kept in floating point; FP-equivalent split."""
import torch

from qcompile.architectures import architecture_of
from qcompile.calibration.engine import CalibrationResult
from qcompile.capture import capture
from qcompile.passes.graph_utils import annotation, check_graph, linear_sites
from qcompile.passes.keep_salient_fp16 import keep_salient_fp16, salient_channels
from qcompile.passes.runner import PassContext
from qcompile.recipes import Recipe


def test_salient_channels_picks_largest():
    sal, rest = salient_channels(torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0]), 0.4)
    assert sal.tolist() == [1, 3] and rest.tolist() == [0, 2, 4]


def test_split_is_exact_in_floating_point(model, input_ids):
    ref = model(input_ids).logits
    gm = capture(model)
    stats = {s.module: {"absmean": torch.rand(s.node.args[0].meta["val"].shape[-1])} for s in linear_sites(gm)}
    ctx = PassContext(Recipe(fp16_ratio=0.1), architecture_of(model.config), model.config,
                      CalibrationResult(act_stats=stats))
    res = keep_salient_fp16(gm, ctx)
    check_graph(gm)
    per_layer = 6 if model.config.model_type == "opt" else 7
    assert res.matches == per_layer * model.config.num_hidden_layers
    roles = [annotation(s.node).role for s in linear_sites(gm)]
    assert roles.count("salient") == res.matches
    assert (gm(input_ids) - ref).abs().max().item() <= 1e-5  # measured ~1e-6: split summation order
