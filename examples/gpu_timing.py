"""GPU timing shared by the kernel benchmarks: calls replayed in one CUDA graph, cycling weight copies.

Every script that imports it needs a CUDA GPU: without one, importing it stops the script with a message that says so
(instead of a traceback from deep inside ``torch.cuda``)."""
import statistics
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"{sys.argv[0]}: this benchmark times Triton kernels and needs a CUDA GPU; torch {torch.__version__} "
             "sees none here (the CPU tests are `bash tests/run.sh`)")

from qcompile.backends.triton import PackedWeight

__all__ = ["bench_graph", "clones", "streamed_copies"]


def clones(t, n: int) -> list:
    """``t`` (a tensor or a ``PackedWeight``) plus ``n - 1`` copies of it, for timing weights out of L2."""
    if isinstance(t, PackedWeight):
        def clone():
            return PackedWeight(t.qweight.clone(), t.unit_scale.clone(), t.code_sum.clone(), t.zero_byte.clone(),
                                t.fmt, t.group_size, t.in_features, t.out_features, t.pack_k)
    else:
        clone = t.clone
    return [t] + [clone() for _ in range(n - 1)]


def streamed_copies(t, nbytes: int) -> list:
    """``t`` plus clones, enough that cycling through them streams > 2x the L2 per graph pass (at most 16)."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return clones(t, min(16, max(1, -(-2 * l2 // nbytes))))


def bench_graph(fn, weights, reps: int = 4) -> float:
    """GPU time: median microseconds per call of ``fn(w)`` over ``weights`` (copies), in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles, autotunes, picks the path
        for w in weights:
            fn(w)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for w in weights:
                fn(w)
    graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(weights)))
    del graph
    return statistics.median(times)
