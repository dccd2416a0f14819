"""Block-by-block calibration: statistics, scale search, OPTQ rounding, one decoder layer at a time.

For each decoder layer, on a private copy (the user's model is never changed):
  1. optional layernorm fusion (same maths as the ``fuse_layernorm`` pass);
  2. **stats**: run the calibration batches (outputs of the already-quantized layers before it) and
     collect per linear input: abs-max and abs-mean per channel, a token sample for the scale search,
     and the OPTQ Hessian ``2/n X Xᵀ``;
  3. **scale search** per producer->consumers group (SmoothQuant closed form, AWQ or AQAS grid) and
     folding into the layer copy (same maths as the ``fold_scales`` pass);
  4. **rounding**: OPTQ on the scaled weights with the scaled Hessian ``H / (s sᵀ)``, or weight
     clipping search + RTN, or plain RTN later in the graph;
  5. **propagate**: fake-quantize the layer and run it, giving the next layer's inputs.
Only the current layer and the hidden states live on the compute device.

The result holds everything the graph passes need: scales (``fold_scales``), codes
(``quantize_weights``), activation statistics (``keep_salient_fp16``), timings per stage.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial

import torch

from qcompile import formats as F
from qcompile.architectures import architecture_of
from qcompile.calibration.fake_quant import fake_quantize_layer
from qcompile.errors import CalibrationError
from qcompile.folding import expand_kv_scales, fuse_norm_into_linear, scale_columns, scale_rows

__all__ = ["CalibrationResult", "calibrate", "calibration_batches", "needs_calibration"]


@dataclass
class CalibrationResult:
    """What calibration decided, keyed by full HF module names."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)   # producer -> s (producer out channels)
    weights: dict[str, tuple] = field(default_factory=dict)         # linear -> (codes, scale, zp)
    act_stats: dict[str, dict] = field(default_factory=dict)        # linear -> {"absmax", "absmean"} [K]
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    n_samples: int = 0
    seq_len: int = 0
    notes: list[str] = field(default_factory=list)


def needs_calibration(recipe) -> bool:
    return recipe.scaling != "none" or recipe.rounding == "optq" or recipe.fp16_ratio > 0 or recipe.clip_search


def calibration_batches(data, tokenizer=None, n_samples: int = 128, seq_len: int = 2048, seed: int = 0):
    """Token windows ``[n, seq_len]`` for calibration from text(s) or a token-id tensor.

    Windows start at random offsets (seeded) of the tokenized text; a text shorter than one window
    is an error. With fewer tokens than ``n_samples * seq_len`` windows overlap.
    """
    if isinstance(data, torch.Tensor):
        ids = data.reshape(-1).long()
    else:
        if tokenizer is None:
            raise CalibrationError("calibration text needs a tokenizer (pass tokenizer=...)")
        text = data if isinstance(data, str) else "\n\n".join(data)
        if not text.strip():
            raise CalibrationError("calibration text is empty")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len:
        raise CalibrationError(f"calibration data has {ids.numel()} tokens, fewer than one window of "
                               f"calib_seq_len={seq_len}; give more text or lower calib_seq_len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


class _Stop(Exception):
    pass


def _layer_inputs(model, layers, batches, micro_batch, device):
    """Run the model up to layer 0 and keep, per micro-batch, its hidden states and call kwargs."""
    caught = []

    def hook(_mod, args, kwargs):
        caught.append((args, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(batches), micro_batch):
            try:
                model(input_ids=batches[i:i + micro_batch].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    out = []
    for args, kwargs in caught:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        out.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}, args[1:]))
    return out


