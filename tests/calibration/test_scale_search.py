"""AWQ / AQAS scale search: alpha = 0 is RTN, the search lowers its own objective, AQAS <= AWQ's pick."""
from __future__ import annotations

import pytest
import torch
from calib_data import activations, weight

from qcompile.calibration.scale_search import (
    alpha_grid,
    attend_with_probs,
    scale_loss,
    scales_from_statistic,
    search_scales,
    search_scales_attention,
)
from qcompile.errors import CalibrationError
from qcompile.formats import FormatError, FormatSpec, Granularity, fake_quantize

K = 128


@pytest.fixture(scope="module")
def layer():
    """Activations with 3 planted x20 outlier channels and two linears sharing them (like k/v)."""
    return activations(1024, K), [weight(64, K, seed=1), weight(32, K, seed=2)]


def test_alpha_zero_is_rtn(layer):
    x, ws = layer
    stat = x.abs().mean(0)
    assert torch.equal(scales_from_statistic(stat, 0.0), torch.ones(K))
    assert alpha_grid(4).tolist() == [0.0, 0.25, 0.5, 0.75]
    _, losses = search_scales(x, ws, "int4", "channel", "int8", "token", "aqas", "max", 20, True)
    f, g, t = FormatSpec.parse("int4"), Granularity.parse("channel"), Granularity.parse("token")
    xq = fake_quantize(x, FormatSpec.parse("int8"), t)
    rtn = sum(float(((xq @ fake_quantize(w, f, g).T - x @ w.T) ** 2).sum()) for w in ws) / (1024 * 96)
    assert losses[0] == pytest.approx(rtn, rel=1e-5)


@pytest.mark.parametrize("objective,wfmt,wgran,afmt,agran", [
    ("awq", "int4", "channel", None, "token"),
    ("awq", "int4", "group32", None, "token"),
    ("aqas", "int4", "channel", "int8", "token"),
    ("aqas", "dint4", "channel", "int8", "token"),
    ("aqas", "fp4_e2m1", "channel", "int8", "token"),
    ("aqas", "int4", "group32", "int4", "group32"),  # W4A4 with groups (W4A4 paper, section 2.1)
])
@pytest.mark.parametrize("criterion", ["mean", "max"])
def test_search_lowers_its_own_objective(layer, objective, wfmt, wgran, afmt, agran, criterion):
    x, ws = layer
    s, losses = search_scales(x, ws, wfmt, wgran, afmt, agran, objective, criterion, 20, True)
    assert s.shape == (K,) and s.dtype == torch.float32 and bool((s > 0).all() & torch.isfinite(s).all())
    assert float(losses.min()) < 0.5 * float(losses[0])  # measured 0.25-0.43 of RTN
    best = scale_loss(x, ws, s, wfmt, wgran, afmt, agran, objective)
    assert best == pytest.approx(float(losses.min()), rel=1e-5)
    outliers = x.abs().amax(0).topk(3).indices
    assert bool((s[outliers] > s.median()).all())  # salient channels are scaled up


@pytest.mark.parametrize("afmt,agran", [("int8", "token"), ("int4", "token"), ("int4", "group32")])
def test_aqas_is_no_worse_than_the_awq_scale_under_the_aqas_objective(layer, afmt, agran):
    x, ws = layer
    s_awq = search_scales(x, ws, "int4", "channel", objective="awq", criterion="max")
    _, losses = search_scales(x, ws, "int4", "channel", afmt, agran, "aqas", "max", 20, True)
    awq_under_aqas = scale_loss(x, ws, s_awq, "int4", "channel", afmt, agran, "aqas")
    # same grid, so guaranteed; measured ratio 1.0 (A8, A4 g32), 0.86 (A4 per token)
    assert float(losses.min()) <= awq_under_aqas * (1 + 1e-6)


def test_hessian_and_direct_paths_agree(layer):
    x, ws = layer
    s = scales_from_statistic(x.abs().mean(0), 0.4)
    fast = scale_loss(x, ws, s, "dint4", "channel", objective="awq")           # quadratic form in dW
    direct = scale_loss(x, ws, s, "dint4", "channel", objective="awq", x_ref=x)  # outputs computed
    assert fast == pytest.approx(direct, rel=1e-4)
    parts = [scale_loss(x, [w], s, "dint4", "channel", objective="awq") * w.shape[0] for w in ws]
    assert fast == pytest.approx(sum(parts) / 96, rel=1e-5)  # summed over the shared weights


