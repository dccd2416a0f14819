"""How the dispatch times a candidate launch sequence (``w4_linear._choose_path``): with the L2 cold.

In a model's decode step a weight is read once per step from HBM: the other layers' weights have pushed it
out of the L2 (a 7B model's linears are 13 GB; the H100's L2 is 50 MB). Replaying one call on one weight,
as ``triton.testing.do_bench_cudagraph`` does, keeps a weight of up to ~50 MB in the L2 instead, and the paths
then rank by how they read the L2, not HBM. On the H100 that picked the wrong path (2026-12-06,
``BENCH_MS=2,4 BENCH_SHAPES=11008x4096 python examples/bench_w4a8_linear.py --variants``): at M = 2 the
L2-hot clock gave the per-row GEMV 10.5 us and the broadcast GEMV 11.8, streaming from HBM they took 13.9
and 12.9.

``streaming_time`` therefore replays, in one CUDA graph, ``N_CALLS`` pairs of (a read of a buffer twice the
L2's size, the call), and a graph of the reads alone; per round both are replayed and the difference per call
kept; the median over ``ROUNDS`` rounds is the call's time. The read leaves clean lines in the L2 (a memset
would leave dirty ones for the call to write back). The activations come from HBM too: at decode a few KB,
a first-touch latency every candidate pays.
"""
from __future__ import annotations

import statistics
import warnings

import torch
import triton

__all__ = ["N_CALLS", "ROUNDS", "streaming_time"]

N_CALLS = 32  # (flush, call) pairs per graph replay
ROUNDS = 7  # replays of each graph, in turn; the median difference is kept


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """float32 scratch of twice the device's L2 size (at least 8 MB). float32: torch sums it near HBM speed
    (H100: an int32 sum, accumulated in int64, ran at 0.57 TB/s)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return torch.ones(max(2 * l2, 8 * 2**20) // 4, dtype=torch.float32, device=device)


def _capture(fn, n: int, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(n):
            fn()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    graph.replay()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end)


def streaming_time(fn, device: torch.device, what: str = "w4a8 path selection") -> float:
    """Median GPU time in ms of one call of ``fn`` (launches on ``device``) with the L2 cold (module docstring);
    ``what`` names the choice being timed in the fallbacks' warnings.
    Fallbacks, each with a warning: no memory for the flush buffer (a model filling the GPU) -> the L2-hot
    graph clock; a graph that cannot be captured -> ``triton.testing.do_bench`` (it flushes the L2 before each
    call, but its time includes host launch gaps at small M)."""
    try:
        buf = _flush_buffer(device)
    except torch.OutOfMemoryError:
        warnings.warn(f"{what}: no GPU memory for the L2 flush buffer; timing with the L2 hot "
                      "instead (a choice may favour a path that reads the L2 well)", RuntimeWarning, stacklevel=3)
        buf = None
    try:
        if buf is None:
            return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
        stream = torch.cuda.Stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            fn()  # warm: lazy allocations (per-stream workspaces) happen outside the capture
            buf.sum()
            torch.cuda.synchronize(device)
            pair = _capture(lambda: (buf.sum(), fn()), N_CALLS, stream)
            alone = _capture(buf.sum, N_CALLS, stream)
            pair.replay()  # the first replay uploads the graph
            alone.replay()
            diffs = []
            for _ in range(ROUNDS):
                diffs.append((_replay_ms(pair, stream) - _replay_ms(alone, stream)) / N_CALLS)
        return max(statistics.median(diffs), 0.0)
    except Exception as e:  # noqa: BLE001  (any capture problem: say so, use the eager clock)
        warnings.warn(f"{what}: CUDA-graph timing failed ({type(e).__name__}: {e}); "
                      "timing eagerly instead", RuntimeWarning, stacklevel=3)
        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
