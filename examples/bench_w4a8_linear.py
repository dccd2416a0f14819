"""Benchmark the Triton W4A8 linear (dINT4 per-channel weights, int8 per-token activations) on a GPU.

Checks correctness, then times, for LLaMA-shaped linears N x K and tokens M, all in one run:
  * FP16: cuBLAS ``F.linear`` with the fp16 weight;
  * INT8: ``torch._int_mm`` (cuBLAS W8A8, M > 16 only), activations already int8;
  * W4A8: ``w4a8_linear(x_fp16, packed)``, activation quantization included;
  * W4A4: ``w4a4_linear`` (INT4 g128 weights and activations), quantization included.
Two clocks:
  * GPU time: the calls captured in one CUDA graph, cycling through enough weight copies that the
    weights stream from HBM (> 2x the L2), median of replays — what a CUDA-graphed model sees;
  * eager: ``triton.testing.do_bench`` (L2 flushed before each call, median) of the Python call, which
    includes the host-side launch overhead whenever that exceeds the ~90 us flush.
Prints a markdown table (and writes it to $OUT/triton_bench_w4a8_linear.md when OUT is set).

    python examples/bench_w4a8_linear.py            # the table
    python examples/bench_w4a8_linear.py --variants # + each dispatch path forced, asm/pure, GEMM-only; at
                                                    #   M <= 16 each path also on the dispatch's own clock
    BENCH_MS=4096 BENCH_ROUNDS=5 python examples/bench_w4a8_linear.py
                                                    # FP16, _int_mm, W4A8 and W4A4 timed in turn 5 times,
                                                    #   the median of each (at M = 4096 the same call moves
                                                    #   5-10 % between back-to-back timings)
    BENCH_MS=1,4,16 BENCH_W4A8_FORMAT=int4 python examples/bench_w4a8_linear.py
                                                    # W4A8 with INT4 per-channel weights instead of dINT4
    BENCH_MS=4096 BENCH_SHAPES=4096x11008 python examples/bench_w4a8_linear.py --variants --gemm-sweep
                                                    # + every tiled-GEMM config timed on its own (prefill
                                                    #   configs at M > 16, decode ones at M <= 16)
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F_nn
import triton
from gpu_timing import bench_graph, streamed_copies

from qcompile import formats as F
from qcompile.backends.triton import path_clock, prepack, w4a4_linear, w4a8_linear
from qcompile.backends.triton import w4_linear as W
from qcompile.backends.triton.quantize_kernel import quantize_rows

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (N, K) = (out, in) features
if os.environ.get("BENCH_SHAPES"):  # e.g. BENCH_SHAPES=4096x11008,4096x4096
    SHAPES = [tuple(int(d) for d in s.split("x")) for s in os.environ["BENCH_SHAPES"].split(",")]
MS = [int(m) for m in os.environ.get("BENCH_MS", "1,4,16,64,256,1024,4096").split(",")]
W_FMT, W_GRAN = os.environ.get("BENCH_W4A8_FORMAT", "dint4"), "channel"  # or int4 (the INT4 recipes' codes)
W4A4_FMT, W4A4_GRAN = "int4", "group128"
VARIANTS = "--variants" in sys.argv
GEMM_SWEEP = "--gemm-sweep" in sys.argv  # with --variants: each GEMM config explicitly (sweep_gemm)
VARIANT_BUDGET_S = float(os.environ.get("BENCH_VARIANT_BUDGET_S", "300"))  # then no more variants (keep the table)
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1"))  # timings in turn per cell; the table takes each one's median
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "1e9"))  # stop measuring after this; the table keeps what ran
OUT = os.environ.get("OUT")
t_start = time.time()
torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = False
dev = torch.device("cuda")
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)


def bench(fn) -> float:
    """Eager: median microseconds; the L2 is flushed before each call."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3



