"""GPU timing shared by the kernel benchmarks: calls replayed in one CUDA graph, cycling weight copies."""
import statistics

import torch

__all__ = ["bench_graph"]


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
