"""backends/triton/path_clock.py: the dispatch's clock reads a weight from HBM, not from the L2 (GPU only).

The check is physical, calibrated on the device itself: an elementwise pass over tensors that fit in the L2
cannot move bytes faster than HBM does under this clock. The L2-hot clock it replaced
(``triton.testing.do_bench_cudagraph`` on the same tensors) is faster than HBM on that pass, which the test
also asserts, so a clock that stopped flushing fails it.
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: not compiled"),
]
triton = pytest.importorskip("triton")

from qcompile.backends.triton import path_clock  # noqa: E402


def _pass(n_floats: int):
    """``dst = -src`` over ``n_floats`` float32 each, and the bytes it moves."""
    src = torch.ones(n_floats, device="cuda")
    dst = torch.empty_like(src)
    return (lambda: torch.neg(src, out=dst)), 8 * n_floats


def test_streaming_clock_reads_from_hbm():
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    # HBM's rate for this pass, measured on tensors of 4x the L2 each (the L2 cannot hold them)
    fn, nbytes = _pass(l2)
    hbm = nbytes / triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    fn, nbytes = _pass(l2 // 16)  # half the L2 in all
    hot = nbytes / triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    cold = nbytes / path_clock.streaming_time(fn, dev)
    print(f"HBM {hbm / 1e9:.2f} TB/s; an L2-resident pass: L2-hot clock {hot / 1e9:.2f} TB/s, "
          f"streaming clock {cold / 1e9:.2f} TB/s")
    assert hot > 1.2 * hbm  # the test can tell the clocks apart on this device
    assert cold < 1.05 * hbm
