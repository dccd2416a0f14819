"""OPTQ / GPTQ rounding (Frantar et al., 2023) on any grid of ``qcompile.formats``.

Columns of ``W [N, K]`` are quantized one at a time; the error of column ``q`` is pushed onto the
columns not yet quantized (AQAS paper eqs. 2-3):

    delta_F = -(w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_{:, q},      H = 2 X X^T

with the GPTQ implementation's tricks: the upper Cholesky factor of ``H^-1`` replaces the sequential
inverse updates, and updates are applied lazily in blocks of ``block_size`` columns.

Quantizer: per-channel qparams come from the whole ``W`` first; a group's qparams are chosen when the
algorithm reaches the group's first column, from the *current* (already updated) weights of the
group. Groups are always consecutive ranges of the *original* columns (also with ``act_order``), so
the result has the standard blocked layout. Each column is rounded by the reference's
``GridRounder`` (the rule of ``quantize_with_qparams``), so ``dequantize(codes, scale, zp) == W_hat``
exactly.
"""
from __future__ import annotations

import warnings

import torch

from qcompile.calibration.clip_search import clip_weight
from qcompile.calibration.objectives import as_format, as_granularity, check_weights
from qcompile.errors import CalibrationError
from qcompile.formats import FormatSpec, Granularity, GridRounder, choose_qparams

__all__ = ["hessian_accumulate", "optq_quantize"]

_COLUMN = Granularity("channel")  # one column [N, 1] is quantized as N blocks of one element