class _Stats:
    """Per-linear input statistics, accumulated over calibration batches.

    The Hessian is a weighted running mean ``2 sum_t w_t x_t x_tᵀ / sum_t w_t`` with ``w_t = sink_weight``
    at position 0 of each ``[B, T, K]`` input (the attention sink, see ``Recipe.sink_weight``), else 1;
    ``hn`` is the weight total (what a data-parallel reduction averages by), ``n`` the token count.
    """

    def __init__(self, k, want_hessian, sample_per_batch, gen, device=None, dtype=torch.float32,
                 sink_weight: float = 1.0, keep_first: bool = False):
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.absmax = torch.zeros(k, device=self.device)
        self.abssum = torch.zeros(k, dtype=dtype, device=self.device)  # sums (and H) in ``dtype``
        self.n = 0
        self.hn = 0.0
        self.hessian = torch.zeros(k, k, dtype=dtype, device=self.device) if want_hessian else None
        self.sink_weight = float(sink_weight)
        self.keep_first = keep_first  # every window's first token joins the sample (Recipe.search_sinks)
        self.samples = []
        self.sample_per_batch = sample_per_batch
        self.gen = gen

    def add(self, x):
        x = x.detach()
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).float().to(self.device)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        xa = x.to(self.abssum.dtype)
        self.abssum += xa.abs().sum(0)
        n = x.shape[0]
        if self.hessian is not None:
            if self.sink_weight != 1.0 and len(lead) >= 2 and lead[-1] > 1:
                w = torch.ones(lead, dtype=xa.dtype, device=self.device)
                w[..., 0] = self.sink_weight
                w = w.reshape(-1)
                total, xw = float(w.sum()), xa * w[:, None]
            else:
                total, xw = float(n), xa
            # running weighted mean of 2 X Xᵀ (OPTQ eq. 3)
            self.hessian.mul_(self.hn / (self.hn + total)).add_(xw.T @ xa, alpha=2.0 / (self.hn + total))
            self.hn += total
        self.n += n
        take = torch.randperm(n, generator=self.gen)[: self.sample_per_batch]
        if self.keep_first and len(lead) >= 2 and lead[-1] > 1:
            first = torch.arange(0, n, lead[-1])
            take = torch.cat([first, take[take % lead[-1] != 0]])
        self.samples.append(x[take])

    def rescale(self, sc: torch.Tensor) -> None:
        """The input became ``x / sc`` (a folded scale): update every statistic to match."""
        self.absmax, self.abssum = self.absmax / sc, self.abssum / sc
        self.samples = [x / sc for x in self.samples]
        if self.hessian is not None:
            self.hessian = self.hessian / (sc[:, None] * sc[None, :])

    def copy(self) -> _Stats:
        """An independent copy (own tensors): the statistics of another linear reading the same input."""
        out = _Stats.__new__(_Stats)
        out.__dict__.update(self.__dict__)
        out.absmax, out.abssum = self.absmax.clone(), self.abssum.clone()
        out.hessian = None if self.hessian is None else self.hessian.clone()
        out.samples = list(self.samples)
        return out

    @property
    def absmean(self):
        return self.abssum / max(self.n, 1)

    def sample(self):
        return torch.cat(self.samples)


