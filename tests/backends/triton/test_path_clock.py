"""backends/triton/path_clock.py: the dispatch's clock reads a weight from HBM, not from the L2.

The GPU check is physical, calibrated on the device itself: an elementwise pass over tensors that fit in the
L2 cannot move bytes faster than HBM does under this clock. The L2-hot clock it replaced
(``triton.testing.do_bench_cudagraph`` on the same tensors) is faster than HBM on that pass, which the test
also asserts, so a clock that stopped flushing fails it. The fallbacks are checked anywhere (triton's clocks
replaced by markers).
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from qcompile.backends.triton import path_clock  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
compiled = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: not compiled")


def _pass(n_floats: int):
    """``dst = -src`` over ``n_floats`` float32 each, and the bytes it moves."""
    src = torch.ones(n_floats, device="cuda")
    dst = torch.empty_like(src)
    return (lambda: torch.neg(src, out=dst)), 8 * n_floats


@pytest.mark.gpu
@needs_cuda
@compiled
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


@pytest.fixture
def clocks(monkeypatch):
    """triton's two clocks replaced by markers (2.0: the L2-hot graph clock, 3.0: the eager one)."""
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: 2.0)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: 3.0)


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_no_memory_for_the_flush_falls_back_to_the_l2_hot_clock(clocks, monkeypatch):
    def no_memory(device):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(path_clock, "_flush_buffer", no_memory)
    with pytest.warns(RuntimeWarning, match="no GPU memory for the L2 flush buffer"):
        assert path_clock.streaming_time(lambda: None, _dev()) == 2.0


def test_a_failed_capture_falls_back_to_the_eager_clock(clocks, monkeypatch):
    def no_capture(fn, n, stream):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(path_clock, "_flush_buffer", lambda device: torch.ones(4))
    monkeypatch.setattr(path_clock, "_capture", no_capture)
    with pytest.warns(RuntimeWarning, match="CUDA-graph timing failed"):
        assert path_clock.streaming_time(lambda: None, _dev()) == 3.0


