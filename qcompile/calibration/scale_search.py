"""AWQ and AQAS per-input-channel scale search (grid over the exponent alpha).

    s = s_X^alpha / sqrt(max(s_X^alpha) * min(s_X^alpha)),   alpha in {0, 1/grid, ..., (grid-1)/grid}

``s_X`` is a per-channel activation statistic: mean ``|x|`` (AWQ) or max ``|x|`` (AQAS appendix A.4
found max better; ``criterion`` selects). The normalisation is the AWQ repository's; it changes the
loss only by float rounding (min-max quantizers are scale-equivariant) but keeps folded magnitudes
balanced. The alpha that
minimises the objective wins; alpha = 0 gives exactly ``s = 1`` (RTN), so the search never does worse
than RTN on its own objective. Objectives (reported as the mean squared output error over the tokens
and the outputs of all the linears that share the input):

  * ``"awq"``  (AWQ):          ``||Q(W diag(s)) (diag(s)^-1 X) - W X||^2``   activations not quantized
  * ``"aqas"`` (AQAS eq. 1):   ``argmin_s ||Q(W diag(s)) Q(diag(s)^-1 X) - W X||_2^2``
    with ``Q(diag(s)^-1 X)`` the dynamic per-token (or per-group) quantization in ``act_fmt``.

``search_scales_attention`` is the attention-aware variant of AQAS appendix A.1 for the V -> o_proj
scale: the loss is the distortion of o_proj's output on the attention output with quantized V.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qcompile.calibration.objectives import as_format, as_granularity, check_weights, flat_tokens
from qcompile.errors import CalibrationError
from qcompile.formats import FormatSpec, Granularity, fake_quantize

__all__ = [
    "CRITERIA",
    "OBJECTIVES",
    "alpha_grid",
    "attend_with_probs",
    "channel_statistic",
    "scale_loss",
    "scales_from_statistic",
    "search_scales",
    "search_scales_attention",
]

OBJECTIVES = ("awq", "aqas")
CRITERIA = ("mean", "max")
STAT_FLOOR = 1e-5  # statistics below STAT_FLOOR * max are floored there (s stays finite and > 0)


def alpha_grid(grid: int) -> torch.Tensor:
    """The exponents tried: ``[0, 1/grid, ..., (grid-1)/grid]`` (float64)."""
    if not isinstance(grid, int) or grid < 1:
        raise CalibrationError(f"scale grid={grid!r} is not allowed; use an integer >= 1")
    return torch.arange(grid, dtype=torch.float64) / grid


def channel_statistic(x: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-channel ``mean |x|`` or ``max |x|`` over all tokens of ``x [..., K]`` -> ``[K]`` float32."""
    if criterion not in CRITERIA:
        raise CalibrationError(f"scale criterion {criterion!r} is unknown; allowed: {CRITERIA}")
    a = flat_tokens(x).abs()
    return a.mean(0) if criterion == "mean" else a.amax(0)


