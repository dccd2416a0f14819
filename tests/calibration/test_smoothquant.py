"""SmoothQuant scales: the closed form, shared weights, clamping, and the folded layer's equivalence."""
from __future__ import annotations

import pytest
import torch
from calib_data import activations, weight

from qcompile.calibration.smoothquant import SCALE_MAX, SCALE_MIN, smoothquant_scales
from qcompile.errors import CalibrationError


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_matches_closed_form_over_shared_weights(alpha):
    x = activations(256, 48)
    w1, w2 = weight(16, 48, seed=1), weight(8, 48, seed=2)
    a = x.abs().amax(0)
    s = smoothquant_scales(a, [w1, w2], alpha)
    w_max = torch.maximum(w1.abs().amax(0), w2.abs().amax(0))  # max over every shared weight's column j
    expected = a.pow(alpha) / w_max.pow(1 - alpha)
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)


def test_single_tensor_and_folding_keep_the_output():
    x, w = activations(128, 32), weight(24, 32)
    s = smoothquant_scales(x.abs().amax(0), w, 0.5)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-5, atol=1e-5)
    # the outlier channels lose most of their lead: activation range ratio max/median shrinks
    def spread(t):
        return float(t.abs().amax(0).max() / t.abs().amax(0).median())
    assert spread(x / s) < spread(x) / 3


def test_dead_channels_get_one_and_scales_are_clamped():
    a = torch.tensor([0.0, 1e-12, 1e12, 2.0])
    w = torch.tensor([[1.0, 1.0, 1e-12, 0.0]])
    s = smoothquant_scales(a, [w], 0.5)
    assert s[0] == 1.0 and s[3] == 1.0  # dead activation / dead weight column: no scaling
    assert SCALE_MIN <= float(s.min()) and float(s.max()) <= SCALE_MAX
    assert torch.isfinite(s).all()


def test_bad_inputs_are_explained():
    with pytest.raises(CalibrationError, match="alpha"):
        smoothquant_scales(torch.ones(4), [torch.ones(2, 4)], 1.5)
    with pytest.raises(CalibrationError, match=r"\[N, 4\]"):
        smoothquant_scales(torch.ones(4), [torch.ones(2, 5)], 0.5)
    with pytest.raises(CalibrationError, match="NaN"):
        smoothquant_scales(torch.tensor([1.0, float("nan")]), [torch.ones(2, 2)], 0.5)