def _collect(layer, arch, inputs, recipe, max_search_tokens, seed, placement=None):
    first, total = (0, len(inputs)) if placement is None else placement.batch_position(len(inputs))
    gen = torch.Generator()
    per_batch = max(1, -(-max_search_tokens // max(total, 1)))
    want_h = recipe.rounding == "optq" or recipe.clip_search
    # statistics live where the placement says, else with the block's weights (CPU or one GPU)
    dev = None if placement is None else placement.stats_device
    where = {"device": dev if dev is not None else next(layer.parameters()).device}
    if placement is not None:
        where["dtype"] = placement.stats_dtype
    # linears of one group read the same input (q/k/v, gate/up): accumulate once, copy afterwards
    shared, handles = {}, []
    for g in arch.groups:
        lin = layer.get_submodule(g.consumers[0])
        shared[g.consumers[0]] = st = _Stats(lin.in_features, want_h, per_batch, gen,
                                             sink_weight=recipe.sink_weight, keep_first=recipe.search_sinks,
                                             **where)
        handles.append(lin.register_forward_pre_hook(lambda m, a, st=st: st.add(a[0])))
    try:
        with torch.no_grad():
            for j, (hidden, kwargs, extra) in enumerate(inputs):
                # seeded by the global micro-batch index: any data-parallel shard draws the same rows
                gen.manual_seed((seed * 1_000_003 + first + j) % 2**63)
                layer(hidden, *extra, **kwargs)
    finally:
        for h in handles:
            h.remove()
    owner = _input_owner(arch)
    return {name: shared[name] if name in shared else shared[owner[name]].copy() for name in arch.linears}


def _input_owner(arch) -> dict[str, str]:
    """Linear name -> the first linear of its group (the one whose input statistics it shares)."""
    return {c: g.consumers[0] for g in arch.groups for c in g.consumers}


def _fuse_norms(layer, arch):
    for g in arch.groups:
        if g.kind != "norm":
            continue
        norm = layer.get_submodule(g.producer)
        gamma = norm.weight.detach().clone()
        beta = norm.bias.detach().clone() if getattr(norm, "bias", None) is not None else None
        for c in g.consumers:
            lin = layer.get_submodule(c)
            w, b = fuse_norm_into_linear(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(),
                                         gamma, beta)
            lin.weight.data = w
            if b is not None:
                lin.bias = torch.nn.Parameter(b) if lin.bias is None else lin.bias
                lin.bias.data = b
        norm.weight.data = torch.ones_like(gamma)
        if beta is not None:
            norm.bias.data = torch.zeros_like(beta)


def _fold(layer, group, s, head_dim):
    for c in group.consumers:
        lin = layer.get_submodule(c)
        lin.weight.data = scale_columns(lin.weight.detach(), expand_kv_scales(s, lin.in_features, head_dim))
    prod = layer.get_submodule(group.producer)
    w, b = scale_rows(prod.weight.detach(), None if getattr(prod, "bias", None) is None else prod.bias.detach(), s)
    prod.weight.data = w
    if b is not None:
        prod.bias.data = b


def _search_group(layer, group, stats, recipe, head_dim):
    """The scale ``s`` on the producer's output channels for one group, or None to leave it."""
    from qcompile.calibration import scale_search, smoothquant

    ws = [layer.get_submodule(c).weight.detach().float() for c in group.consumers]
    st = stats[group.consumers[0]]
    n_out = layer.get_submodule(group.producer).weight.shape[0]
    k_in = ws[0].shape[1]
    # GQA v->o: o_proj reads each KV channel n_rep times, so one scale per KV channel, shared by the
    # query heads that read it: search with the statistic pooled over those heads and expanded back.
    pooled = None
    if k_in != n_out:
        n_rep = k_in // n_out
        def pool(v):
            return v.view(n_out // head_dim, n_rep, head_dim).amax(1).reshape(-1)
        def expand(v):
            return expand_kv_scales(v, k_in, head_dim)
        pooled = (pool, expand)
    if recipe.scaling == "smoothquant":
        if pooled is None:
            return smoothquant.smoothquant_scales(st.absmax, ws, recipe.alpha)
        # column abs-max of each weight, pooled like the activations, as a one-row weight
        w_cols = [pooled[0](w.abs().amax(0))[None, :] for w in ws]
        return smoothquant.smoothquant_scales(pooled[0](st.absmax), w_cols, recipe.alpha)
    from qcompile.calibration.scale_search import channel_statistic
    x = st.sample()
    x_stat = None
    if pooled is not None:
        x_stat = pooled[1](pooled[0](channel_statistic(x, recipe.scale_criterion)))
    act = recipe.act_spec if recipe.scaling == "aqas" else None
    s = scale_search.search_scales(x, ws, recipe.weight_spec, recipe.weight_gran, act, recipe.act_gran,
                                   objective=recipe.scaling, criterion=recipe.scale_criterion,
                                   grid=recipe.scale_grid, x_stat=x_stat)
    if pooled is not None:
        s = s.view(n_out // head_dim, k_in // n_out, head_dim)[:, 0].reshape(-1)
    return s


def calibrate(model, recipe, batches: torch.Tensor, progress: bool = True, device=None, micro_batch: int = 8,
              max_search_tokens: int | None = None, placement=None) -> CalibrationResult:
    """Calibrate ``model`` for ``recipe`` on token windows ``batches [n, T]``, block by block.

    ``placement`` (``qcompile.calibration.offload.Placement`` and subclasses) decides where weights,
    activations and statistics live and how decisions are shared: ``Offload`` (weights on CPU, one
    block on the GPU), ``qcompile.calibration.distributed.DataParallel`` (torch.distributed).
    """
    from tqdm.auto import tqdm

    from qcompile.calibration.offload import Placement
    from qcompile.passes.keep_salient_fp16 import salient_channels

    hooks = placement if placement is not None else Placement()
    if max_search_tokens is None:  # tokens kept per linear for the scale and clip searches
        max_search_tokens = recipe.calib_search_tokens

    cfg = model.config
    arch = architecture_of(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    device = hooks.compute_device(model, device)
    res = CalibrationResult(n_samples=len(batches), seq_len=batches.shape[1])
    layers = model.get_submodule(arch.layers)
    t0 = time.perf_counter()
    with torch.no_grad():
        inputs = hooks.layer_inputs(model, layers, batches, micro_batch, device)
    res.seconds["embed"] += time.perf_counter() - t0
    bar = tqdm(range(len(layers)), desc=f"calibrate {recipe.name}", disable=not (progress and hooks.is_main),
               unit="layer")
    for i in bar:
        prefix = f"{arch.layers}.{i}"
        t = time.perf_counter()
        layer = hooks.load_layer(layers[i], device)
        res.seconds["load"] += time.perf_counter() - t
        if recipe.fuse_layernorm:
            _fuse_norms(layer, arch)
        t = time.perf_counter()
        stats = _collect(layer, arch, inputs, recipe, max_search_tokens, recipe.seed + i, hooks)
        stats = hooks.reduce_stats(stats)  # data-parallel: all-reduced over ranks
        res.seconds["stats"] += time.perf_counter() - t
        t = time.perf_counter()
        if recipe.scaling != "none":
            for g in arch.groups:
                s = hooks.decide(partial(_search_group, layer, g, stats, recipe, head_dim)).float()
                _fold(layer, g, s, head_dim)
                res.scales[f"{prefix}.{g.producer}"] = hooks.keep(s)
                for c in g.consumers:
                    stats[c].rescale(expand_kv_scales(s, stats[c].absmax.numel(), head_dim))
        res.seconds["scale_search"] += time.perf_counter() - t
        t = time.perf_counter()
        codes, salient = hooks.round_layer(
            partial(_round_layer, layer, arch, stats, recipe, prefix, salient_channels), layer, arch.linears)
        res.seconds["rounding"] += time.perf_counter() - t
        for name, st in stats.items():
            res.act_stats[f"{prefix}.{name}"] = hooks.keep({"absmax": st.absmax, "absmean": st.absmean})
        res.weights.update({f"{prefix}.{k}": hooks.keep(v) for k, v in codes.items()})
        t = time.perf_counter()
        fake_quantize_layer(layer, arch, recipe, codes, salient, prefix=prefix)
        with torch.no_grad():
            inputs = hooks.propagate(layer, inputs)
        res.seconds["propagate"] += time.perf_counter() - t
        del layer
    return res


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _round_layer(layer, arch, stats, recipe, prefix, salient_channels, names=None):
    """OPTQ or clipped-RTN codes per linear (relative names; ``names``: only those), and salient splits.

    Linears that read one input (q/k/v, gate/up) have the same Hessian, and both clipping and OPTQ treat
    weight rows independently given it: their weights are stacked and rounded in one call (same codes
    as one call each, fewer column steps).
    """
    from qcompile.passes.runner import in_scope

    codes, salient = {}, {}
    fmt, gran = recipe.weight_spec, recipe.weight_gran
    todo = []
    for name in arch.linears if names is None else names:
        if not in_scope(f"{prefix}.{name}", recipe):
            continue
        if recipe.fp16_ratio > 0:
            salient[name] = salient_channels(stats[name].absmean, recipe.fp16_ratio)
            continue  # salient layers: RTN on the rest, done in fake_quantize_layer and the graph pass
        if fmt is not None and (recipe.rounding == "optq" or recipe.clip_search):
            todo.append(name)
    owner, batches = _input_owner(arch), {}
    for name in todo:  # linears sharing one input's statistics are rounded together
        batches.setdefault(owner.get(name, name), []).append(name)
    for batch in batches.values():
        st = stats[batch[0]]
        ws = [layer.get_submodule(n).weight.detach().float() for n in batch]
        w = torch.cat(ws)
        ratios = None
        if recipe.clip_search:  # per-block range shrink, judged on the block's output error
            from qcompile.calibration.clip_search import clip_search
            clipped, ratios = clip_search(w, st.sample(), fmt, gran, return_ratios=True, hessian=st.hessian)
        if recipe.rounding == "optq":  # OPTQ on the unclipped weights, on the clipped grid
            from qcompile.calibration.optq import optq_quantize
            kw = dict(damp=recipe.optq_damp, block_size=recipe.optq_block_size, act_order=recipe.optq_act_order)
            out = optq_quantize(w, st.hessian, fmt, gran, clip_ratios=ratios, **kw)
            if recipe.optq_refit_scale and gran.kind == "channel":  # closed-form scale for OPTQ's codes
                from qcompile.calibration.scale_refit import optq_refit
                out = optq_refit(w, st.hessian, fmt, gran, out, recipe.optq_refit_rounds, **kw)
        else:
            out = F.quantize(clipped, fmt, gran)
        rows = [x.shape[0] for x in ws]
        for n, c, sc, zp in zip(batch, *(torch.split(t, rows) for t in out)):
            codes[n] = (c.contiguous(), sc.contiguous(), zp.contiguous())
    return codes, salient
