"""optq_fp_target: OPTQ against the FP model's inputs (engine.fp_target and the two-stream engine)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import qcompile
from qcompile.calibration.engine import fp_target
from qcompile.errors import CalibrationError


def _streams(t=2048, k=32, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(t, k, generator=g) * torch.logspace(-0.5, 0.5, k)
    # what earlier quantized layers hand on: a systematic per-channel gain error plus noise
    x_q = x_fp * (0.8 + 0.4 * torch.rand(k, generator=g)) + 0.02 * torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g)
    return w, x_fp, x_q, 2 * x_q.T @ x_q / t, 2 * x_fp.T @ x_q / t


def test_equal_inputs_give_the_weights_back():
    w, x_fp, _, _, _ = _streams()
    h = 2 * x_fp.T @ x_fp / len(x_fp)
    torch.testing.assert_close(fp_target(w, h, h, 0.01), w, rtol=0, atol=1e-5)


def test_target_is_the_least_squares_fit_to_the_fp_outputs():
    """W* matches W X_fp better than W does on the quantized inputs, and is the least-squares optimum."""
    w, x_fp, x_q, h, c = _streams()
    ws = fp_target(w, h, c, 1e-6)
    ref = x_fp @ w.T

    def err(m):
        return ((x_q @ m.T - ref) ** 2).sum().item()
    assert err(ws) < 0.5 * err(w)
    lstsq = torch.linalg.lstsq(x_q.double(), ref.double()).solution.T.float()
    torch.testing.assert_close(ws, lstsq, rtol=1e-3, atol=1e-3)


def test_engine_runs_two_streams_and_changes_the_codes_after_layer_0():
    """Layer 0 sees equal FP and quantized inputs (its codes equal the plain run's); later layers get
    other codes; the recipe field is checked."""
    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(3))
    recipe = qcompile.recipes.PRESETS["w4a8v4-optq-int4"].replace(calib_samples=8, calib_seq_len=64,
                                                                   calib_search_tokens=512)
    runs = [qcompile.quantize(tiny_model("llama"), recipe.replace(optq_fp_target=on), calibration=ids,
                              progress=False).calibration.weights for on in (False, True)]
    for name in runs[0]:
        same = all(torch.equal(a, b) for a, b in zip(runs[0][name], runs[1][name]))
        if ".0." in name and "o_proj" not in name and "down_proj" not in name:
            assert same, name  # q/k/v, gate/up of layer 0 read the embeddings in both streams... 
    assert any(not torch.equal(runs[0][n][0], runs[1][n][0]) for n in runs[0] if ".1." in n)
    with pytest.raises(Exception, match="optq_fp_target"):
        recipe.replace(optq_fp_target="yes")