def graph_or_nan(fn, weights) -> float:
    try:
        return bench_graph(fn, weights)
    except Exception as e:  # keep the eager numbers if capture fails
        print(f"      CUDA graph timing failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return float("nan")


def median_of_timed(times) -> float:
    """Median of the rounds that timed (a failed capture is nan: sorting with nan in the list gives no median), nan if
    none did; the log's per-round line shows which failed."""
    timed = [t for t in times if t == t]
    return statistics.median(timed) if timed else float("nan")


def rel_err(y, y_ref) -> float:
    return ((y.float() - y_ref).norm() / y_ref.norm()).item()


def quantized_weight(w, fmt, gran):
    spec, g = F.FormatSpec.parse(fmt), F.Granularity.parse(gran)
    codes, scale, zp = F.quantize(w, spec, g)
    return prepack(codes, scale, zp, fmt, gran), F.dequantize(codes, scale, zp, spec, g)


def chosen_path(pw, m) -> str:
    """The dispatch's timed choice of path for this weight's shape at M, "?" if none."""
    return W.chosen_path(m, pw.out_features, pw.in_features) or "?"


def variants(x, pws, m, w8s):
    """GPU time of each dispatch path forced, and of the pieces (same inputs as the main measurement)."""
    d, v, pw = W.DISPATCH, {}, pws[0]
    v["auto"] = chosen_path(pw, m)
    if m <= 16:
        gemv = W._gemv_kernels[d.gemv_prefetch2]  # the GEMV autotuner the dispatch uses
        kernels = {"fused": W._fused_decode_kernel, "unfused": W._decode_kernel,
                   "splitk": W._splitk_decode_kernel, "ksplit": W._ksplit_kernel, "gemv": gemv, "gemv_fused": gemv}
        if W._rows_candidate(m):
            kernels["gemv_rows"] = gemv
        if d.ksplit_pdl_candidate and not d.ksplit_pdl:
            kernels["ksplit_pdl"] = W._ksplit_kernel
        for path, kernel in kernels.items():
            d.decode_path = path
            v[path] = graph_or_nan(lambda p: w4a8_linear(x, p), pws)
            v[f"cfg_{path}"] = str(getattr(kernel, "best_config", ""))
            # as the dispatch times its candidates (path_clock: the L2 flushed before each call), and as it did
            # before: one weight copy replayed, which the L2 can hold
            v[f"{path}_dispatch_clock"] = 1e3 * path_clock.streaming_time(lambda: w4a8_linear(x, pw), x.device)
            v[f"{path}_l2_hot_clock"] = 1e3 * triton.testing.do_bench_cudagraph(lambda: w4a8_linear(x, pw), rep=20,
                                                                                 return_mode="median")
        gemm_pdl, d.gemm_pdl = d.gemm_pdl, True  # the tiled paths with the GEMM as a programmatic dependent
        for path in ("unfused", "splitk"):
            d.decode_path = path
            v[f"{path}_gemm_pdl"] = graph_or_nan(lambda p: w4a8_linear(x, p), pws)
        d.gemm_pdl = gemm_pdl
        ksplit_pdl, d.ksplit_pdl, d.decode_path = d.ksplit_pdl, True, "ksplit"  # the k-split GEMM the same way
        v["ksplit_ksplit_pdl"] = graph_or_nan(lambda p: w4a8_linear(x, p), pws)
        d.ksplit_pdl, d.decode_path = ksplit_pdl, "auto"
        xq, xs, xz = quantize_rows(x, 8, False)
        v["quant"] = graph_or_nan(lambda _: quantize_rows(x, 8, False), [None])
        yb = torch.empty(m, pw.out_features, device=dev, dtype=x.dtype)
        v["gemm_unfused"] = graph_or_nan(lambda p: W.launch_gemm(xq, xs, xz, p, yb), pws)  # autotuned, codes given
        v["gemm_splitk"] = graph_or_nan(lambda p: W.launch_gemm(xq, xs, xz, p, yb, split_k=True), pws)
        if GEMM_SWEEP:
            v.update(sweep_gemm(xq, xs, xz, pws, yb, decode=True))
    else:
        xq, xs, xz = quantize_rows(x, 8, False)
        yb = torch.empty(m, pw.out_features, device=dev, dtype=torch.float16)
        v["quant"] = graph_or_nan(lambda _: quantize_rows(x, 8, False), [None])
        v["gemm"] = graph_or_nan(lambda p: W.launch_gemm(xq, xs, xz, p, yb), pws)
        best = W._prefill_kernel.best_config  # the autotuner's pick for these shapes
        v["cfg"] = str(best)
        # The W8A8 baseline on our activation codes instead of uniform random int8 (its data, its power draw).
        v["int_mm_our_codes"] = graph_or_nan(lambda w: torch._int_mm(xq, w.t()), w8s)
        pick = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
        for r in range(2):  # the pick autotuned vs launched explicitly, in turn
            v[f"gemm_autotuned_{r}"] = graph_or_nan(lambda p: W.launch_gemm(xq, xs, xz, p, yb), pws)
            v[f"gemm_pick_explicit_{r}"] = graph_or_nan(lambda p: W.launch_gemm(xq, xs, xz, p, yb, config=pick), pws)
        if GEMM_SWEEP:
            v.update(sweep_gemm(xq, xs, xz, pws, yb))
        if m >= d.expand_min_m:
            v["expand_weight"] = graph_or_nan(W.expand_weight, pws)
            for path in ("inloop", "expand"):
                d.prefill_path = path
                v[path] = graph_or_nan(lambda p: w4a8_linear(x, p), pws)
            d.prefill_path = "auto"
    if (pw.out_features, pw.in_features) == SHAPES[0] and m in (1, max(MS)):  # the portable unpacker
        d.use_asm = False
        v["pure_unpacker"] = graph_or_nan(lambda p: w4a8_linear(x, p), pws)
        d.use_asm = True
    return v


# The autotuner's prefill configs, then a few it does not see: other GROUP_M swizzles and a deeper pipeline,
# and SWAP_AB tiles around the best one (128 x 128, 4 warps).
SWEEP_EXTRA = [dict(BLOCK_M=bm, BLOCK_N=bn, UNITS_PER_ITER=upi, GROUP_M=gm, num_warps=w, num_stages=st)
               for bm, bn, upi, gm, w, st in [(128, 256, 1, 4, 8, 3), (128, 256, 1, 16, 8, 3), (256, 128, 1, 16, 8, 3),
                                              (128, 128, 1, 16, 8, 4), (128, 128, 2, 8, 8, 4), (128, 256, 2, 8, 8, 2)]]
SWEEP_EXTRA += [dict(BLOCK_M=bm, BLOCK_N=bn, UNITS_PER_ITER=upi, GROUP_M=gm, num_warps=w, num_stages=st, SWAP_AB=True)
                for bm, bn, upi, gm, w, st in [(128, 128, 1, 8, 4, 4), (128, 128, 2, 8, 4, 3), (128, 128, 1, 4, 4, 3),
                                               (128, 128, 1, 16, 4, 3), (64, 128, 1, 8, 4, 3), (128, 64, 1, 8, 4, 3),
                                               (128, 256, 1, 8, 4, 3), (64, 256, 1, 8, 4, 3)]]


def sweep_gemm(xq, xs, xz, pws, yb, decode=False):
    """GPU time of the tiled GEMM on given codes with each config explicitly (``launch_gemm(config=)``):
    ``{"sweep_<BMxBN,upi,gm,warps,stages[,kS]>": µs}`` and the best, outputs checked bitwise equal to the
    autotuned launch's (a config that fails to compile or differs gets nan / is said). Prefill: the prefill
    configs and SWEEP_EXTRA, on packed and on pre-expanded weights; ``decode`` (M <= 16): the decode, split-K,
    swapped and deep-pipeline decode configs, on packed weights."""
    from qcompile.backends.triton import w4_gemm_kernel as kern
    ref = W.launch_gemm(xq, xs, xz, pws[0], torch.empty_like(yb)).clone()
    # (packed weight, its int8 expansion or None) per weight copy: every packed copy, and at prefill two expanded
    # ones for the W_KIND 2 timings (45 MB each at 4096x11008: > the L2 together)
    kinds = {"": [(p, None) for p in pws]}
    if decode:
        tuned = (kern.DECODE_CONFIGS + kern.SPLITK_DECODE_CONFIGS + kern.SWAP_DECODE_CONFIGS
                 + kern.DEEP_DECODE_CONFIGS)
        extra = []
    else:
        tuned, extra = kern.PREFILL_CONFIGS + kern.SWAP_PREFILL_CONFIGS[2:], SWEEP_EXTRA
        kinds["_expanded"] = [(p, W.expand_weight(p)) for p in pws[:2]]
    configs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in tuned] + extra
    out, timed = {}, {kind: {} for kind in kinds}
    for cfg in configs:
        split = cfg.get("SPLIT_K", 1)
        name = (f"sweep_{'swap_' if cfg.get('SWAP_AB') else ''}{cfg['BLOCK_M']}x{cfg['BLOCK_N']},"
                f"u{cfg['UNITS_PER_ITER']},g{cfg['GROUP_M']},w{cfg['num_warps']},s{cfg['num_stages']}"
                + (f",k{split}" if split > 1 else ""))
        for kind, weights in kinds.items():
            try:
                y = W.launch_gemm(xq, xs, xz, weights[0][0], torch.empty_like(yb), config=cfg,
                                  w_expanded=weights[0][1])
                if not torch.equal(y, ref):
                    out[name + kind] = "differs"
                    continue
                t = graph_or_nan(lambda pe, cfg=cfg: W.launch_gemm(xq, xs, xz, pe[0], yb, config=cfg,
                                                                    w_expanded=pe[1]), weights)
                out[name + kind] = t
                if t == t:
                    timed[kind][name + kind] = t
            except Exception as e:  # out of shared memory / registers: this config does not fit
                out[name + kind] = f"failed ({type(e).__name__})"
    for kind, times in timed.items():
        if times:
            out[f"sweep_best{kind}"] = min(times, key=times.get)
    return out


