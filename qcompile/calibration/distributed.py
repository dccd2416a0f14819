"""Data-parallel calibration on torch.distributed (NCCL on GPUs, gloo on CPU).

    torchrun --nproc-per-node 4 -m qcompile quantize --model ... --device cuda

Every rank builds the same calibration windows and takes a contiguous shard of the micro-batches;
block by block it runs its shard, then

  * **statistics** are all-reduced: abs-max (MAX), abs-sum and token count (SUM), the OPTQ Hessian
    as ``sum_r n_r H_r / sum_r n_r`` (each rank's ``H_r`` is a running mean over its ``n_r`` tokens),
    and the scale-search token samples are all-gathered in rank order;
  * each **scale search** runs once, on rank 0, and its ``s`` is broadcast;
  * each linear's **rounding** (OPTQ) runs once, on one rank (longest-first over the ranks, by input
    width), and its codes are broadcast from there;
  * every rank folds the same scales, fake-quantizes with the same codes and propagates its shard.

Equality with one process. The micro-batches are the single-process run's (a shard is whole
micro-batches), the search-sample rows are drawn from a generator seeded by each micro-batch's global
index, and the sample concatenates in the same order, so only the order of the float sums differs.
Accumulated in float64 (``Offload`` and ``DataParallel``'s CPU default) and then cast to float32,
the reduced abs-sums and Hessians differ from the one-process float64 values by ~1e-16 relative,
i.e. they round to the same float32 except with probability ~1e-9 per element: in practice the
scales, codes and statistics are bit-identical to a one-process run with the same placement
(``tests/calibration/test_distributed.py`` checks it, 2 gloo processes against 1). With float32
accumulators the reduced Hessians differ by float32 summation-order error (~1e-6 relative), and
an OPTQ code can then differ where a weight sits on a rounding boundary.

NVLink multicast stays off (``NO_MULTICAST``); no multicast or symmetric-memory call is made.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves, tree_map

from qcompile.calibration.offload import Offload, Placement

__all__ = ["NO_MULTICAST", "DataParallel", "assign_owners", "broadcast_tree", "init_from_env", "shard_range"]

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def shard_range(n_items: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``n_items`` for ``rank`` (sizes differ by at most one)."""
    return n_items * rank // world, n_items * (rank + 1) // world


