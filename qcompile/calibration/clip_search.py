"""AWQ-style weight clipping search: shrink each block's range before quantizing.

For every output channel and group (the quantizer's blocks) try ``ratio in {1, 1 - 1/grid, ...}``
down to ``1 - max_shrink``, clamp ``W`` to ``[ratio * min, ratio * max]`` of the block, quantize with
the reference quantizer, and keep the ratio that minimises the block's output error
``|| (Q(W_clip) - W)_block X_block ||^2``. As in the AWQ repository, each block is judged on its own
partial output (exact for per-channel quantization, where a row is one block); ``ratio = 1`` is in
the grid, so no block ends worse than without clipping. Run it after scaling (on ``W diag(s)`` with
``x / s``). The errors come from the diagonal blocks of ``X^T X``, so the cost per ratio is
``N K g`` (``N K^2`` per channel), independent of the number of tokens.
"""
from __future__ import annotations

import torch

from qcompile.calibration.objectives import (
    as_format,
    as_granularity,
    block_hessian,
    check_weights,
    flat_tokens,
    hessian_error,
)
from qcompile.errors import CalibrationError
from qcompile.formats import FormatSpec, Granularity, fake_quantize

__all__ = ["clip_ratios", "clip_search", "clip_weight"]


def _blocks(weight: torch.Tensor, gran: Granularity) -> torch.Tensor:
    n, k = weight.shape
    g = gran.group_size if gran.kind == "group" else k
    return weight.reshape(n, k // g, g)


def clip_weight(weight: torch.Tensor, ratios: torch.Tensor, gran: Granularity | str) -> torch.Tensor:
    """Clamp each block of ``weight [N, K]`` to ``[ratio * min, ratio * max]`` (``ratios [N, G]``)."""
    gran = as_granularity(gran)
    wb = _blocks(weight.float(), gran)
    r = ratios.float()[..., None]
    lo = wb.amin(-1, keepdim=True) * r
    hi = wb.amax(-1, keepdim=True) * r
    return torch.minimum(torch.maximum(wb, lo), hi).reshape(weight.shape)


def clip_ratios(max_shrink: float = 0.5, grid: int = 20) -> list[float]:
    """The ratios tried: ``1 - i / grid`` for ``i < max_shrink * grid`` (AWQ: 1.0, 0.95, ..., 0.55)."""
    if not 0.0 <= max_shrink < 1.0 or not isinstance(grid, int) or grid < 1:
        raise CalibrationError(f"clip search max_shrink={max_shrink!r}, grid={grid!r} not allowed; use "
                               "max_shrink in [0, 1) and an integer grid >= 1")
    return [1.0 - i / grid for i in range(max(1, round(max_shrink * grid)))]


def clip_search(weight: torch.Tensor, x_sample: torch.Tensor, fmt: FormatSpec | str,
                gran: Granularity | str, max_shrink: float = 0.5, grid: int = 20,
                return_ratios: bool = False, hessian: torch.Tensor | None = None):
    """Search per-block clipping ratios for ``weight [N, K]`` on activations ``x_sample [T, K]``.

    Args:
        weight: ``[N, K]`` weight (already scaled if a scale search ran before).
        x_sample: ``[T, K]`` its input activations (already divided by the scale).
        fmt, gran: the weight quantizer (INT, dINT or FP4; ``channel`` or ``group<g>``).
        max_shrink, grid: ratios ``1 - i / grid`` for ``i < max_shrink * grid``.
        return_ratios: also return the chosen ratios ``[N, G]``.
        hessian: optional ``[K, K]`` ``X^T X`` (any positive normalisation) over *all* calibration tokens,
            e.g. the OPTQ Hessian; its diagonal blocks replace the ones of ``x_sample``.

    Returns:
        The clipped weight ``[N, K]`` float32 (quantize it with the same ``fmt, gran``), or
        ``(clipped, ratios)``.
    """
    fmt, gran = as_format(fmt), as_granularity(gran)
    if fmt is None:
        raise CalibrationError("clip search needs a weight format")
    x = flat_tokens(x_sample)
    (w,) = check_weights([weight], x.shape[1], gran)
    n, k = w.shape
    g = gran.group_size if gran.kind == "group" else k
    with torch.no_grad():
        if hessian is None:
            hessians = block_hessian(x, g) / x.shape[0]  # [G, g, g]: errors are means over tokens
        else:
            if tuple(hessian.shape) != (k, k):
                raise CalibrationError(f"hessian shape {tuple(hessian.shape)} does not match K={k}")
            hb = hessian.detach().float().to(w.device).reshape(k // g, g, k // g, g)
            hessians = torch.diagonal(hb, dim1=0, dim2=2).permute(2, 0, 1).contiguous()  # [G, g, g]
        best_err = torch.full((n, k // g), float("inf"), device=w.device)
        best_ratio = torch.ones(n, k // g, device=w.device)
        for ratio in clip_ratios(max_shrink, grid):
            r = torch.full((n, k // g), ratio, device=w.device)
            err = hessian_error(fake_quantize(clip_weight(w, r, gran), fmt, gran) - w, hessians)
            better = err < best_err  # strict: ties keep the larger ratio (1.0 first)
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, r, best_ratio)
        clipped = clip_weight(w, best_ratio, gran)
    return (clipped, best_ratio) if return_ratios else clipped