def test_the_autotuners_rank_configs_on_the_path_clock(monkeypatch):
    """Every kernel autotuner of the dispatch times its configs with ``path_clock.streaming_time`` (L2 cold, graph
    replay), as the dispatch times paths: the memset-and-time-alone clock misranked GEMV configs on the H100."""
    from qcompile.backends.triton import w4_linear

    seen = []

    def fake(fn, device, what):
        seen.append(device)
        assert what == "w4a8 kernel config choice"  # the fallbacks' warnings name what was being timed
        return 0.25

    monkeypatch.setattr(path_clock, "streaming_time", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    tuners = [w4_linear._decode_kernel, w4_linear._splitk_decode_kernel, w4_linear._fused_decode_kernel,
              w4_linear._prefill_kernel, w4_linear._ksplit_kernel, *w4_linear._gemv_kernels.values(),
              *w4_linear._gemv_group_kernels.values()]
    for tuner in tuners:
        assert tuner.do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [0.25, 0.25, 0.25]
    assert seen == [torch.device("cuda", 0)] * len(tuners)


def test_a_pdl_config_is_timed_behind_its_producer(monkeypatch):
    """Inside ``_timed_after(producer)`` the autotuners' clock times ``producer()`` then the config's launch (a
    GEMV launched as a programmatic dependent of its quantization is timed as it runs); outside, the launch alone.
    The context nests, and leaves no producer behind after an error."""
    from qcompile.backends.triton import w4_linear

    calls = []

    def fake(fn, device, what):
        fn()
        return 1.0

    monkeypatch.setattr(path_clock, "streaming_time", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    tuner = w4_linear._gemv_kernels[False]
    launch = lambda: calls.append("gemv")  # noqa: E731
    tuner.do_bench(launch, quantiles=None)
    assert calls == ["gemv"]
    calls.clear()
    with w4_linear._timed_after(lambda: calls.append("quantize")):
        tuner.do_bench(launch, quantiles=None)
        with w4_linear._timed_after(None):  # codes from elsewhere: nothing in front
            tuner.do_bench(launch, quantiles=None)
        tuner.do_bench(launch, quantiles=None)
    assert calls == ["quantize", "gemv", "gemv", "quantize", "gemv"]
    with pytest.raises(RuntimeError):
        with w4_linear._timed_after(lambda: calls.append("quantize")):
            raise RuntimeError("launch failed")
    calls.clear()
    tuner.do_bench(launch, quantiles=None)
    assert calls == ["gemv"]


def test_the_gemv_tunings_are_kept_apart_with_and_without_pdl():
    """A GEMV config tuned behind the quantization (PDL) is not reused for a plain launch, nor the other way."""
    from qcompile.backends.triton import w4_linear

    for tuner in [*w4_linear._gemv_kernels.values(), *w4_linear._gemv_group_kernels.values(),
                  w4_linear._ksplit_kernel]:
        assert "PDL" in tuner.keys


def test_the_decode_paths_time_their_gemv_configs_behind_the_quantization(monkeypatch):
    """The wiring of ``_timed_after``: a GEMV launched as a programmatic dependent of the activation quantization
    (or the k-split GEMM, where ``DISPATCH.ksplit_pdl``) has its configs timed behind a replay of that
    quantization, on every path that launches one (single weight, group GEMV, the first weight of ``per_weight``);
    not where the codes come from elsewhere, nor behind the GEMV before it. Runs on the CPU: the launches are
    replaced by recorders."""
    from types import SimpleNamespace

    from qcompile.backends.triton import w4_linear

    quantized, seen = [], []

    def quantize_rows(x, *args, **kw):
        quantized.append(kw.get("pdl"))
        return x, None, None

    def record(*args, **kw):
        seen.append(w4_linear._PRODUCER[-1] if w4_linear._PRODUCER else None)

    outer = ["per_weight"]
    monkeypatch.setattr(w4_linear, "quantize_rows", quantize_rows)
    monkeypatch.setattr(w4_linear, "launch_gemv", record)
    monkeypatch.setattr(w4_linear, "launch_gemv_group", record)
    monkeypatch.setattr(w4_linear, "launch_ksplit", record)
    monkeypatch.setattr(w4_linear, "_choose_path",
                        lambda key, cands, forced: outer[0] if key[0] in ("group", "group_codes") else "gemv")
    monkeypatch.setattr(w4_linear.DISPATCH, "gemv_pdl", True)
    x = torch.zeros(1, 64, dtype=torch.float16)
    pws = [SimpleNamespace(group_size=0, out_features=32, in_features=64, fmt="dint4", pack_k=8) for _ in range(2)]

    def replays(producer) -> bool:
        """Whether ``producer`` is a replay of the quantization (as a PDL producer)."""
        if producer is None:
            return False
        quantized.clear()
        producer()
        return quantized == [True]

    w4_linear._quantized_gemv(x, pws[0], torch.empty(1, 32, dtype=torch.float16), 8, False, None)
    assert [replays(p) for p in seen] == [True]
    seen.clear()
    monkeypatch.setattr(w4_linear.DISPATCH, "ksplit_pdl", True)  # the k-split GEMM as a dependent launch too
    w4_linear._quantized_ksplit(x, pws[0], torch.empty(1, 32, dtype=torch.float16), 8, False, None)
    assert [replays(p) for p in seen] == [True]
    for path, expected in [("per_weight", [True, False]), ("gemv_group", [True])]:
        outer[0] = path
        seen.clear()
        w4_linear.w4_linear_2d_shared(x, pws, 8, False, [None, None])
        assert [replays(p) for p in seen] == expected, path
        seen.clear()  # codes given (Inductor's quantization): nothing to replay
        w4_linear.w4_linear_2d_codes(x, None, None, pws, 8, False, [None, None], torch.float16)
        assert seen == [None] * len(expected), path
    assert not w4_linear._PRODUCER
