"""Small helpers shared by the per-layer calibration algorithms (scale search, clipping, OPTQ).

Conventions of every algorithm in ``qcompile.calibration``: a linear is ``y = x W^T`` with
``W [N, K]`` and ``x [T, K]`` (``T`` tokens). A per-input-channel scale ``s [K] > 0`` maps
``x -> x / s`` and ``W -> W diag(s)`` (``W * s[None, :]``), so ``(x / s) (W diag(s))^T == x W^T``.
"""
from __future__ import annotations

import torch

from qcompile.errors import CalibrationError
from qcompile.formats import FormatSpec, Granularity, block_shape

__all__ = [
    "as_format",
    "as_granularity",
    "block_hessian",
    "check_weights",
    "flat_tokens",
    "hessian_error",
]


def as_format(fmt: FormatSpec | str | None) -> FormatSpec | None:
    """Accept a ``FormatSpec``, a format name (``"int4"``, ``"dint4"``, ``"fp4_e2m1"``) or ``None``."""
    if fmt is None or isinstance(fmt, FormatSpec):
        return fmt
    return FormatSpec.parse(fmt)


def as_granularity(gran: Granularity | str) -> Granularity:
    """Accept a ``Granularity`` or its name (``"channel"``, ``"token"``, ``"group64"``)."""
    return gran if isinstance(gran, Granularity) else Granularity.parse(gran)


def check_weights(weights, k: int, gran: Granularity) -> list[torch.Tensor]:
    """Weights sharing one input of width ``k``, as float32 ``[N_i, K]`` tensors.

    Raises a ``CalibrationError`` naming the bad weight, or the ``FormatError`` of ``block_shape`` when
    a group size does not divide ``K``.
    """
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    if not weights:
        raise CalibrationError("no weights were given: pass the list of linears that share this input")
    out = []
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != k:
            raise CalibrationError(f"weight {i} has shape {tuple(w.shape)}; expected [N, K] with K={k} "
                                   "(the input width of the activations)")
        out.append(w.detach().float())
    if gran.kind not in ("channel", "group"):
        raise CalibrationError(f"weight granularity {gran.name!r} is not supported here; use 'channel' "
                               "or 'group<g>'")
    block_shape(out[0].shape, gran)  # raises FormatError if the group size does not divide K
    return out


def flat_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` activations -> float32 ``[T, K]``; rejects empty or non-finite input."""
    if x.dim() < 2 or x.shape[-1] == 0 or x.numel() == 0:
        raise CalibrationError(f"activations of shape {tuple(x.shape)} cannot be used; expected [T, K] "
                               "with at least one token")
    x = x.detach().reshape(-1, x.shape[-1]).float()
    if not torch.isfinite(x).all():
        raise CalibrationError("activations contain inf or NaN; check the calibration forward pass")
    return x


def block_hessian(x: torch.Tensor, block: int) -> torch.Tensor:
    """Diagonal blocks of ``x^T x`` for consecutive column blocks of width ``block``: ``[K/block, b, b]``."""
    t, k = x.shape
    xb = x.reshape(t, k // block, block).transpose(0, 1)  # [G, T, b]
    return xb.transpose(1, 2) @ xb


def hessian_error(delta: torch.Tensor, hessians: torch.Tensor) -> torch.Tensor:
    """``sum_t ((delta x_t)_n^2)`` per row ``n`` and column block, from block Hessians.

    ``delta [N, K]``, ``hessians [G, b, b]`` (``block_hessian``) -> ``[N, G]``: the squared output error
    that each block of each row contributes on its own (cross-block terms left out; exact for G = 1).
    """
    g, b, _ = hessians.shape
    d = delta.reshape(delta.shape[0], g, b).transpose(0, 1)  # [G, N, b]
    return ((d @ hessians) * d).sum(-1).transpose(0, 1)
