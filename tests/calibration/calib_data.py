"""Real-ish data for the per-layer algorithm tests: heavy tails and planted outlier channels.

A plain helper module (not a conftest), imported by the tests of this folder.
"""
from __future__ import annotations

import torch

OUTLIER_GAIN = 20.0


def activations(t: int, k: int, seed: int = 0, n_outliers: int = 3) -> torch.Tensor:
    """``[t, k]``: correlated Student-t (df 3) entries, log-normal channel spread, outlier channels x20."""
    torch.manual_seed(seed)  # StudentT samples from the global generator
    g = torch.Generator().manual_seed(seed)
    heavy = torch.distributions.StudentT(3.0).sample((t, k))
    # channels are correlated as in LLM hidden states: a shared low-rank part plus private noise
    rank = max(1, k // 8)
    shared = torch.distributions.StudentT(3.0).sample((t, rank)) @ torch.randn(rank, k, generator=g)
    x = (0.5 * heavy + shared / rank ** 0.5) * torch.exp(0.5 * torch.randn(k, generator=g))
    idx = torch.randperm(k, generator=g)[:n_outliers]
    x[:, idx] *= OUTLIER_GAIN
    return x


def weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    """``[n, k]`` heavy-tailed (Student-t, df 5) weight with LLM-like magnitude."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(5.0).sample((n, k)) * 0.05


def output_error(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    """``||x w_hat^T - x w^T||^2 / (T N)``."""
    return float(((x @ (w_hat - w).T) ** 2).mean())