rows, var_rows, worst_err = [], [], 0.0
for n, k in SHAPES:
    # 1. Weights: fp16, W_FMT per-channel (packed; dINT4 unless asked), INT4 g128 (packed), random int8 for the
    #    W8A8 baseline; copies of each so that graph-timed calls stream their weights from HBM.
    w16 = (torch.randn(n, k, device=dev) * 0.02).half()
    pw, w_dq = quantized_weight(w16.float(), W_FMT, W_GRAN)
    pw4, w4_dq = quantized_weight(w16.float(), W4A4_FMT, W4A4_GRAN)
    w8 = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    w16s, w8s = streamed_copies(w16, w16.nbytes), streamed_copies(w8, w8.nbytes)
    pws, pw4s = streamed_copies(pw, pw.nbytes()), streamed_copies(pw4, pw4.nbytes())
    print(f"[{time.time() - t_start:5.0f}s] {n}x{k}: packed {pw.nbytes() / w16.nbytes:.3f} of fp16 bytes",
          flush=True)
    for m in MS:
        if time.time() - t_start > BUDGET_S:
            print(f"budget of {BUDGET_S:.0f}s spent: skipping {n}x{k} M={m}", flush=True)
            continue
        try:
            x = torch.randn(m, k, device=dev).half()
            # 2. Correctness vs linear(fake_quantize(x), dequantize(W)) in fp32 (same codes as the kernels).
            y = w4a8_linear(x, pw)
            x_dq = F.fake_quantize(x.float(), F.FormatSpec.parse("int8"), F.Granularity.parse("token"))
            err = rel_err(y, x_dq @ w_dq.t())
            y4 = w4a4_linear(x, pw4)
            x4_dq = F.fake_quantize(x.float(), F.FormatSpec.parse(W4A4_FMT), F.Granularity.parse(W4A4_GRAN))
            err4 = rel_err(y4, x4_dq @ w4_dq.t())
            worst_err = max(worst_err, err, err4)
            # 3. Timings, all in this run: eager, then GPU time (CUDA graph).
            x8 = torch.randint(-127, 128, (max(m, 17), k), device=dev, dtype=torch.int8)
            t_eager = bench(lambda x=x, pw=pw: w4a8_linear(x, pw))
            rounds = []  # (fp16, int_mm, w4a8, w4a4) per round, in turn
            for _ in range(ROUNDS):
                rounds.append((graph_or_nan(lambda w, x=x: F_nn.linear(x, w), w16s),
                               graph_or_nan(lambda w, x8=x8: torch._int_mm(x8, w.t()), w8s) if m > 16 else float("nan"),
                               graph_or_nan(lambda p, x=x: w4a8_linear(x, p), pws),
                               graph_or_nan(lambda p, x=x: w4a4_linear(x, p), pw4s)))
            t16, t_int, t_ours, t_w4a4 = (median_of_timed([r[i] for r in rounds]) for i in range(4))
        except Exception as e:  # keep the rest of the table
            print(f"M={m}: FAILED {type(e).__name__}: {str(e)[:500]}", flush=True)
            continue
        rows.append((n, k, m, t16, t_int, t_ours, t_w4a4, t_eager, max(err, err4)))
        print(f"[{time.time() - t_start:5.0f}s] M={m:5d} GPU time: fp16 {t16:7.1f}us  int_mm {t_int:7.1f}us  "
              f"w4a8 {t_ours:7.1f}us ({t16 / t_ours:4.2f}x fp16, {t_int / t_ours:4.2f}x int_mm)  w4a4 "
              f"{t_w4a4:7.1f}us; weights GB/s fp16 {w16.nbytes / t16 / 1e3:5.0f} w4a8 "
              f"{pw.nbytes() / t_ours / 1e3:5.0f}; w4a8 eager {t_eager:7.1f}us; err {err:.1e}/{err4:.1e}; "
              f"path {chosen_path(pw, m)}",
              flush=True)
        if ROUNDS > 1:
            print("      rounds (fp16 / int_mm / w4a8 / w4a4 us): "
                  + "; ".join(" / ".join(f"{t:.1f}" for t in r) for r in rounds), flush=True)
        if VARIANTS and time.time() - t_start < VARIANT_BUDGET_S:  # 4. Variants, same inputs.
            try:
                v = variants(x, pws, m, w8s)
            except Exception as e:
                v = {"failed": f"{type(e).__name__}: {str(e)[:300]}"}
            var_rows.append((n, k, m, v))
            print("      variants: " + ", ".join(f"{a}={b:.1f}" if isinstance(b, float) else f"{a}={b}"
                                             for a, b in v.items()), flush=True)
    del w16, pw, w_dq, pw4, w4_dq, w8, w16s, w8s, pws, pw4s
    torch.cuda.empty_cache()

