"""How fast an L2-resident pass looks under the dispatch's clock (``path_clock.streaming_time``) and under the
L2-hot clock it replaced (``triton.testing.do_bench_cudagraph`` on the same tensors), against HBM's rate for
the same pass on tensors 4x the L2 each (GPU only). ``tests/backends/triton/test_path_clock.py`` asserts the
same for ``neg`` at half the L2. Prints rates in TB/s, then the flush's own time.

    python examples/path_clock_probe.py
"""
from __future__ import annotations

import torch
import triton

from qcompile.backends.triton import path_clock


def probes(n: int, dev: torch.device) -> dict:
    """Three passes over ``n`` float32: name -> (call, bytes moved)."""
    a = torch.ones(n, device=dev)
    b = torch.empty_like(a)
    return {"sum": (a.sum, 4 * n), "neg": (lambda: torch.neg(a, out=b), 8 * n), "copy": (lambda: b.copy_(a), 8 * n)}


def hot_ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def main() -> None:
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    print(f"{torch.cuda.get_device_name(dev)}; L2 {l2 / 2**20:.0f} MiB")
    hbm = {name: nbytes / hot_ms(fn) / 1e9 for name, (fn, nbytes) in probes(l2, dev).items()}
    for frac in (32, 16, 8):
        for name, (fn, nbytes) in probes(l2 // frac, dev).items():
            hot = nbytes / hot_ms(fn) / 1e9
            cold = nbytes / path_clock.streaming_time(fn, dev) / 1e9
            print(f"{name:5s} {nbytes / 2**20:6.1f} MiB: HBM {hbm[name]:.2f} TB/s, L2-hot clock {hot:.2f}, "
                  f"streaming clock {cold:.2f}", flush=True)
    flush = torch.ones(2 * l2 // 4, device=dev)
    print(f"the flush alone (a sum over 2x the L2): {1e3 * hot_ms(flush.sum):.1f} us")


if __name__ == "__main__":
    main()
