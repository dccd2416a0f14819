"""Where block-by-block calibration keeps things: ``Placement`` hooks, and ``Offload`` for big models.

``qcompile.calibration.engine.calibrate`` asks its placement, for every decoder block, to

  * ``layer_inputs``  run the model up to block 0 and hold the calibration hidden states;
  * ``load_layer``    make the private copy of block ``i`` on the compute device;
  * ``reduce_stats``  finish the per-linear statistics (``DataParallel`` all-reduces them here);
  * ``decide``        run one scale search (``DataParallel``: once, on rank 0, then broadcast);
  * ``round_layer``   round the block's linears (``DataParallel``: each linear once, on one rank);
  * ``keep``          place what the result keeps of each block (``Offload``: CPU memory);
  * ``propagate``     run the quantized block, giving the next block's inputs.

``Placement()`` is the engine's original behaviour: hidden states and the block on the compute device,
statistics on the CPU in float32. ``Offload`` is for models larger than the GPU: the model's weights
stay where they are (CPU memory; ``load_model`` memory-maps safetensors), only the current block and
its activations are on the GPU, statistics and OPTQ Hessians are accumulated on the GPU in float64
(fast there; exact enough that a data-parallel run gives the same float32 values, see
``qcompile.calibration.distributed``), and with ``spill=True`` the hidden states between blocks
live in pinned CPU memory and stream through the GPU one micro-batch at a time.

Peak GPU memory of a run is ``Offload.peak_bytes`` (also appended to ``CalibrationResult.notes`` by
``calibrate_offloaded``). Stage timers are exact on CUDA: every hook synchronizes before it returns.
"""
from __future__ import annotations

import copy
import itertools
import time

import torch
from torch.utils._pytree import tree_map

__all__ = ["Offload", "Placement", "calibrate_offloaded", "copy_module_to"]


def _to(obj, device, non_blocking: bool = False):
    """``obj`` (nested tuples/lists/dicts) with every tensor moved to ``device``."""
    return tree_map(lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t, obj)


