"""The maths of folding per-channel scales, shared by the graph pass and the calibration engine.

A scale ``s [C] > 0`` between a producer and its consumers changes nothing in full precision:
producer output ``y -> y / s`` (norm: ``gamma / s, beta / s``; linear: rows ``W_p / s``, ``b_p / s``)
and consumer ``W -> W diag(s)`` (``W * s[None, :]``).
"""
from __future__ import annotations

import torch

__all__ = ["expand_kv_scales", "fuse_norm_into_linear", "scale_columns", "scale_rows"]


def scale_rows(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor):
    """Producer side: divide output channel ``j`` (row of ``W``, entry of ``b``/``gamma``) by ``s_j``."""
    s = s.to(weight.dtype)
    w = weight / (s[:, None] if weight.dim() == 2 else s)
    return w, (None if bias is None else bias / s.to(bias.dtype))


def scale_columns(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Consumer side: ``W diag(s)``."""
    return weight * s.to(weight.dtype)[None, :]


def expand_kv_scales(s: torch.Tensor, consumer_in: int, head_dim: int) -> torch.Tensor:
    """Map scales on V's output channels (KV heads) to o_proj's input channels (query heads, GQA).

    HF ``repeat_kv`` makes query head ``h = kv * n_rep + r`` read KV head ``kv``.
    """
    if s.numel() == consumer_in:
        return s
    n_kv = s.numel() // head_dim
    n_rep = consumer_in // s.numel()
    return s.view(n_kv, 1, head_dim).expand(n_kv, n_rep, head_dim).reshape(-1)


def fuse_norm_into_linear(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
                          beta: torch.Tensor | None):
    """``linear(norm(x) * gamma + beta)`` -> ``linear'(norm(x))``: ``W diag(gamma)``, ``b + W beta``."""
    w = weight if gamma is None else scale_columns(weight, gamma)
    if beta is not None:
        extra = weight @ beta.to(weight.dtype)
        bias = extra if bias is None else bias + extra
    return w, bias