# 5. The table (GPU time from CUDA graphs; the eager column includes host launch overhead).
lines = [f"W4A8 = {W_FMT.replace('int4', 'INT4')} per-channel weights x int8 per-token activations "
         "(quantization included); "
         f"W4A4 = INT4 g128 x INT4 g128. {torch.cuda.get_device_name()}, fp16 activations. GPU time: "
         "calls in one CUDA graph cycling weight copies (> 2x L2), median, microseconds"
         + (f"; FP16, _int_mm, W4A8, W4A4 timed in turn {ROUNDS} times, the median of each" if ROUNDS > 1 else "")
         + ". Eager: "
         "triton.testing.do_bench of the Python call (L2 flushed), median.", "",
         "| N x K | M | FP16 | INT8 _int_mm | W4A8 | W4A8 vs FP16 | W4A8 vs _int_mm | W4A4 | W4A4 vs FP16 "
         "| W4A8 eager | rel. err |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for n, k, m, t16, t_int, t_ours, t_w4a4, t_eager, err in rows:
    int_cols = f"{t_int:.1f} | " if m > 16 else "- | "
    ratio_int = f"{t_int / t_ours:.2f}x" if m > 16 else "-"
    lines.append(f"| {n}x{k} | {m} | {t16:.1f} | {int_cols}{t_ours:.1f} | {t16 / t_ours:.2f}x | {ratio_int} | "
                 f"{t_w4a4:.1f} | {t16 / t_w4a4:.2f}x | {t_eager:.1f} | {err:.1e}{'' if err < 1e-3 else ' FAIL'} |")
decode = [r[3] / r[5] for r in rows if r[2] <= 16]
big = [r[4] / r[5] for r in rows if r[2] == max(MS) > 16]  # _int_mm is timed at M > 16 only
int_mm = (f"W4A8 vs _int_mm at M = {max(MS)}: {min(big):.2f}x..{max(big):.2f}x (target >= 1.0x)" if big
          else "W4A8 vs _int_mm: not timed (no M > 16)")
lines += ["", f"W4A8 speed-up vs FP16 at M <= 16: {min(decode, default=0):.2f}x..{max(decode, default=0):.2f}x "
          f"(target >= 3.0x); {int_mm}; worst relative error vs the fp32 reference "
          f"(W4A8 and W4A4): {worst_err:.1e}"]
table = "\n".join(lines)
print(table)
if OUT:
    with open(os.path.join(OUT, "triton_bench_w4a8_linear.md"), "w") as f:
        f.write(table + "\n")
        for n, k, m, v in var_rows:
            f.write(f"\nvariants {n}x{k} M={m}: {v}")
print(f"total {time.time() - t_start:.0f}s")
