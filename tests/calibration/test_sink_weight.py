"""The attention-sink weight of the OPTQ Hessian (``Recipe.sink_weight``)."""
from __future__ import annotations

import pytest
import torch

from qcompile.calibration.engine import _Stats
from qcompile.calibration.optq import optq_quantize
from qcompile.formats import FormatSpec, Granularity, dequantize, quantize
from qcompile.recipes import Recipe, RecipeError


def _stats(k, w):
    return _Stats(k, True, 4, torch.Generator().manual_seed(0), sink_weight=w)


def test_hessian_weights_position_zero():
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    st = _stats(4, 7.0)
    st.add(x[:2])
    st.add(x[2:])  # two calls: the running mean must equal the one-shot weighted mean
    w = torch.ones(3, 5, dtype=torch.float64)
    w[:, 0] = 7.0
    flat, wf = x.reshape(-1, 4), w.reshape(-1)
    expected = 2.0 * (flat * wf[:, None]).T @ flat / wf.sum()
    torch.testing.assert_close(st.hessian.double(), expected, rtol=1e-5, atol=1e-6)
    assert st.n == 15 and st.hn == pytest.approx(float(wf.sum()))
    plain = _stats(4, 1.0)
    plain.add(x)
    torch.testing.assert_close(plain.hessian.double(), 2.0 * flat.T @ flat / 15, rtol=1e-5, atol=1e-6)


def test_statistics_other_than_the_hessian_are_unweighted():
    x = torch.randn(2, 6, 3)
    a, b = _stats(3, 50.0), _stats(3, 1.0)
    a.add(x)
    b.add(x)
    torch.testing.assert_close(a.absmean, b.absmean)
    torch.testing.assert_close(a.absmax, b.absmax)


def test_sink_weight_protects_the_sink_output():
    """Ordinary tokens span a subspace; the sink (position 0) lies outside it. Plain OPTQ is free to put
    rounding error in directions ordinary tokens do not use, which is where the sink lives (the
    mechanism measured on SmolLM2's v_proj, README "Attention sink"); weighting the sink in the Hessian
    cuts its output error, at a bounded cost on ordinary tokens (still far below RTN)."""
    g = torch.Generator().manual_seed(1)
    k, n, b, t, r = 32, 24, 8, 64, 20
    a = torch.randn(r, k, generator=g)
    x = torch.randn(b, t, r, generator=g) @ a + 0.01 * torch.randn(b, t, k, generator=g)
    basis, _ = torch.linalg.qr(a.T)  # [k, r]: the ordinary tokens' subspace
    v = torch.randn(k, generator=g)
    v -= basis @ (basis.T @ v)
    x[:, 0] = v * (x[0, 1].norm() / v.norm())  # the sink: same norm, orthogonal to that subspace
    w = torch.randn(n, k, generator=g)
    fmt, gran = FormatSpec.parse("int4"), Granularity("channel")
    sink, rest = x[:, 0].reshape(-1, k), x[:, 1:].reshape(-1, k)

    def errors(wq):
        return float(((sink @ (w - wq).T) ** 2).mean()), float(((rest @ (w - wq).T) ** 2).mean())

    rtn = errors(dequantize(*quantize(w, fmt, gran), fmt, gran))
    errs = {}
    for sw in (1.0, float(t)):
        st = _stats(k, sw)
        st.add(x)
        errs[sw] = errors(dequantize(*optq_quantize(w, st.hessian, fmt, gran), fmt, gran))
    plain, weighted = errs[1.0], errs[float(t)]
    assert weighted[0] < 0.2 * plain[0]       # the sink's output error drops
    assert weighted[1] < 1.5 * plain[1]       # ordinary tokens pay a bounded price...
    assert weighted[1] < 0.7 * rtn[1]         # ...and OPTQ still beats RTN on them


@pytest.mark.parametrize("bad", [0.5, 0, -1, float("nan"), "8", 1e7])
def test_recipe_rejects_bad_sink_weight(bad):
    with pytest.raises(RecipeError, match="sink_weight"):
        Recipe(sink_weight=bad)


def test_search_sinks_puts_every_first_token_in_the_sample():
    """Recipe.search_sinks: the scale/clip search sample holds every window's first token once (and the
    random rows besides), where a plain sample holds them only by chance."""
    from qcompile.calibration.engine import _Stats
    from qcompile.recipes import Recipe

    x = torch.randn(6, 50, 8)
    x[:, 0] += 100.0  # first tokens are recognisable
    for keep in (False, True):
        st = _Stats(8, False, 10, torch.Generator().manual_seed(0), keep_first=keep)
        st.add(x)
        firsts = int((st.sample()[:, 0] > 50).sum())
        if keep:
            assert firsts == 6 and st.sample().shape[0] >= 6 + 10 - 6
        else:
            assert firsts < 6 and st.sample().shape[0] == 10
    with pytest.raises(Exception, match="search_sinks"):
        Recipe(search_sinks=1)