def copy_module_to(module: torch.nn.Module, device) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on ``device``.

    The copy is made on the meta device and filled tensor by tensor, so the module's weights are read
    once and never duplicated in host memory (``copy.deepcopy(m).to(device)`` copies them twice).
    """
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    memo = {}
    for t in tensors:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(
            t, torch.nn.Parameter) else meta
    clone = copy.deepcopy(module, memo)
    clone.to_empty(device=device)
    with torch.no_grad():
        for dst, src in zip(itertools.chain(clone.parameters(), clone.buffers()), tensors):
            dst.copy_(src)
    return clone


class Placement:
    """The engine's default placement (see module docstring).

    Args:
        stats_device: where per-linear statistics and Hessians accumulate (None: CPU).
        stats_dtype: their accumulation dtype; float64 sums are cast to float32 in ``reduce_stats``,
            so what the search and OPTQ see is float32 either way.
    """

    is_main = True

    def __init__(self, stats_device=None, stats_dtype: torch.dtype = torch.float32):
        self.stats_device = None if stats_device is None else torch.device(stats_device)
        self.stats_dtype = stats_dtype
        self.device = torch.device("cpu")

    # -- where ---------------------------------------------------------------------------------
    def compute_device(self, model, device) -> torch.device:
        """The device blocks run on: ``device``, else the model's."""
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        return self.device

    def layer_inputs(self, model, layers, batches, micro_batch: int, device) -> list:
        """Per micro-batch ``(hidden [b, T, C], kwargs, extra args)`` of block 0, on ``device``."""
        from qcompile.calibration.engine import _layer_inputs
        return _layer_inputs(model, layers, batches, micro_batch, device)

    def batch_position(self, n_local: int) -> tuple[int, int]:
        """``(global index of this process's first micro-batch, micro-batches in all processes)``."""
        return 0, n_local

    def load_layer(self, layer: torch.nn.Module, device) -> torch.nn.Module:
        """The private copy of one block on ``device`` (the user's model is never changed)."""
        out = copy.deepcopy(layer).to(device)
        self.synchronize()
        return out

    # -- what is shared -------------------------------------------------------------------------
    def reduce_stats(self, stats: dict) -> dict:
        """Finish the statistics of one block: float64 accumulators become float32."""
        for st in stats.values():
            st.abssum = st.abssum.float()
            if st.hessian is not None:
                st.hessian = st.hessian.float()
        self.synchronize()
        return stats

    def decide(self, fn):
        """Run one decision (a scale search) here."""
        out = fn()
        self.synchronize()
        return out

    def round_layer(self, fn, layer, names):
        """``fn(names) -> (codes, salient)`` for the block's linears."""
        out = fn(list(names))
        self.synchronize()
        return out

    def keep(self, obj):
        """What the ``CalibrationResult`` keeps of a block (scales, codes, statistics): here, as is."""
        return obj

    def propagate(self, layer, inputs):
        """The quantized block's outputs, in the place of its inputs."""
        from qcompile.calibration.engine import _first
        out = [(_first(layer(h, *extra, **kw)), kw, extra) for h, kw, extra in inputs]
        self.synchronize()
        return out

    def synchronize(self) -> None:
        """Wait for queued GPU work, so the engine's stage timers measure their own stage."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _Spilled(list):
    """Micro-batches ``(cpu hidden, kwargs on device, extra)``; iterating yields hidden on ``device``."""

    def __init__(self, items, device):
        super().__init__(items)
        self.device = device

    def __iter__(self):
        for hidden, kwargs, extra in list.__iter__(self):
            yield hidden.to(self.device, non_blocking=True), kwargs, extra

    def stored(self):
        return list.__iter__(self)


class Offload(Placement):
    """Weights stay on the CPU; one block, its activations and its statistics on the GPU.

    Args:
        spill: keep the hidden states between blocks in (pinned) CPU memory, one micro-batch on the
            GPU at a time, instead of all of them on the GPU (saves ``2 x n x T x C`` activations).
        stats_dtype: accumulation dtype of abs-sums and Hessians (float64 by default; see module doc).
    """

    def __init__(self, spill: bool = False, stats_dtype: torch.dtype = torch.float64):
        super().__init__(None, stats_dtype)
        self.spill = spill
        self.peak_bytes = 0
        self.block_seconds: list[float] = []  # wall time of each block, load to propagate
        self.block_stages: list[dict] = []    # per block: seconds of load / stats / search / rounding / propagate
        self._mark = None
        self._t: dict[str, float] = {}

    def compute_device(self, model, device) -> torch.device:
        dev = super().compute_device(model, device)
        self.stats_device = dev
        return dev

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.to("cpu")
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t)

    def layer_inputs(self, model, layers, batches, micro_batch: int, device) -> list:
        """Run the embedding where the model's weights are (no weight moves), then move activations."""
        from qcompile.calibration.engine import _layer_inputs
        home = next(model.parameters()).device
        caught = _layer_inputs(model, layers, batches, micro_batch, home)
        if not self.spill:
            out = [(_to(h, device), _to(kw, device), _to(ex, device)) for h, kw, ex in caught]
        else:
            out = _Spilled([(self._host(h), _to(kw, device), _to(ex, device)) for h, kw, ex in caught], device)
        self.synchronize()
        self._note_peak()
        self._mark = time.perf_counter()
        return out

    def load_layer(self, layer, device):
        t = time.perf_counter()
        out = copy_module_to(layer, device)
        self.synchronize()
        self._t = {"start": t, "load": time.perf_counter()}
        return out

    def reduce_stats(self, stats):
        out = super().reduce_stats(stats)
        self._t["stats"] = time.perf_counter()
        return out

    def round_layer(self, fn, layer, names):
        self._t["search"] = time.perf_counter()
        out = super().round_layer(fn, layer, names)
        self._t["rounding"] = time.perf_counter()
        return out

    def keep(self, obj):
        """Results go to CPU memory: a block's codes must not stay on the GPU (7B: 0.19 GiB a block)."""
        return _to(obj, "cpu")

    def propagate(self, layer, inputs):
        if not isinstance(inputs, _Spilled):
            out = super().propagate(layer, inputs)
        else:
            from qcompile.calibration.engine import _first
            for hidden, kwargs, extra in inputs.stored():  # overwrite each micro-batch in place
                y = _first(layer(hidden.to(self.device, non_blocking=True), *extra, **kwargs))
                hidden.copy_(y)
            out = inputs
            self.synchronize()
        self._note_peak()  # the end of a block: its weights, stats and activations are all still held
        now = time.perf_counter()
        self.block_seconds.append(now - self._mark)
        self._mark = now
        self._t["propagate"] = now
        marks = ["start", "load", "stats", "search", "rounding", "propagate"]  # each: the end of that stage
        if all(m in self._t for m in marks):  # stage walls of this block (engine's "scale_search" = search)
            self.block_stages.append({b: self._t[b] - self._t[a] for a, b in itertools.pairwise(marks)})
        return out

    def _note_peak(self) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))


def calibrate_offloaded(model, recipe, batches, device="cuda", spill: bool = False, progress: bool = True,
                        micro_batch: int = 8, max_search_tokens: int = 4096):
    """``calibrate`` with ``Offload``: weights on the CPU, one block on ``device``; peak memory noted.

    Returns:
        ``(CalibrationResult, placement)``; ``placement.peak_bytes`` is the peak GPU memory allocated
        during calibration (0 on CPU).
    """
    from qcompile.calibration.engine import calibrate

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    placement = Offload(spill=spill)
    res = calibrate(model, recipe, batches, progress=progress, device=device, micro_batch=micro_batch,
                    max_search_tokens=max_search_tokens, placement=placement)
    if device.type == "cuda":
        res.notes.append(f"peak GPU memory {placement.peak_bytes / 2**30:.2f} GiB (offloaded, spill={spill})")
    return res, placement