def test_x_stat_and_errors(layer):
    x, ws = layer
    stat = x.abs().amax(0)
    s = search_scales(x[:256], ws, "int4", "channel", objective="awq", x_stat=stat, grid=4)
    assert any(torch.equal(s, scales_from_statistic(stat, a)) for a in alpha_grid(4).tolist())
    assert not torch.equal(s, torch.ones(K))  # the planted outliers make some alpha > 0 win
    with pytest.raises(CalibrationError, match="objective"):
        search_scales(x, ws, "int4", "channel", objective="gptq")
    with pytest.raises(CalibrationError, match="criterion"):
        search_scales(x, ws, "int4", "channel", criterion="median")
    with pytest.raises(FormatError, match="does not divide"):
        search_scales(x, ws, "int4", "group48")
    with pytest.raises(CalibrationError, match="K=128"):
        search_scales(x, [torch.ones(4, 64)], "int4", "channel")


# --- attention-aware variant (AQAS appendix A.1) ------------------------------------------------------
B, T, H, HKV, D = 2, 64, 4, 2, 16


@pytest.fixture(scope="module")
def attention():
    g = torch.Generator().manual_seed(5)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = (2 * torch.randn(B, H, T, T, generator=g)).masked_fill(causal, float("-inf")).softmax(-1)
    v = activations(B * T, HKV * D, seed=6, n_outliers=2).reshape(B, T, HKV * D)
    return probs, v, weight(48, H * D, seed=7)


def _expand(s_v):  # o_proj input channel (kv * rep + r) * D + j reads V channel kv * D + j
    return s_v.view(HKV, 1, D).expand(HKV, H // HKV, D).reshape(-1)


def test_v_quantizer_commutes_with_the_scale_and_the_fold_is_exact(attention):
    probs, v, w_o = attention
    s_v = torch.rand(HKV * D) + 0.5
    fmt, vch = FormatSpec.parse("int4"), Granularity.parse("vchannel")
    torch.testing.assert_close(fake_quantize(v / s_v, fmt, vch) * s_v, fake_quantize(v, fmt, vch),
                               rtol=1e-5, atol=1e-5)
    attend = attend_with_probs(probs, HKV)
    folded = attend(v / s_v) @ (w_o * _expand(s_v)).T  # v_proj rows / s, o_proj columns * s
    torch.testing.assert_close(folded, attend(v) @ w_o.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective", ["awq", "aqas"])
def test_attention_search_lowers_the_attention_output_error(attention, objective):
    probs, v, w_o = attention
    attend = attend_with_probs(probs, HKV)
    s_v, losses = search_scales_attention(v, attend, w_o, "int4", "channel", "int8", "token", "int4",
                                          objective, "max", 20, True, head_dim=D)
    assert s_v.shape == (HKV * D,) and bool((s_v > 0).all())
    assert float(losses.min()) < 0.75 * float(losses[0])  # measured 0.53 of RTN
    # losses[0] is RTN measured against the FP attention output, V quantized
    vq = fake_quantize(v, FormatSpec.parse("int4"), Granularity.parse("vchannel"))
    a_q, ref = attend(vq).reshape(-1, H * D), attend(v).reshape(-1, H * D) @ w_o.T
    if objective == "aqas":
        a_q = fake_quantize(a_q, FormatSpec.parse("int8"), Granularity.parse("token"))
    w_hat = fake_quantize(w_o, FormatSpec.parse("int4"), Granularity.parse("channel"))
    assert float(losses[0]) == pytest.approx(float(((a_q @ w_hat.T - ref) ** 2).mean()), rel=1e-5)
    with pytest.raises(CalibrationError, match="head_dim"):
        search_scales_attention(v, attend, w_o, "int4", "channel")


def test_inspect_measures_a_module_output():
    """q/k/v with one shared scale, loss on the attention output (AWQ's module-to-inspect)."""
    x = activations(B * T, 64, seed=8).reshape(B, T, 64)
    wq, wk, wv = (weight(H * D if i == 0 else HKV * D, 64, seed=10 + i) for i in range(3))
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)

    def attention_output(ys):
        q, k, v = (y.view(B, T, -1, D).transpose(1, 2) for y in ys)
        k, v = (t.repeat_interleave(H // HKV, dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2) / D ** 0.5).masked_fill(causal, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)

    s, losses = search_scales(x, [wq, wk, wv], "int4", "channel", "int8", "token", "aqas", "max", 10, True,
                              inspect=attention_output)
    assert s.shape == (64,) and float(losses.min()) < 0.9 * float(losses[0])
