"""SmoothQuant (Xiao et al., 2022): per-input-channel scales that move activation range into the weights.

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with ``max|W_j|`` taken over column ``j`` of *every* linear that reads the same input (q/k/v, gate/up).
Applied as ``x / s`` and ``W diag(s)`` (see ``qcompile.calibration.objectives``).
"""
from __future__ import annotations

import torch

from qcompile.errors import CalibrationError

__all__ = ["SCALE_MAX", "SCALE_MIN", "smoothquant_scales"]

# Clamp bounds, as in the SmoothQuant repository (statistics and scales floored at 1e-5); we also cap s
# at 1e5 so that neither x / s nor W * s can overflow FP16 through a degenerate channel.
SCALE_MIN = 1e-5
SCALE_MAX = 1e5


def smoothquant_scales(act_absmax: torch.Tensor, weights, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant scales ``s [K]`` (float32, all in ``[SCALE_MIN, SCALE_MAX]``).

    Args:
        act_absmax: ``[K]`` per-channel max ``|x|`` over the calibration tokens.
        weights: one ``[N, K]`` weight or a list of them sharing this input.
        alpha: migration strength in ``[0, 1]``; 0 leaves activations alone, 1 moves all range to W.

    Zero handling: a channel whose activation max or weight-column max is 0 (dead or pruned) gets
    ``s = 1`` (scaling it cannot help and a huge or tiny ``s`` would be fragile at inference); the other
    statistics are floored at ``SCALE_MIN`` before the powers and ``s`` is clamped to
    ``[SCALE_MIN, SCALE_MAX]``.
    """
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise CalibrationError(f"SmoothQuant alpha={alpha!r} is not allowed; use a number in [0, 1]")
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    a = act_absmax.detach().float().abs().reshape(-1)
    k = a.numel()
    if not weights or any(w.dim() != 2 or w.shape[1] != k for w in weights):
        raise CalibrationError(f"SmoothQuant needs weights of shape [N, {k}] matching act_absmax [{k}]; got "
                               f"{[tuple(w.shape) for w in weights]}")
    w = torch.stack([wi.detach().float().abs().amax(0) for wi in weights]).amax(0)  # [K]
    if not (torch.isfinite(a).all() and torch.isfinite(w).all()):
        raise CalibrationError("SmoothQuant statistics contain inf or NaN; check the calibration pass")
    s = a.clamp_min(SCALE_MIN).pow(alpha) / w.clamp_min(SCALE_MIN).pow(1.0 - alpha)
    s = s.clamp(SCALE_MIN, SCALE_MAX)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
