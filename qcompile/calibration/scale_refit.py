"""refit_scales: after OPTQ, each channel's scale re-solved in closed form for the codes it chose.

OPTQ picks codes against the layer-output error ``tr((W - W_hat) H (W - W_hat)^T)`` (``H = 2 X X^T``)
but keeps the scale it started from (the min-max or clip-searched range). With the codes fixed, each
output channel's value vector is ``s * u`` (``u`` = the codes' values in units of the scale, dINT's
specials included) and the error is a quadratic in the single number ``s``:

    s* = (u^T H w) / (u^T H u)

which never raises the objective (``s`` is one of its candidates). Per-channel weights only (a grouped
row would need a G x G solve per channel); a channel whose solution is not a positive finite number
keeps its scale.

``optq_refit`` alternates: OPTQ on the refitted grid, refit again, ``rounds`` times, keeping per channel
whichever round has the lowest output error (channels are independent given H, so the mix is valid).
"""
from __future__ import annotations

import torch

from qcompile import formats as F
from qcompile.calibration.objectives import as_format, as_granularity
from qcompile.errors import CalibrationError

__all__ = ["optq_refit", "output_error", "refit_scales"]


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per channel ``(w - w_hat)^T H (w - w_hat)``: ``[N]``."""
    d = (w - w_hat).double()
    return ((d @ hessian.double()) * d).sum(1)


def refit_scales(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                 hessian: torch.Tensor, fmt: F.FormatSpec | str, gran: F.Granularity | str) -> torch.Tensor:
    """The per-channel scales ``[N, 1, 1]`` that minimise the output error for the given ``codes``.

    Args:
        weight: ``[N, K]`` the float weights the codes approximate.
        codes, scale, zp: ``formats.quantize``'s layout (``scale``, ``zp``: ``[N, 1, 1]``).
        hessian: ``[K, K]`` of the layer input (OPTQ's).
        fmt, gran: the codes' grid; ``gran`` must be per channel.
    """
    fmt, gran = as_format(fmt), as_granularity(gran)
    if gran.kind != "channel":
        raise CalibrationError(f"refit_scales takes per-channel weights, not {gran}")
    w = weight.detach().double()
    u = F.dequantize(codes, torch.ones_like(scale), zp, fmt, gran).double()  # values in units of the scale
    h = hessian.detach().double().to(w.device)
    hu = u @ h
    num, den = (hu * w).sum(1), (hu * u).sum(1)
    s_new = num / den
    old = scale.reshape(-1).double()
    ok = torch.isfinite(s_new) & (s_new > 0) & (den > 0)
    return torch.where(ok, s_new, old).to(scale.dtype).reshape(scale.shape)


def optq_refit(weight: torch.Tensor, hessian: torch.Tensor, fmt, gran, first, rounds: int = 1, **optq_kwargs):
    """``rounds`` of (OPTQ -> closed-form scale refit), starting from OPTQ's ``first = (codes, scale, zp)``.

    Round 1 refits ``first``'s scales; each later round runs OPTQ again on the best grid so far
    (``optq_quantize(..., qparams=)``) and refits. Per channel the round with the lowest
    ``output_error`` wins, so the result is never worse than round 1's. Returns ``(codes, scale, zp)``.
    """
    from qcompile.calibration.optq import optq_quantize

    fmt, gran = as_format(fmt), as_granularity(gran)
    if not isinstance(rounds, int) or rounds < 1:
        raise CalibrationError(f"optq_refit rounds must be an integer >= 1, got {rounds!r}")
    w = weight.detach().float()

    def refit(out):
        codes, scale, zp = out
        scale = refit_scales(w, codes, scale, zp, hessian, fmt, gran)
        return (codes, scale, zp), output_error(w, F.dequantize(codes, scale, zp, fmt, gran).float(), hessian)

    best, best_err = refit(first)
    for _ in range(rounds - 1):
        cand, err = refit(optq_quantize(w, hessian, fmt, gran, qparams=(best[1], best[2]), **optq_kwargs))
        take = err < best_err
        best = tuple(torch.where(take.reshape(-1, *([1] * (b.dim() - 1))), c, b) for c, b in zip(cand, best))
        best_err = torch.where(take, err, best_err)
    return best