def assign_owners(costs: dict[str, float], world: int) -> dict[str, int]:
    """Longest-processing-time-first: each task (largest cost first) to the least loaded rank."""
    load = [0.0] * world
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], list(costs).index(n))):
        r = min(range(world), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += costs[name]
    return owners


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class _Slot:
    """Stands for one tensor in a broadcast structure (a pytree leaf)."""

    shape: tuple
    dtype: torch.dtype
    device_type: str


def broadcast_tree(obj, src: int):
    """``obj`` (nested dicts/tuples/lists of tensors and plain values) from rank ``src`` to every rank.

    The structure, with tensors replaced by their shape and dtype, travels with
    ``broadcast_object_list``; the tensors with ``dist.broadcast`` (on the GPU with NCCL), in pytree
    leaf order. A tensor arrives on the device type it had on ``src`` (CUDA: this rank's current GPU).
    On ``src`` the object itself is returned.
    """
    rank, comm = dist.get_rank(), _comm_device()
    header = [None]
    if rank == src:
        header = [tree_map(lambda x: _Slot(tuple(x.shape), x.dtype, x.device.type)
                           if isinstance(x, torch.Tensor) else x, obj)]
    dist.broadcast_object_list(header, src=src, device=comm if comm.type == "cuda" else None)
    if rank == src:
        for x in tree_leaves(obj):
            if isinstance(x, torch.Tensor):
                dist.broadcast(x.detach().contiguous().to(comm), src=src)
        return obj

    def receive(slot):
        buf = torch.empty(slot.shape, dtype=slot.dtype, device=comm)
        dist.broadcast(buf, src=src)
        return buf if slot.device_type == comm.type else buf.to(slot.device_type)

    return tree_map(lambda x: receive(x) if isinstance(x, _Slot) else x, header[0])


class DataParallel:
    """Placement hooks for data-parallel calibration over the default process group.

    Args:
        inner: where things live on each rank (default: ``Offload()`` with NCCL, else
            ``Placement(stats_dtype=torch.float64)``).
    """

    def __init__(self, inner: Placement | None = None):
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs torch.distributed initialised (see init_from_env)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        if inner is None:
            inner = Offload() if self.backend == "nccl" else Placement(stats_dtype=torch.float64)
        self.inner = inner
        self.first, self.total = 0, None

    # -- delegated ---------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def stats_device(self):
        return self.inner.stats_device

    @property
    def stats_dtype(self):
        return self.inner.stats_dtype

    def compute_device(self, model, device) -> torch.device:
        # one GPU per rank: with NCCL, "cuda" (or nothing) means this rank's GPU
        if self.backend == "nccl" and (device is None or torch.device(device).type == "cuda"):
            device = torch.device("cuda", torch.cuda.current_device())
        return self.inner.compute_device(model, device)

    def load_layer(self, layer, device):
        return self.inner.load_layer(layer, device)

    def propagate(self, layer, inputs):
        return self.inner.propagate(layer, inputs)

    def keep(self, obj):
        return self.inner.keep(obj)

    # -- sharding ------------------------------------------------------------------------------------
    def layer_inputs(self, model, layers, batches, micro_batch: int, device):
        """Block 0's inputs for this rank's contiguous shard of whole micro-batches."""
        n_mb = -(-len(batches) // micro_batch)
        start, stop = shard_range(n_mb, self.rank, self.world)
        self.first, self.total = start, n_mb
        mine = batches[start * micro_batch: stop * micro_batch]
        return self.inner.layer_inputs(model, layers, mine, micro_batch, device)

    def batch_position(self, n_local: int) -> tuple[int, int]:
        return self.first, self.total if self.total is not None else n_local

    # -- reductions ------------------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        comm = _comm_device()
        buf = t.detach().contiguous().to(comm)  # reduced in place: the caller replaces ``t`` anyway
        dist.all_reduce(buf, op=op)
        return buf.to(t.device)

    def _all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x [r_i, K]`` of every rank in rank order (rows may differ per rank)."""
        comm = _comm_device()
        rows = torch.tensor([x.shape[0]], device=comm)
        counts = [torch.zeros_like(rows) for _ in range(self.world)]
        dist.all_gather(counts, rows)
        counts = [int(c) for c in counts]
        top = max(counts)
        buf = torch.zeros(top, *x.shape[1:], dtype=x.dtype, device=comm)
        buf[: x.shape[0]] = x
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)

    def reduce_stats(self, stats: dict) -> dict:
        """All-reduce every linear's statistics (module docstring), then the inner placement's finish."""
        for st in stats.values():
            n_local = st.n
            st.n = int(self._all_reduce(torch.tensor([n_local], dtype=torch.float64), dist.ReduceOp.SUM))
            st.absmax = self._all_reduce(st.absmax, dist.ReduceOp.MAX)
            st.abssum = self._all_reduce(st.abssum, dist.ReduceOp.SUM)
            if st.hessian is not None:  # running means -> weighted mean (weights: tokens, sinks count more)
                hn_local = st.hn
                st.hn = float(self._all_reduce(torch.tensor([hn_local], dtype=torch.float64), dist.ReduceOp.SUM))
                h = self._all_reduce(st.hessian * hn_local, dist.ReduceOp.SUM)
                st.hessian = h / st.hn if st.hn else h
            local = torch.cat(st.samples) if st.samples else st.absmax.new_zeros(0, st.absmax.numel())
            st.samples = [self._all_gather_rows(local)]
        return self.inner.reduce_stats(stats)

    # -- decisions -------------------------------------------------------------------------------------
    def decide(self, fn):
        """Run ``fn`` on rank 0 only; every rank gets its result."""
        out = self.inner.decide(fn) if self.rank == 0 else None
        return broadcast_tree(out, src=0)

    def round_layer(self, fn, layer, names):
        """Each linear rounded once, on its owner rank (longest first), then broadcast from there."""
        names = list(names)
        owners = assign_owners({n: float(layer.get_submodule(n).in_features) for n in names}, self.world)
        mine = [n for n in names if owners[n] == self.rank]
        codes, salient = self.inner.round_layer(fn, layer, mine) if mine else ({}, {})
        all_codes, all_salient = {}, {}
        for n in names:
            local = (codes.get(n), salient.get(n)) if owners[n] == self.rank else None
            c, s = broadcast_tree(local, src=owners[n])
            if c is not None:
                all_codes[n] = c
            if s is not None:
                all_salient[n] = s
        return all_codes, all_salient


def init_from_env(inner: Placement | None = None) -> DataParallel | None:
    """Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set): initialise the process group and return
    ``DataParallel`` hooks for ``calibrate(..., placement=...)``; otherwise ``None``.

    NCCL when CUDA is available (rank ``LOCAL_RANK`` takes GPU ``LOCAL_RANK``), gloo otherwise. NVLink
    multicast is switched off first (``NO_MULTICAST``; values already set are kept).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return DataParallel(inner)
