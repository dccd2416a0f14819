"""Does the kernels' autotuner pick the fastest config? Each config timed from HBM, then fresh autotunes (GPU).

The truth per case: every config of the autotuner's list, timed in one CUDA graph cycling weight copies (> 2x the
L2, so weights come from HBM as in a model's decode step), median, microseconds. Then the autotuner is run afresh
``TRIALS`` times with each clock, and each pick is printed with its true time:

  * ``do_bench``: ``triton.testing.do_bench`` (a memset of the L2 before each call, each call timed alone), the
    autotuners' clock until 2026-12-06;
  * ``streaming``: ``w4_linear._config_clock`` (``path_clock.streaming_time``: a read of twice the L2 before each
    call, calls replayed in a CUDA graph), the clock the dispatch ranks whole paths by, and the autotuners' since.

Cases: LLaMA shapes N x K; the GEMV (``launch_gemv``) at M = 1 and 4 and the k-split decode GEMM (``launch_ksplit``)
at M = 16, codes given. The last line sums, per clock, how much slower the picks ran than each case's best.

    python examples/bench_autotune_clock.py
    BENCH_SHAPES=4096x4096 python examples/bench_autotune_clock.py   # one shape
"""
import os
import time

os.environ.setdefault("QCOMPILE_AUTOTUNE_CACHE", "0")  # every autotune runs; none is read from disk

import torch  # noqa: E402
import triton  # noqa: E402
from gpu_timing import bench_graph, streamed_copies  # noqa: E402

from qcompile import formats as F  # noqa: E402
from qcompile.backends.triton import prepack  # noqa: E402
from qcompile.backends.triton import w4_linear as L  # noqa: E402
from qcompile.backends.triton.quantize_kernel import quantize_rows  # noqa: E402
from qcompile.backends.triton.w4_gemv_kernel import SPLITK_MIN_K, accumulator_fits  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
if os.environ.get("BENCH_SHAPES"):  # e.g. BENCH_SHAPES=4096x4096,14336x4096
    SHAPES = [tuple(int(d) for d in s.split("x")) for s in os.environ["BENCH_SHAPES"].split(",")]
TRIALS = 3


def _do_bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


CLOCKS = {"do_bench": _do_bench, "streaming": L._config_clock}


def _explicit(c) -> dict:
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _name(c) -> str:
    return ",".join(f"{k}={v}" for k, v in _explicit(c).items() if k in ("BLOCK_N", "BLOCK_W", "SPLIT_K", "S",
                                                                         "num_warps", "num_stages"))


def main():
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; GPU time per call in us, weights streamed from HBM; "
          f"{TRIALS} fresh autotunes per clock", flush=True)
    spec, gran = F.FormatSpec.parse("dint4"), F.Granularity.parse("channel")
    excess = dict.fromkeys(CLOCKS, 0.0)
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.02
        pws = streamed_copies(prepack(*F.quantize(w, spec, gran), "dint4", "channel"), n * k // 2)
        for m, path in ((1, "gemv"), (4, "gemv"), (16, "ksplit")):
            x = torch.randn(m, k, device="cuda").half()
            y = torch.empty(m, n, device="cuda", dtype=torch.half)
            q = quantize_rows(x, 8, False)
            if path == "gemv":
                tuner, launch = L._gemv_kernels[False], L.launch_gemv
                configs = [c for c in tuner.configs if accumulator_fits(c, 1 if m == 1 else 4)
                           and (c.kwargs["SPLIT_K"] == 1 or k >= SPLITK_MIN_K)]
            else:
                tuner, launch = L._ksplit_kernel, L.launch_ksplit
                configs = list(tuner.configs)
            truth = {_name(c): bench_graph(lambda p: launch(*q, p, y, config=_explicit(c)), pws) for c in configs}
            best = min(truth, key=truth.get)
            line = f"[{time.time() - t0:4.0f}s] {n}x{k} M={m} {path}: best {best} {truth[best]:.1f}"
            saved = tuner.do_bench
            try:
                for clock, fn in CLOCKS.items():
                    tuner.do_bench = fn
                    picks = []
                    for _ in range(TRIALS):
                        tuner.cache.clear()
                        launch(*q, pws[0], y)
                        torch.cuda.synchronize()
                        (picked,) = tuner.cache.values()
                        t = truth[_name(picked)]
                        excess[clock] += t - truth[best]
                        picks.append(f"{_name(picked)} {t:.1f}")
                    line += f" | {clock}: " + "; ".join(picks)
            finally:
                tuner.do_bench = saved
                tuner.cache.clear()
            print(line + " | all: " + "; ".join(f"{c} {t:.1f}" for c, t in truth.items()), flush=True)
        del pws
    print("picks slower than the best, summed over cases and trials: "
          + ", ".join(f"{clock} {us:.1f} us" for clock, us in excess.items()))


if __name__ == "__main__":
    main()