def scales_from_statistic(stat: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = stat^alpha`` normalised by ``sqrt(max(s) min(s))`` over live channels; dead channels get 1."""
    stat = stat.detach().float()
    top = float(stat.max()) if stat.numel() else 0.0
    live = stat > 0
    if top <= 0.0 or not math.isfinite(top):
        return torch.ones_like(stat)
    s = stat.clamp_min(top * STAT_FLOOR).pow(float(alpha))
    s = s / torch.sqrt(s[live].max() * s[live].min())
    return torch.where(live, s, torch.ones_like(s))


class _Objective:
    """The loss of one scale search, with everything that does not depend on ``s`` precomputed.

    Two exact evaluation paths: with unquantized activations and ``x_ref = x`` the loss is a quadratic
    form in the weight error, ``sum_n dW_n (X^T X) dW_n^T`` with ``dW = Q(W s)/s - W`` (cost N K^2 per
    point instead of T N K); otherwise the outputs are computed directly (cost T N K per point).
    """

    def __init__(self, x, weights, weight_fmt, weight_gran, act_fmt, act_gran, objective, x_ref=None,
                 biases=None, inspect=None, lead_shape=None, grid=1):
        self.wfmt, self.wgran = weight_fmt, weight_gran
        self.afmt = act_fmt if objective == "aqas" else None
        self.agran = act_gran
        self.x, self.weights = x, weights
        self.inspect, self.lead = inspect, lead_shape
        self.biases = biases
        self.sizes = [w.shape[0] for w in weights]
        self.w_cat = w_cat = torch.cat(weights)  # [sum N, K]
        t, k = x.shape
        n = w_cat.shape[0]
        plain = self.afmt is None and x_ref is None and inspect is None
        self.use_hessian = plain and (t * k * k + grid * n * k * k) < grid * t * n * k
        if self.use_hessian:
            self.hessian = x.T @ x  # [K, K]
            self.count = t * n
            return
        x_ref = x if x_ref is None else flat_tokens(x_ref)
        if x_ref.shape != x.shape:
            raise CalibrationError(f"x_ref shape {tuple(x_ref.shape)} differs from x {tuple(x.shape)}")
        self.y_ref = self._outputs(x_ref @ w_cat.T)

    def _outputs(self, y: torch.Tensor) -> torch.Tensor:
        if self.inspect is None:
            return y
        ys = list(torch.split(y, self.sizes, dim=-1))
        if self.biases is not None:
            ys = [yi if b is None else yi + b.float() for yi, b in zip(ys, self.biases)]
        return self.inspect([yi.reshape(*self.lead, yi.shape[-1]) for yi in ys]).float()

    def _quantized_weights(self, s: torch.Tensor) -> torch.Tensor:
        return torch.cat([fake_quantize(w * s, self.wfmt, self.wgran) for w in self.weights])

    def __call__(self, s: torch.Tensor) -> float:
        """Mean squared output error of the scale ``s [K]``."""
        w_hat = self._quantized_weights(s)  # [sum N, K], scaled space
        if self.use_hessian:
            delta = w_hat / s - self.w_cat
            return float(((delta @ self.hessian) * delta).sum()) / self.count
        xs = self.x / s
        if self.afmt is not None:
            xs = fake_quantize(xs, self.afmt, self.agran)
        if self.inspect is None:  # one BLAS call computes the error: -y_ref + xs w_hat^T
            err = torch.addmm(self.y_ref, xs, w_hat.T, beta=-1).reshape(-1)
        else:
            err = (self._outputs(xs @ w_hat.T) - self.y_ref).reshape(-1)
        return float(torch.dot(err, err)) / err.numel()


def _prepare(x_sample, weights, weight_fmt, weight_gran, act_fmt, act_gran, objective, criterion):
    if objective not in OBJECTIVES:
        raise CalibrationError(f"scale-search objective {objective!r} is unknown; allowed: {OBJECTIVES}")
    if criterion not in CRITERIA:
        raise CalibrationError(f"scale criterion {criterion!r} is unknown; allowed: {CRITERIA}")
    weight_fmt, act_fmt = as_format(weight_fmt), as_format(act_fmt)
    if weight_fmt is None:
        raise CalibrationError("a scale search needs a weight format (it searches Q(W s))")
    weight_gran, act_gran = as_granularity(weight_gran), as_granularity(act_gran)
    x = flat_tokens(x_sample)
    weights = check_weights(weights, x.shape[1], weight_gran)
    return x, weights, weight_fmt, weight_gran, act_fmt, act_gran


def scale_loss(x_sample: torch.Tensor, weights, s: torch.Tensor, weight_fmt: FormatSpec | str,
               weight_gran: Granularity | str, act_fmt: FormatSpec | str | None = None,
               act_gran: Granularity | str = "token", objective: str = "awq", *,
               x_ref: torch.Tensor | None = None) -> float:
    """The objective of ``search_scales`` (mean squared output error) evaluated at one scale ``s [K]``."""
    x, weights, wf, wg, af, ag = _prepare(x_sample, weights, weight_fmt, weight_gran, act_fmt, act_gran,
                                          objective, "mean")
    with torch.no_grad():
        return _Objective(x, weights, wf, wg, af, ag, objective, x_ref=x_ref)(s.detach().float())


def _grid_search(loss_fn: Callable[[torch.Tensor], float], stat: torch.Tensor, grid: int):
    alphas = alpha_grid(grid)
    losses = torch.empty(grid, dtype=torch.float64)
    best_s, best = None, math.inf
    for i, alpha in enumerate(alphas.tolist()):
        s = scales_from_statistic(stat, alpha)
        losses[i] = loss_fn(s)
        if losses[i] < best:  # strict: ties keep the smaller alpha (alpha = 0 first)
            best, best_s = float(losses[i]), s
    if best_s is None:
        raise CalibrationError("every scale in the grid gave a non-finite loss; check the weights and "
                               "activations for inf/NaN")
    return best_s, losses


def search_scales(x_sample: torch.Tensor, weights, weight_fmt: FormatSpec | str,
                  weight_gran: Granularity | str, act_fmt: FormatSpec | str | None = None,
                  act_gran: Granularity | str = "token", objective: str = "awq", criterion: str = "mean",
                  grid: int = 20, return_losses: bool = False, *, x_stat: torch.Tensor | None = None,
                  biases=None, inspect: Callable[[list[torch.Tensor]], torch.Tensor] | None = None):
    """Grid-search one scale ``s [K]`` shared by ``weights`` (AWQ or AQAS objective, see module doc).

    Args:
        x_sample: ``[T, K]`` calibration activations (a token subsample is fine; cost is linear in T),
            or ``[..., K]`` whole sequences when ``inspect`` needs them.
        weights: ``[N_i, K]`` weights reading this input (q/k/v, gate/up, fc1...).
        weight_fmt, weight_gran: weight quantizer (``qcompile.formats``; channel or group<g>).
        act_fmt, act_gran: dynamic activation quantizer used by ``"aqas"`` (ignored by ``"awq"``;
            ``None`` means activations stay in floating point).
        objective: ``"awq"`` or ``"aqas"``.
        criterion: activation statistic ``s_X``, ``"mean"`` (AWQ) or ``"max"`` (AQAS).
        grid: number of alphas, ``alpha = i / grid`` for ``i < grid``.
        return_losses: also return the loss of every alpha (``[grid]`` float64).
        x_stat: optional ``[K]`` statistic gathered over all calibration tokens (else from ``x_sample``).
        biases: optional per-weight biases, used only by ``inspect``.
        inspect: optional map from the per-weight outputs (shaped ``[..., N_i]``, biases added) to the
            tensor whose distortion is measured (AWQ's "module to inspect", e.g. the attention output).

    Returns:
        ``s`` (``[K]`` float32, all > 0), or ``(s, losses)``. Fold as ``x / s`` and ``W * s[None, :]``.
    """
    x, weights, wf, wg, af, ag = _prepare(x_sample, weights, weight_fmt, weight_gran, act_fmt, act_gran,
                                          objective, criterion)
    if x_stat is None:
        stat = channel_statistic(x, criterion)
    else:
        stat = x_stat.detach().float().reshape(-1).to(x.device)
    if stat.numel() != x.shape[1]:
        raise CalibrationError(f"x_stat has {stat.numel()} channels; the activations have {x.shape[1]}")
    lead = tuple(x_sample.shape[:-1])
    with torch.no_grad():
        loss_fn = _Objective(x, weights, wf, wg, af, ag, objective, biases=biases, inspect=inspect,
                             lead_shape=lead, grid=grid)
        s, losses = _grid_search(loss_fn, stat, grid)
    return (s, losses) if return_losses else s


def attend_with_probs(probs: torch.Tensor, num_kv_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``attend`` for ``search_scales_attention`` from attention probabilities ``[B, H, T, T]``.

    The returned function maps V ``[B, T, Hkv * d]`` to the o_proj input ``[B, T, H * d]``: query head
    ``h`` reads KV head ``h // (H / Hkv)`` (HF ``repeat_kv``).
    """
    b, h, t, _ = probs.shape
    if h % num_kv_heads:
        raise CalibrationError(f"{h} attention heads cannot share {num_kv_heads} KV heads evenly")
    probs = probs.detach().float()

    def attend(v: torch.Tensor) -> torch.Tensor:
        vh = v.reshape(b, t, num_kv_heads, -1).transpose(1, 2)       # [B, Hkv, T, d]
        vh = vh.repeat_interleave(h // num_kv_heads, dim=1)           # [B, H, T, d]
        return (probs @ vh).transpose(1, 2).reshape(b, t, -1)         # [B, T, H * d]

    return attend


def _kv_expand(c_v: int, k_o: int, head_dim: int | None) -> torch.Tensor:
    """Index ``[K_o]``: the V channel that feeds each o_proj input channel (query h reads kv h // rep)."""
    if k_o == c_v:
        return torch.arange(k_o)
    if head_dim is None or c_v % head_dim or k_o % c_v:
        raise CalibrationError(f"o_proj has {k_o} inputs but V has {c_v} channels: pass head_dim "
                               "(grouped-query attention needs it to tie the scales of shared KV heads)")
    n_kv, n_rep = c_v // head_dim, k_o // c_v
    idx = torch.arange(c_v).view(n_kv, 1, head_dim).expand(n_kv, n_rep, head_dim)
    return idx.reshape(-1)


def search_scales_attention(v: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor],
                            w_o: torch.Tensor, weight_fmt: FormatSpec | str, weight_gran: Granularity | str,
                            act_fmt: FormatSpec | str | None = None, act_gran: Granularity | str = "token",
                            v_fmt: FormatSpec | str | None = None, objective: str = "aqas",
                            criterion: str = "max", grid: int = 20, return_losses: bool = False, *,
                            head_dim: int | None = None, max_tokens: int | None = 4096):
    """Attention-aware scale search between V (v_proj's output) and o_proj (AQAS appendix A.1).

    The scale ``s`` sits on V's channels: v_proj rows are divided by ``s``, o_proj columns multiplied by
    the expanded ``s``. The loss is the distortion of o_proj's output on the attention output, with V
    quantized per channel over tokens (``v_fmt``, "vchannel") and o_proj's weights (and, for
    ``"aqas"``, its input activations) quantized:

        || Q(W_o diag(s)) Q(diag(s)^-1 P Q_v(V)) - W_o P V ||^2

    ``Q_v`` commutes with a per-channel scale (its range is per channel), and so do v_proj's per-row
    weight quantizer and ``P``; the terms that depend on ``s`` are therefore o_proj's, and ``P Q_v(V)``
    is computed once. The FP reference ``W_o P V`` makes the search aware of the V quantization error.

    Args:
        v: ``[B, T, C_v]`` v_proj outputs (whole sequences), floating point.
        attend: linear map ``V -> o_proj input [B, T, K_o]`` (attention probabilities times V, heads
            concatenated); ``attend_with_probs`` builds one, or pass a closure over q, k and the mask.
        w_o: o_proj weight ``[N, K_o]``.
        v_fmt: V format (``None``: V not quantized).
        head_dim: needed when ``K_o != C_v`` (grouped-query attention): scales are tied across the
            query heads that read one KV head.
        max_tokens: rows of the attention output used by the loss (evenly spaced; ``None``: all).
        Other arguments as in ``search_scales``.

    Returns:
        ``s_v`` ``[C_v]`` (or ``(s_v, losses)``); o_proj's scale is ``s_v[index]`` with query head
        ``h = kv * rep + r`` reading KV head ``kv`` (HF ``repeat_kv``).
    """
    if v.dim() != 3:
        raise CalibrationError(f"v must be [B, T, C_v] whole sequences, got shape {tuple(v.shape)}")
    v = v.detach().float()
    with torch.no_grad():
        a_fp = attend(v)
        v_q = v if as_format(v_fmt) is None else fake_quantize(v, as_format(v_fmt), Granularity("vchannel"))
        a_q = attend(v_q)
    x, x_ref = flat_tokens(a_q), flat_tokens(a_fp)
    if max_tokens is not None and x.shape[0] > max_tokens:
        rows = torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).round().long()
        x, x_ref = x[rows], x_ref[rows]
    x, weights, wf, wg, af, ag = _prepare(x, [w_o], weight_fmt, weight_gran, act_fmt, act_gran,
                                          objective, criterion)
    index = _kv_expand(v.shape[-1], x.shape[1], head_dim).to(x.device)
    stat_o = channel_statistic(x, criterion)  # [K_o], reduced over the query heads sharing a KV channel
    stat = stat_o.view(-1, index.numel() // v.shape[-1], head_dim or v.shape[-1])  # [Hkv, rep, d]
    stat = (stat.amax(1) if criterion == "max" else stat.mean(1)).reshape(-1)
    with torch.no_grad():
        objective_fn = _Objective(x, weights, wf, wg, af, ag, objective, x_ref=x_ref)
        s_v, losses = _grid_search(lambda s: objective_fn(s[index]), stat, grid)
    return (s_v, losses) if return_losses else s_v