def hessian_accumulate(hessian: torch.Tensor | None, x: torch.Tensor, n_seen: int):
    """Running mean ``H = 2/n sum_t x_t x_t^T`` (AQAS eq. 3, as GPTQ's ``add_batch``).

    Args:
        hessian: ``[K, K]`` so far, or ``None`` to start (float32; pass a float64 one for more headroom).
        x: ``[..., K]`` new activations (all leading dims are tokens).
        n_seen: tokens already in ``hessian``.

    Returns:
        ``(hessian, n_seen + T)``; the update is in place when ``hessian`` is given.
    """
    x = x.detach().reshape(-1, x.shape[-1])
    t, k = x.shape
    if hessian is None:
        hessian = torch.zeros(k, k, dtype=torch.float32, device=x.device)
    if hessian.shape != (k, k):
        raise CalibrationError(f"Hessian of shape {tuple(hessian.shape)} cannot take activations with K={k}")
    if t == 0:
        return hessian, n_seen
    n = n_seen + t
    hessian.mul_(n_seen / n)
    x = x.to(hessian.dtype) * (2.0 / n) ** 0.5
    hessian.addmm_(x.T, x)
    return hessian, n


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, float64; more damping if it fails."""
    h = hessian.double()
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lam = damp * (10.0 ** attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(f"OPTQ: Hessian not positive definite with damp={damp}; used "
                                  f"damp={damp * 10.0 ** attempt:g}", stacklevel=3)
                return upper
    raise CalibrationError(f"OPTQ: the Hessian is not positive definite even with damp={damp * 1e5:g}; "
                           "check the calibration activations (NaN/inf or all-zero input)")


def _check(weight, hessian, fmt, gran, damp, block_size):
    fmt, gran = as_format(fmt), as_granularity(gran)
    if fmt is None:
        raise CalibrationError("OPTQ needs a weight format")
    if weight.dim() != 2:
        raise CalibrationError(f"OPTQ takes a [N, K] weight, got shape {tuple(weight.shape)}")
    (w,) = check_weights([weight], weight.shape[1], gran)
    k = w.shape[1]
    if hessian.shape != (k, k):
        raise CalibrationError(f"Hessian shape {tuple(hessian.shape)} does not match K={k} of the weight")
    if not torch.isfinite(hessian).all():
        raise CalibrationError("the OPTQ Hessian contains inf or NaN; check the calibration activations")
    if not 0.0 < damp <= 1.0:
        raise CalibrationError(f"OPTQ damp={damp!r} is not allowed; use a number in (0, 1]")
    if not isinstance(block_size, int) or block_size < 1:
        raise CalibrationError(f"OPTQ block_size={block_size!r} is not allowed; use an integer >= 1")
    return w.clone(), fmt, gran


def _permuted_problem(w: torch.Tensor, hessian: torch.Tensor, damp: float, act_order: bool):
    """Dead columns zeroed, columns permuted (act_order), and the upper Cholesky factor of H^-1."""
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0  # input channel always zero: any weight works, GPTQ sets it to 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    k = w.shape[1]
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    else:
        perm = torch.arange(k, device=w.device)
    hinv = _inverse_cholesky(h[perm][:, perm], damp).float()
    return w[:, perm], hinv, perm


def optq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: FormatSpec | str,
                  gran: Granularity | str, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, clip_ratios: torch.Tensor | None = None, qparams=None):
    """GPTQ/OPTQ-round ``weight [N, K]`` given the Hessian ``H [K, K]`` of its input.

    Args:
        weight: ``[N, K]`` (any float dtype; computed in float32).
        hessian: ``[K, K]``, e.g. from ``hessian_accumulate``.
        fmt, gran: target grid (INT / dINT / FP4; ``channel`` or ``group<g>``).
        damp: diagonal damping as a fraction of ``mean(diag H)``.
        block_size: lazy-batch width.
        act_order: quantize columns in decreasing ``diag(H)`` order (groups stay by original column).
        clip_ratios: optional ``[N, G]`` range shrink per block (``clip_search(..., return_ratios=True)``):
            each block's qparams come from its range clamped to ``ratio * [min, max]`` (the grid), while
            OPTQ still rounds and compensates the *unclipped* weights (the GPTQ repository's ``mse``
            grid option works the same way: a shrunk grid, original weights).
        qparams: optional ``(scale, zp)`` ``[N, 1, 1]`` per-channel grid to round on instead of the one
            from the weights' range (e.g. scales refitted after a first OPTQ pass).

    Returns:
        ``(codes uint8 [N, K], scale [N, G, 1], zp [N, G, 1])``, as ``qcompile.formats.quantize``.
        Dead columns (``H_ii == 0``: the input channel was always zero) are set to 0 before rounding,
        as GPTQ does.
    """
    w, fmt, gran = _check(weight, hessian, fmt, gran, damp, block_size)
    n, k = w.shape
    dev = w.device
    gsize = gran.group_size if gran.kind == "group" else k
    if clip_ratios is not None and tuple(clip_ratios.shape) != (n, k // gsize):
        raise CalibrationError(f"clip_ratios shape {tuple(clip_ratios.shape)} does not match the weight's "
                               f"blocks ({n}, {k // gsize})")
    if qparams is not None:
        if gran.kind != "channel" or tuple(qparams[0].shape) != (n, 1, 1) or tuple(qparams[1].shape) != (n, 1, 1):
            raise CalibrationError(f"qparams must be per-channel (scale, zp) of shape ({n}, 1, 1)")
        scale, zp = (t.to(dev, torch.float32).clone() for t in qparams)
    elif gran.kind == "channel":  # GPTQ: per-channel qparams from the whole (original) W
        scale, zp = choose_qparams(w if clip_ratios is None else clip_weight(w, clip_ratios, gran), fmt, gran)
    else:
        scale = torch.zeros(n, k // gsize, 1, device=dev)
        zp = torch.zeros(n, k // gsize, 1, device=dev)
    w, hinv, perm = _permuted_problem(w, hessian.to(dev), damp, act_order)
    order = perm.tolist()  # processing position -> original column
    position = torch.empty(k, dtype=torch.long, device=dev)
    position[perm] = torch.arange(k, device=dev)  # original column -> processing position
    codes = torch.empty(n, k, dtype=torch.uint8, device=dev)
    diag = torch.diagonal(hinv).tolist()
    rounders: dict[int, GridRounder] = {}
    if gran.kind == "channel":
        rounders[0] = GridRounder(fmt, scale[:, 0, 0], zp[:, 0, 0])
    # Each block of columns is worked on transposed ([B, N], one column per contiguous row): a column
    # step is then a handful of whole-row ops (round, error, one rank-1 update), the cost that bounds
    # OPTQ on a GPU, where every op is a launch.
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        wt = w[:, i1:i2].T.contiguous()  # [B, N]
        err = torch.empty_like(wt)
        ct = torch.empty_like(wt)  # codes as float
        hblk = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            i = i1 + j
            group = order[i] // gsize
            rounder = rounders.get(group)
            if rounder is None:  # group qparams from the group's current (partly updated) weights
                cols = position[group * gsize:(group + 1) * gsize]  # all still unquantized
                current = w[:, cols]
                inside = (cols >= i1) & (cols < i2)  # in this block: wt holds the updated values
                current[:, inside] = wt[cols[inside] - i1].T
                later = cols >= i2  # after it: lazy updates of this block not applied yet
                current[:, later] -= err[:j].T @ hinv[i1:i, cols[later]]
                if clip_ratios is not None:
                    current = clip_weight(current, clip_ratios[:, group:group + 1], _COLUMN)
                scale[:, group:group + 1], zp[:, group:group + 1] = choose_qparams(current, fmt, gran)
                rounder = rounders[group] = GridRounder(fmt, scale[:, group, 0], zp[:, group, 0])
            x, e = wt[j], err[j]
            c, q = rounder.codes_and_values(x)
            torch.sub(x, q, out=e).div_(diag[i])
            # in-block update of the later columns; the fused addr_ rounds differently from multiply-then-
            # subtract, enough to flip a few near-tie codes, which OPTQ's error feedback then spreads (README)
            wt[j + 1:].addr_(hblk[j, j + 1:], e, alpha=-1.0)
            ct[j] = c
        codes[:, perm[i1:i2]] = ct.T.to(torch.uint8)
        w[:, i2:] -= err.T @ hinv[i1:i2, i2:]  # lazy update of the columns after the block
    return codes, scale, zp
