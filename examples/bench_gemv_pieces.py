"""Where the W4A8 decode time goes (GPU): activation quantization, the GEMV per config and unpacker, fused.

For LLaMA shapes N x K and M in {1, 4}, GPU time per call (one CUDA graph cycling 8 weight copies,
median of 10 replays, microseconds) of:
  * fp16: cuBLAS ``F.linear``;  quant: ``quantize_rows`` alone;  auto: ``w4a8_linear`` (dispatch's pick);
  * g<BN>x<BW>w<warps>: ``launch_gemv`` on pre-quantized codes, arithmetic dINT unpacker;
  * L<BN>x<BW>w<warps>: the same with the table unpacker (``lut=True``);
  * f8x128w4: ``launch_gemv`` with the activation quantization fused in.

Then sibling groups (the q/k/v and gate/up linears of one input) at M in {1, 4, 16}: fp16 (one
``F.linear`` per weight), and ``w4_linear_2d_shared`` on each decode path: ``per_weight`` (one
``quantize_rows``, then each weight's own pick), ``gemv_group`` (one ``quantize_rows`` + one grouped GEMV
launch), ``gemv_group_fused`` (one launch); the three outputs are checked bitwise equal.

``--slope``: instead, the GEMV's fixed cost and streaming rate: M = 1, N x K from 0.5 to 67 MB of
packed weights, the best of ``CFGS`` per shape beside FP16 ``F.linear``, in TB/s.

``--splitk``: instead, split-K GEMVs (``SPLIT_K`` slices of K summed in the int32 workspace): for the
model shapes and the q/k/v, gate/up groups at M in {1, 16}, the best config per SPLIT_K (codes given,
and quantization fused), outputs checked bitwise equal to SPLIT_K = 1.

``--pipeline``: instead, the best register-buffered GEMV config against the best compiler-pipelined one
(``PIPELINE`` > 1: cp.async weight stream, ``GEMV_PIPELINED_CONFIGS``), model shapes and groups at M in {1, 4, 16}.

``--pdl``: instead, quantize_rows + GEMV as two plain launches vs the GEMV as a programmatic dependent
launch of the quantization (its weight prologue overlaps it), model shapes and 7B groups at M in {1, 4}.

``--quant``: instead, ``quantize_rows`` alone per launch config (rows per program, block, warps; one pass
with the row in registers, or two passes; rows split over programs by SLICE columns) for M in {1, 4, 16}
(``QUANT_MS=1,4,16,4096``: other M) and K in {4096, 11008, 14336} (``QUANT_KS``), codes checked bitwise equal to the
default config's, beside an empty launch (the floor of any kernel in the graph).

``--pdl-configs``: instead, M = 1 and 4 (``PDL_MS``): each GEMV config of ``PDL_CONFIGS`` (PREFETCH 1 and 2) on given
codes and behind its quantization (PDL), beside FP16, the dispatch and the config its GEMV autotuner picked.

``--quant-div``: instead, ``quantize_rows`` at its default config with each division (``DIV_RCP``: one reciprocal per
row and FMA corrections, or IEEE ``div.rn`` per element), decode and prefill (M, K), codes checked bitwise equal.

``--direct``: instead, the M = 1 GEMV on given codes with the activation words read into the accumulator's
layout (``DISPATCH.gemv_direct``, the default) vs broadcast to it (through shared memory), and direct with
two tiles ahead in the register buffer (``PREFETCH = 2``), best config of each, model shapes and groups,
outputs checked bitwise equal.

``--rows``: instead, the M = 2 and 4 GEMV on given codes with its broadcast accumulator (the default) vs one
accumulator per row (``DISPATCH.gemv_direct_rows``), best config of each, outputs checked bitwise equal, and
each best config with its quantization as programmatic dependent launches, vs FP16.

``--l2``: instead, a LLaMA-2-7B layer's four decode linears (q/k/v group, o, gate/up group, down; M = 1,
quantize_rows + GEMV, both programmatic dependent launches, autotuned) over 6 layers of distinct weights,
with a compute-only gap kernel (``torch.cuda._sleep``, standing for the norm / attention work) after each
GEMV, and each GEMV prefetching the next linear's weights into L2 (``DISPATCH.l2_prefetch``) or not: µs per
layer, outputs checked bitwise equal.

``--deep``: instead, M = 4 and 16 on given codes: each deep-pipeline decode tile (``DEEP_DECODE_CONFIGS``)
against the autotuned decode tiles, split-K tiles and GEMV, and the best one with its quantization against the
dispatch's pick, beside FP16 (weights streamed from HBM).

``--ksplit``: instead, M = 1, 4 and 16 on given codes: the decode GEMM with K split across warps
(``launch_ksplit``, each config of ``KSPLIT_CONFIGS`` and ``KSPLIT_EXTRA``, and autotuned) against the autotuned
tiled and split-K decode GEMMs, outputs checked bitwise equal; its best config with its quantization and the
dispatch's pick, beside FP16. ``KSPLIT_SWEEP="32,4,4,3;32,4,2,3"`` times those configs instead.

``--ksplit-lut``: instead, M = 1, 4 and 16 on given codes: each config of ``KSPLIT_CONFIGS`` with the arithmetic
(A) and the table (L) unpacker, against the autotuned tiled and split-K decode GEMMs, outputs checked bitwise
equal.

``--ksplit-pdl``: instead, M = 1, 4 and 16: ``quantize_rows`` + the k-split GEMM as plain launches vs as programmatic
dependent launches (``DISPATCH.ksplit_pdl``), and with PDL on one side only, each config of ``KSPLIT_CONFIGS``,
outputs checked bitwise equal.

``--wload``: instead, M = 1 and 4 (``PDL_MS``): the GEMV's weight loads with cache hints (``W_LOAD``: none,
``evict_first``, ``.cg``), each of ``WLOAD_CONFIGS`` behind its quantization, rounds in turn, outputs checked bitwise
equal. ``--wload-op``: the public op on the GEMV path with ``DISPATCH.gemv_w_load`` 0 and 1, in turn.

``--fused``: instead, M = 1, 2 and 4: the GEMV with the quantization fused into its prologue (``gemv_fused``) vs the
two-launch GEMV paths, each forced through the public op, and fused with each of ``FUSED_CFGS``; outputs checked
bitwise equal.

``--decode-tiles``: the same with ``DECODE_TILES`` (split-K and narrow tiles, shallow pipelines).

``--self-l2``: instead, M = 1, 2, 4: the GEMV (a programmatic dependent of its quantization) asking for the
first X MB of its own weight in L2 at its start, X in {0, 2, 4, 8, 64}, and without PDL; beside FP16 and the
dispatch's pick.

    python examples/bench_gemv_pieces.py [--groups-only | --slope | --splitk | --pipeline | --pdl | --quant |
                                          --pdl-configs | --quant-div | --direct | --rows | --l2 | --ksplit |
                                          --ksplit-lut | --ksplit-pdl | --deep | --decode-tiles | --self-l2 |
                                          --fused | --wload | --wload-op]
"""
# ruff: noqa: B023  (every lambda is captured and replayed inside its own loop iteration)
import os
import sys
import time

import torch
import torch.nn.functional as F_nn
from gpu_timing import bench_graph, clones, streamed_copies

from qcompile import formats as F
from qcompile.backends.triton import prepack, w4a8_linear
from qcompile.backends.triton.quantize_kernel import quantize_rows
from qcompile.backends.triton.w4_linear import (
    DISPATCH,
    SPLITK_MAX_M,
    launch_gemv,
    launch_gemv_group,
    w4_linear_2d_shared,
)

CFGS = [(8, 128, 4), (4, 256, 4), (8, 256, 8), (16, 128, 8), (8, 64, 2), (16, 64, 4), (32, 64, 4)]
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
# (name, out_features of each sibling, in_features): LLaMA-2-7B q/k/v and gate/up, LLaMA-3-8B q/k/v (GQA)
GROUPS = [("llama2-7b qkv", (4096, 4096, 4096), 4096), ("llama2-7b gate/up", (11008, 11008), 4096),
          ("llama3-8b qkv", (4096, 1024, 1024), 4096), ("llama3-8b gate/up", (14336, 14336), 4096)]
GROUP_PATHS = ["per_weight", "gemv_group", "gemv_group_fused"]


def main():
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    for n, k in SHAPES:
        w16 = (torch.randn(n, k, device="cuda") * 0.02).half()
        codes, scale, zp = F.quantize(w16.float(), F.FormatSpec.parse("dint4"), F.Granularity.parse("channel"))
        pws = clones(prepack(codes, scale, zp, "dint4", "channel"), 8)
        w16s = clones(w16, 4)
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda").half()
            y = torch.empty(m, n, device="cuda", dtype=torch.half)
            xq, xs, xz = quantize_rows(x, 8, False)
            r = {"fp16": bench_graph(lambda w: F_nn.linear(x, w), w16s),
                 "quant": bench_graph(lambda _: quantize_rows(x, 8, False), [None]),
                 "auto": bench_graph(lambda p: w4a8_linear(x, p), pws)}
            for bn, bw, nw in CFGS:
                if m * bn * bw > 64 * 32 * nw:
                    continue
                cfg = {"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw}
                for tag, lut in (("g", False), ("L", True)):
                    r[f"{tag}{bn}x{bw}w{nw}"] = bench_graph(
                        lambda p: launch_gemv(xq, xs, xz, p, y, config=cfg, lut=lut), pws)
            r["f8x128w4"] = bench_graph(lambda p: launch_gemv(x, None, None, p, y, fuse_quant=True, config={
                "BLOCK_N": 8, "BLOCK_W": 128, "num_warps": 4}), pws)
            best = {tag: min((v, kk) for kk, v in r.items() if kk.startswith(tag)) for tag in ("g", "L")}
            print(f"[{time.time() - t0:4.0f}s] {n}x{k} M={m}: " + " ".join(f"{a}={b:.1f}" for a, b in r.items()))
            print(f"   best GEMV only: arithmetic unpacker {best['g'][0]:.1f} ({best['g'][1]}), table "
                  f"{best['L'][0]:.1f} ({best['L'][1]}); + quant {best['g'][0] + r['quant']:.1f}; fused "
                  f"{r['f8x128w4']:.1f}; fp16 / (GEMV + quant) {r['fp16'] / (best['g'][0] + r['quant']):.2f}x",
                  flush=True)
        del pws, w16s


def groups():
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; sibling groups, GPU time per group call in us", flush=True)
    for name, ns, k in GROUPS:
        w16 = [(torch.randn(n, k, device="cuda") * 0.02).half() for n in ns]
        packed = [prepack(*F.quantize(w.float(), F.FormatSpec.parse("dint4"), F.Granularity.parse("channel")),
                          "dint4", "channel") for w in w16]
        copies = 4  # each copy of the group > L2 on its own
        pw_sets = list(zip(*(clones(pw, copies) for pw in packed)))
        w16_sets = list(zip(*(clones(w, 2) for w in w16)))
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda").half()
            r = {"fp16": bench_graph(lambda ws: [F_nn.linear(x, w) for w in ws], w16_sets)}
            outs = {}
            for path in GROUP_PATHS:
                DISPATCH.group_path = path
                try:
                    r[path] = bench_graph(lambda ps: w4_linear_2d_shared(x, list(ps), 8, False, [None] * len(ps)),
                                          pw_sets)
                    outs[path] = w4_linear_2d_shared(x, list(pw_sets[0]), 8, False, [None] * len(ns))
                finally:
                    DISPATCH.group_path = "auto"
            same = all(torch.equal(a, b) for path in GROUP_PATHS[1:] for a, b in zip(outs[path], outs["per_weight"]))
            best = min(GROUP_PATHS, key=r.get)
            print(f"[{time.time() - t0:4.0f}s] {name} {'+'.join(map(str, ns))}x{k} M={m}: "
                  + " ".join(f"{a}={b:.1f}" for a, b in r.items())
                  + f" | best {best} {r['fp16'] / r[best]:.2f}x fp16, per_weight {r['fp16'] / r['per_weight']:.2f}x"
                  + f" | outputs bitwise equal: {same}", flush=True)
        del pw_sets, w16_sets


SLOPE_SHAPES = [(4096, 256), (4096, 1024), (4096, 2048), (4096, 4096), (4096, 8192), (4096, 16384), (16384, 4096),
                (32768, 4096)]


def slope():
    print(f"device: {torch.cuda.get_device_name()}; M = 1, dINT4 per channel, GEMV on pre-quantized codes", flush=True)
    for n, k in SLOPE_SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.02
        codes, scale, zp = F.quantize(w, F.FormatSpec.parse("dint4"), F.Granularity.parse("channel"))
        pws = clones(prepack(codes, scale, zp, "dint4", "channel"), 8)
        w16s = clones(w.half(), 4)
        x = torch.randn(1, k, device="cuda").half()
        y = torch.empty(1, n, device="cuda", dtype=torch.half)
        xq, xs, xz = quantize_rows(x, 8, False)
        best = min((bench_graph(lambda p: launch_gemv(xq, xs, xz, p, y, config={
            "BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw}), pws), (bn, bw, nw))
            for bn, bw, nw in CFGS if bn * bw <= 64 * 32 * nw)
        fp = bench_graph(lambda w_: F_nn.linear(x, w_), w16s)
        mb4, mb16 = n * k / 2 / 1e6, n * k * 2 / 1e6
        print(f"{n}x{k}: GEMV {best[0]:.2f} us {best[1]} = {mb4 / best[0]:.2f} TB/s ({mb4:.1f} MB); "
              f"fp16 {fp:.2f} us = {mb16 / fp:.2f} TB/s", flush=True)
        del pws, w16s


def _cases(groups, shapes=SHAPES) -> list:
    """``(name, out_features of each weight, in_features)``: each of ``shapes`` alone, then ``groups``."""
    return [(f"{n}x{k}", (n,), k) for n, k in shapes] + list(groups)


def _weight_sets(ns, k):
    """Random fp16 weights ``[n, k]`` for each n of a shape / group, as sets to cycle through in a graph:
    4 copies of their dINT4 packings, 2 of the fp16 weights (each set one copy of every weight)."""
    w16 = [(torch.randn(n, k, device="cuda") * 0.02).half() for n in ns]
    packed = [prepack(*F.quantize(w.float(), F.FormatSpec.parse("dint4"), F.Granularity.parse("channel")),
                      "dint4", "channel") for w in w16]
    return list(zip(*(clones(pw, 4) for pw in packed))), list(zip(*(clones(w, 2) for w in w16)))


def _decode_inputs(ns, k, m, w16_sets):
    """A random fp16 activation ``x [m, k]``, one output per weight, ``x``'s int8 codes ``(xq, xs, xz)`` and
    the FP16 ``F.linear`` time of the shape / group."""
    x = torch.randn(m, k, device="cuda").half()
    ys = [torch.empty(m, n, device="cuda", dtype=torch.half) for n in ns]
    fp = bench_graph(lambda ws: [F_nn.linear(x, w) for w in ws], w16_sets)
    return x, ys, quantize_rows(x, 8, False), fp


def _streamed_weights(n: int, k: int):
    """A random fp16 weight ``[n, k]`` as dINT4 per-channel packed copies and fp16 copies, each enough copies that
    cycling through them in a graph streams > 2x the L2 (``gpu_timing.streamed_copies``)."""
    w16 = (torch.randn(n, k, device="cuda") * 0.02).half()
    packed = prepack(*F.quantize(w16.float(), F.FormatSpec.parse("dint4"), F.Granularity.parse("channel")),
                     "dint4", "channel")
    return streamed_copies(packed, n * k // 2), streamed_copies(w16, n * k * 2)


def _timed_case(n, k, m, w16s, pws):
    """One decode case: an activation ``x [m, k]``, an output buffer ``y [m, n]``, the FP16 ``F.linear`` time and the
    public op's (the dispatch's pick), weights streamed from HBM."""
    x = torch.randn(m, k, device="cuda").half()
    y = torch.empty(m, n, device="cuda", dtype=torch.half)
    return x, y, bench_graph(lambda w: F_nn.linear(x, w), w16s), bench_graph(lambda p: w4a8_linear(x, p), pws)


def _gemv_call(q, ps, ys, cfg, **kw):
    """One GEMV launch on the activation (or its codes) ``q``: ``launch_gemv`` for a single weight,
    ``launch_gemv_group`` for siblings."""
    if len(ps) == 1:
        return [launch_gemv(*q, ps[0], ys[0], config=cfg, **kw)]
    return launch_gemv_group(*q, list(ps), ys, config=cfg, **kw)


def _same_as(ref, out, what):
    """A copy of ``out`` becomes the reference when there is none; otherwise it is compared bitwise and a
    mismatch printed. Returns the reference."""
    out = [o.clone() for o in out]
    if ref is not None and not all(torch.equal(a, b) for a, b in zip(out, ref)):
        print(f"   MISMATCH {what}", flush=True)
    return out if ref is None else ref


SPLITK_CFGS = [(8, 128, 4), (16, 128, 4), (32, 128, 8), (64, 64, 8), (4, 256, 4), (16, 32, 4), (8, 64, 4)]


def splitk():
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; split-K GEMV, GPU time per call in us", flush=True)
    cases = _cases(GROUPS[:2], SHAPES[::-1])
    for name, ns, k in cases:
        pw_sets, w16_sets = _weight_sets(ns, k)
        for m in (1, 16):
            x, ys, q, fp = _decode_inputs(ns, k, m, w16_sets)
            quant = bench_graph(lambda _: quantize_rows(x, 8, False), [None])

            def call(ps, cfg, fuse):
                return _gemv_call((x, None, None) if fuse else q, ps, ys, cfg, fuse_quant=fuse)

            line, ref, top = [], None, float("inf")
            for fuse in (False, True):
                for sk in (1, 2, 4, 8):
                    best = None
                    for bn, bw, nw in SPLITK_CFGS:
                        if m * bn * bw > 64 * 32 * nw:
                            continue
                        cfg = {"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw, "SPLIT_K": sk}
                        ref = _same_as(ref, call(pw_sets[0], cfg, fuse), f"{name} M={m} fuse={fuse} {cfg}")
                        t = bench_graph(lambda ps: call(ps, cfg, fuse), pw_sets) + (0 if fuse else quant)
                        if best is None or t < best[0]:
                            best = (t, (bn, bw, nw))
                    if best is not None:
                        line.append(f"{'F' if fuse else 'q+'}s{sk}={best[0]:.1f}{best[1]}")
                        top = min(top, best[0])
            print(f"[{time.time() - t0:4.0f}s] {name} M={m}: fp16={fp:.1f} quant={quant:.1f} " + " ".join(line)
                  + f" | best {fp / top:.2f}x fp16", flush=True)
        del pw_sets, w16_sets


def pipeline():
    """Best register-buffered config (PIPELINE = 0, ``GEMV_CONFIGS``) vs best pipelined one (cp.async
    stream, ``GEMV_PIPELINED_CONFIGS``) per shape / group and M, on pre-quantized codes, outputs checked
    bitwise equal."""
    from qcompile.backends.triton.w4_gemv_kernel import GEMV_CONFIGS, GEMV_PIPELINED_CONFIGS, accumulator_fits

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; GEMV weight stream: register prefetch vs compiler-pipelined "
          "(cp.async), best config of each, GPU time per call in us", flush=True)
    cfgs = GEMV_CONFIGS + GEMV_PIPELINED_CONFIGS
    cases = _cases(GROUPS)
    for name, ns, k in cases:
        pw_sets, w16_sets = _weight_sets(ns, k)
        mb = sum(n * k for n in ns) / 2 / 1e6
        for m in (1, 4, 16):
            _, ys, q, fp = _decode_inputs(ns, k, m, w16_sets)
            best, ref = {}, None
            for c in cfgs:
                if not accumulator_fits(c, m):  # m in {1, 4, 16}: its own BLOCK_M
                    continue
                cfg = dict(c.kwargs, num_warps=c.num_warps)
                ref = _same_as(ref, _gemv_call(q, pw_sets[0], ys, cfg), f"{name} M={m} {cfg}")
                t = bench_graph(lambda ps: _gemv_call(q, ps, ys, cfg), pw_sets)
                kind = "pipelined" if cfg["PIPELINE"] > 1 else "register"
                if kind not in best or t < best[kind][0]:
                    best[kind] = (t, (cfg["BLOCK_N"], cfg["BLOCK_W"], cfg["num_warps"], cfg["PIPELINE"]))
            cells = [f"{kind} {t:.1f} us = {mb / t:.2f} TB/s {c}" for kind, (t, c) in sorted(best.items())]
            print(f"[{time.time() - t0:4.0f}s] {name} M={m} ({mb:.1f} MB): fp16 {fp:.1f} us; " + "; ".join(cells)
                  + f"; pipelined / register = {best['register'][0] / best['pipelined'][0]:.2f}x", flush=True)
        del pw_sets, w16_sets


def direct():
    """M = 1 GEMV on given codes: activation words broadcast (``DISPATCH.gemv_direct = False``) vs direct (the
    default), and direct with two tiles in the register buffer (``GEMV_PREFETCH2_CONFIGS``); best config of
    each, outputs checked bitwise equal."""
    from qcompile.backends.triton.w4_gemv_kernel import GEMV_CONFIGS, GEMV_PREFETCH2_CONFIGS

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; M = 1 GEMV on given codes: activation words broadcast vs "
          "direct vs direct with PREFETCH = 2, best config of each, GPU time per call in us", flush=True)
    kinds = [("broadcast", False, GEMV_CONFIGS), ("direct", True, GEMV_CONFIGS),
             ("direct, 2 ahead", True, GEMV_PREFETCH2_CONFIGS)]
    cases = _cases(GROUPS)
    for name, ns, k in cases:
        pw_sets, w16_sets = _weight_sets(ns, k)
        mb = sum(n * k for n in ns) / 2 / 1e6
        _, ys, q, fp = _decode_inputs(ns, k, 1, w16_sets)
        best, ref = {}, None
        for kind, on, cfgs in kinds:
            DISPATCH.gemv_direct = on
            try:
                for c in cfgs:
                    cfg = dict(c.kwargs, num_warps=c.num_warps)
                    ref = _same_as(ref, _gemv_call(q, pw_sets[0], ys, cfg), f"{name} {kind} {cfg}")
                    t = bench_graph(lambda ps: _gemv_call(q, ps, ys, cfg), pw_sets)
                    if kind not in best or t < best[kind][0]:
                        best[kind] = (t, (cfg["BLOCK_N"], cfg["BLOCK_W"], cfg["num_warps"]))
            finally:
                DISPATCH.gemv_direct = True
        cells = [f"{kind} {t:.2f} {c} = {mb / t:.2f} TB/s" for kind, (t, c) in best.items()]
        base = best["broadcast"][0]
        print(f"[{time.time() - t0:4.0f}s] {name} ({mb:.1f} MB): fp16 {fp:.1f}; " + "; ".join(cells)
              + "; speed vs broadcast: " + ", ".join(f"{kind} {base / t:.2f}x" for kind, (t, _) in best.items()
                                                     if kind != "broadcast")
              + f"; best vs fp16 {fp / min(t for t, _ in best.values()):.2f}x", flush=True)
        del pw_sets, w16_sets


def rows():
    """M = 2 and 4 GEMV on given codes: the broadcast ``[BLOCK_M, BLOCK_N, BLOCK_W]`` accumulator (the default)
    vs one accumulator per row (``DISPATCH.gemv_direct_rows``); best config of each (those whose accumulator
    fits), outputs checked bitwise equal; then quantize + GEMV of each best config as programmatic dependent
    launches, vs FP16."""
    from qcompile.backends.triton.w4_gemv_kernel import GEMV_CONFIGS, accumulator_fits

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; M = 2 and 4 GEMV on given codes: broadcast vs per-row "
          "accumulators, best config of each, GPU time per call in us", flush=True)
    cases = _cases(GROUPS[:2])
    for name, ns, k in cases:
        pw_sets, w16_sets = _weight_sets(ns, k)
        mb = sum(n * k for n in ns) / 2 / 1e6
        for m in (2, 4):
            x, ys, q, fp = _decode_inputs(ns, k, m, w16_sets)
            best, ref = {}, None
            for kind in ("broadcast", "per-row"):
                DISPATCH.gemv_direct_rows = kind == "per-row"
                try:
                    for c in GEMV_CONFIGS:
                        if not accumulator_fits(c, 1 << (m - 1).bit_length()):
                            continue
                        cfg = dict(c.kwargs, num_warps=c.num_warps)
                        ref = _same_as(ref, _gemv_call(q, pw_sets[0], ys, cfg), f"{name} M={m} {kind} {cfg}")
                        t = bench_graph(lambda ps: _gemv_call(q, ps, ys, cfg), pw_sets)
                        if kind not in best or t < best[kind][0]:
                            best[kind] = (t, cfg)
                    cfg = best[kind][1]
                    full = bench_graph(lambda ps: _gemv_call(quantize_rows(x, 8, False, pdl=True), ps, ys, cfg,
                                                             pdl=True), pw_sets)
                    best[kind] = (*best[kind], full)
                finally:
                    DISPATCH.gemv_direct_rows = False
            cells = [f"{kind} {t:.2f} ({c['BLOCK_N']}, {c['BLOCK_W']}, {c['num_warps']}) = {mb / t:.2f} TB/s, "
                     f"with quantize {full:.2f} = {fp / full:.2f}x fp16" for kind, (t, c, full) in best.items()]
            print(f"[{time.time() - t0:4.0f}s] {name} M={m} ({mb:.1f} MB): fp16 {fp:.1f}; " + "; ".join(cells)
                  + f"; per-row vs broadcast {best['broadcast'][0] / best['per-row'][0]:.2f}x", flush=True)
        del pw_sets, w16_sets


def pdl():
    """Activation quantization + GEMV, the two launches of a W4A8 decode linear, plain vs as a programmatic
    dependent launch (the GEMV's weight prologue overlaps ``quantize_rows``), best register config of each,
    M = 1 and 4, outputs checked bitwise equal; beside FP16 and the GEMV alone on given codes."""
    from qcompile.backends.triton.w4_gemv_kernel import GEMV_CONFIGS, accumulator_fits

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; quantize_rows + GEMV, plain vs programmatic dependent "
          "launch (PDL), best config of each, GPU time per call in us", flush=True)
    cases = _cases(GROUPS[:2])
    for name, ns, k in cases:
        pw_sets, w16_sets = _weight_sets(ns, k)
        for m in (1, 4):
            x, ys, q, fp = _decode_inputs(ns, k, m, w16_sets)

            def call(ps, cfg, on, codes=None):
                return _gemv_call(codes or quantize_rows(x, 8, False, pdl=on), ps, ys, cfg, pdl=on)

            best, ref = {}, None
            for c in GEMV_CONFIGS:
                if not accumulator_fits(c, m):
                    continue
                cfg = dict(c.kwargs, num_warps=c.num_warps)
                for kind, on, codes in (("codes given", False, q), ("plain", False, None), ("PDL", True, None)):
                    ref = _same_as(ref, call(pw_sets[0], cfg, on, codes), f"{name} M={m} {kind} {cfg}")
                    try:
                        t = bench_graph(lambda ps: call(ps, cfg, on, codes), pw_sets)
                    except RuntimeError as e:  # e.g. a CUDA graph that cannot capture the PDL launch
                        print(f"   {name} M={m} {kind} {cfg}: {type(e).__name__}: {e}", flush=True)
                        continue
                    if kind not in best or t < best[kind][0]:
                        best[kind] = (t, (cfg["BLOCK_N"], cfg["BLOCK_W"], cfg["num_warps"]))
            cells = [f"{kind} {best[kind][0]:.1f} {best[kind][1]}" for kind in ("codes given", "plain", "PDL")]
            print(f"[{time.time() - t0:4.0f}s] {name} M={m}: fp16 {fp:.1f}; " + "; ".join(cells)
                  + f"; PDL saves {best['plain'][0] - best['PDL'][0]:.1f} us: {fp / best['PDL'][0]:.2f}x fp16 "
                  f"(plain {fp / best['plain'][0]:.2f}x)", flush=True)
        del pw_sets, w16_sets


QUANT_MS = [int(m) for m in os.environ.get("QUANT_MS", "1,4,16").split(",")]  # --quant: rows per call
QUANT_KS = [int(k) for k in os.environ.get("QUANT_KS", "4096,11008,14336").split(",")]  # --quant: row lengths


def quant():
    """``quantize_rows`` per launch config: is the default (``quantize_kernel._config``) the fastest?"""
    import triton

    from qcompile.backends.triton.quantize_kernel import launch_config

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; quantize_rows (int8 per token) alone, GPU time per call in us",
          flush=True)
    dummy = torch.zeros(1, device="cuda")
    floor = bench_graph(lambda d: d.zero_(), clones(dummy, 4))
    print(f"empty launch (a 1-element zero_): {floor:.2f} us", flush=True)
    for k in QUANT_KS:
        for m in QUANT_MS:
            xs = clones(torch.randn(m, k, device="cuda").half() * 3, 4)
            default = launch_config(m, k)
            ref = quantize_rows(xs[0], 8, False)
            full = min(triton.next_power_of_2(k), 16384)
            cfgs = [dict(ROWS=1, BLOCK=full, num_warps=w) for w in (4, 8, 16, 32)]
            cfgs += [dict(ROWS=1, BLOCK=b, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)
                     if b < k and (b < 8192 or m > 64)]
            cfgs += [dict(ROWS=r, BLOCK=full, num_warps=w) for r in (2, 4) if r <= m and r * full <= 16384
                     for w in (8, 16, 32)]
            if m > 64 and k > 4096:  # two passes over several rows a program
                cfgs += [dict(ROWS=r, BLOCK=b, num_warps=w) for r in (2, 4) for b in (512, 1024, 2048)
                         for w in (4, 8, 16) if r * b <= 4096]
            if m <= 64:  # several programs per row: for decode rows only (many rows fill the GPU anyway)
                cfgs += [dict(ROWS=1, BLOCK=full, num_warps=w, SLICE=sl) for sl in (1024, 2048, 4096) if sl < k
                         for w in (8, 16, 32)]
            times = {}
            for cfg in [None] + cfgs:
                out = quantize_rows(xs[0], 8, False, config=cfg)
                if not all(torch.equal(a, b) for a, b in zip(out, ref)):
                    print(f"   MISMATCH K={k} M={m} {cfg}", flush=True)
                    continue
                times[str(cfg)] = bench_graph(lambda x: quantize_rows(x, 8, False, config=cfg), xs)
            best = min(times, key=times.get)
            tbs = m * k * 3 / times[best] / 1e6  # fp16 in, int8 out
            print(f"[{time.time() - t0:4.0f}s] K={k} M={m}: default {default} {times['None']:.2f} us; best {best} "
                  f"{times[best]:.2f} us ({tbs:.2f} TB/s); all: "
                  + ", ".join(f"{c} {t:.2f}" for c, t in times.items() if c != "None"),
                  flush=True)


QUANT_DIV_CASES = [(1, 4096), (16, 4096), (1, 11008), (16, 11008), (1, 14336), (1024, 4096), (4096, 4096),
                   (4096, 11008), (4096, 14336)]  # --quant-div: (M, K)


def quant_div():
    """``quantize_rows`` at its default launch config with each division (``DIV_RCP``: one reciprocal per row and two
    FMA corrections, ``_common.act_quantize_rcp``; or IEEE ``div.rn`` per element), two rounds in turn, codes checked
    bitwise equal; best of the rounds' medians, microseconds."""
    from qcompile.backends.triton.quantize_kernel import launch_config

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; quantize_rows (int8 per token), reciprocal vs IEEE division, GPU "
          "time per call in us", flush=True)
    for m, k in QUANT_DIV_CASES:
        xs = clones(torch.randn(m, k, device="cuda").half() * 3, 4)
        cfg = {key: v for key, v in launch_config(m, k).items() if key not in ("ONE_PASS", "SPLIT")}
        outs = {d: quantize_rows(xs[0], 8, False, config=dict(cfg, DIV_RCP=d)) for d in (True, False)}
        same = all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))
        best = {True: float("inf"), False: float("inf")}
        for _ in range(2):
            for d in (True, False):
                best[d] = min(best[d], bench_graph(lambda x: quantize_rows(x, 8, False, config=dict(cfg, DIV_RCP=d)),
                                                   xs))
        print(f"[{time.time() - t0:4.0f}s] M={m} K={k} (default DIV_RCP={cfg['DIV_RCP']}): "
              f"reciprocal {best[True]:.2f}, div.rn {best[False]:.2f} ({best[False] / best[True]:.3f}x); "
              f"codes {'equal' if same else 'DIFFER'}",
              flush=True)


def l2():
    """Decode linears of 6 LLaMA-2-7B layers in sequence with gaps between them, the GEMV prefetching the next
    weights into L2 or not (module docstring)."""
    spec, gran = F.FormatSpec.parse("dint4"), F.Granularity.parse("channel")
    layout = [((4096, 4096, 4096), 4096), ((4096,), 4096), ((11008, 11008), 4096), ((4096,), 11008)]
    seq = []  # (packed weights, outputs, activation) per linear, layer after layer
    for _ in range(6):
        for ns, k in layout:
            pws = [prepack(*F.quantize((torch.randn(n, k, device="cuda") * 0.02), spec, gran), "dint4", "channel")
                   for n in ns]
            seq.append((pws, [torch.empty(1, n, device="cuda", dtype=torch.half) for n in ns],
                        torch.randn(1, k, device="cuda").half()))
    mb = sum(p.qweight.numel() for pws, _, _ in seq for p in pws) / 2**20
    cycles_per_us = torch.cuda.get_device_properties(0).clock_rate / 1e3  # kHz -> cycles per us
    print(f"device: {torch.cuda.get_device_name()}; 6 layers x 4 decode linears ({mb:.0f} MB of packed weights), "
          "a gap kernel after each GEMV; us per layer", flush=True)

    def run(gap_us, with_linears=True):
        outs = []
        for i, (pws, ys, x) in enumerate(seq):
            if with_linears:
                nxt = [p.qweight for p in seq[(i + 1) % len(seq)][0]]
                outs += _gemv_call(quantize_rows(x, 8, False, pdl=True), pws, ys, None, pdl=True, l2_next=nxt)
            if gap_us:
                torch.cuda._sleep(int(gap_us * cycles_per_us))
        return outs

    t0 = time.time()
    saved = DISPATCH.l2_prefetch, DISPATCH.l2_prefetch_mb
    try:
        for gap in (0, 3, 8, 15):
            alone = bench_graph(lambda _: run(gap, False), [None], reps=1) / 6 if gap else 0.0
            cells, ref = [], None
            for mode, cap in (("off", 0), ("end", 24), ("end", 48), ("start", 24), ("start", 48)):
                DISPATCH.l2_prefetch, DISPATCH.l2_prefetch_mb = mode, float(cap)
                ref = _same_as(ref, run(gap), f"gap {gap} {mode} {cap}")
                t = bench_graph(lambda _: run(gap), [None], reps=1) / 6
                cells.append((f"{mode}" + (f" {cap} MB" if cap else ""), t))
            off = cells[0][1]
            print(f"[{time.time() - t0:4.0f}s] gap {gap} us x 4 (gaps alone {alone:.1f} us/layer): "
                  + "; ".join(f"{name} {t:.1f} ({off / t:.3f}x)" for name, t in cells), flush=True)
    finally:
        DISPATCH.l2_prefetch, DISPATCH.l2_prefetch_mb = saved


# --decode-tiles: (BLOCK_N, UNITS_PER_ITER, warps, stages, SPLIT_K) of the tiled decode GEMM that the autotuner
# does not see: more programs per SM (split-K, narrow tiles) with shallow pipelines (short K slices).
DECODE_TILES = [(32, 1, 4, 2, 4), (32, 1, 4, 3, 4), (32, 2, 4, 2, 4), (32, 2, 4, 2, 2), (32, 2, 4, 3, 2),
                (16, 2, 2, 3, 2), (16, 2, 2, 3, 4), (16, 4, 2, 3, 4), (16, 2, 1, 3, 4), (16, 1, 1, 2, 8),
                (64, 1, 4, 3, 4), (64, 1, 4, 2, 8), (32, 1, 4, 2, 8), (32, 4, 4, 2, 2)]


def _config_sweep(title, launch, configs, tag, ms, extra):
    """For each shape and M in ``ms``, codes given: ``launch(xq, xs, xz, p, y, config=cfg)`` with each of
    ``configs`` (dicts; ``tag(cfg)`` names one) against the autotuned tiled and split-K decode GEMMs and ``extra``
    (name -> ``fn(xq, xs, xz, p, y)``), outputs checked bitwise equal to the tiled GEMM's; then the best config with
    ``quantize_rows`` and the dispatch's pick, beside FP16. Weights streamed from HBM."""
    from qcompile.backends.triton.w4_linear import launch_gemm

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; {title}, codes given, GPU time per call in us (weights streamed "
          "from HBM)", flush=True)
    for n, k in SHAPES:
        pws, w16s = _streamed_weights(n, k)
        mb = n * k / 2 / 1e6
        for m in ms:
            x = torch.randn(m, k, device="cuda").half()
            y = torch.empty(m, n, device="cuda", dtype=torch.half)
            xq, xs, xz = quantize_rows(x, 8, False)
            fp = bench_graph(lambda w: F_nn.linear(x, w), w16s)
            ref = launch_gemm(xq, xs, xz, pws[0], y).clone()
            r = {"tiles": bench_graph(lambda p: launch_gemm(xq, xs, xz, p, y), pws)}
            if m <= SPLITK_MAX_M:  # the split-K workspace's rows
                r["splitk"] = bench_graph(lambda p: launch_gemm(xq, xs, xz, p, y, split_k=True), pws)
            r.update({name: bench_graph(lambda p: fn(xq, xs, xz, p, y), pws) for name, fn in extra.items()})
            each = {}
            for cfg in configs:
                try:
                    if not torch.equal(launch(xq, xs, xz, pws[0], y, config=cfg), ref):
                        print(f"   MISMATCH {n}x{k} M={m} {tag(cfg)}", flush=True)
                        continue
                    each[tag(cfg)] = (bench_graph(lambda p: launch(xq, xs, xz, p, y, config=cfg), pws), cfg)
                except Exception as e:  # out of shared memory: the config does not fit
                    print(f"   {n}x{k} M={m} {tag(cfg)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            best_tag = min(each, key=lambda t: each[t][0])
            best_t, best_cfg = each[best_tag]
            with_q = bench_graph(lambda p: launch(*quantize_rows(x, 8, False), p, y, config=best_cfg), pws)
            auto = bench_graph(lambda p: w4a8_linear(x, p), pws)
            forced = ""
            if m > DISPATCH.decode_max_m:  # the public op on each prefill path (k-split up to 64 rows, switched on)
                default = DISPATCH.ksplit_wide_candidate
                for path in ("inloop", "ksplit"):
                    DISPATCH.prefill_path, DISPATCH.ksplit_wide_candidate = path, True
                    try:
                        t = bench_graph(lambda p: w4a8_linear(x, p), pws)
                        forced += f", forced {path} {t:.1f} = {fp / t:.2f}x fp16"
                    except ValueError as e:
                        forced += f", forced {path}: {e}"
                    finally:
                        DISPATCH.prefill_path, DISPATCH.ksplit_wide_candidate = "auto", default
            print(f"[{time.time() - t0:4.0f}s] {n}x{k} M={m} ({mb:.1f} MB): fp16 {fp:.1f}; codes given: "
                  + ", ".join(f"{kk} {v:.1f}" for kk, v in r.items())
                  + f", best listed {best_t:.1f} ({best_tag}) = {mb / best_t:.2f} TB/s = {r['tiles'] / best_t:.2f}x "
                  "tiles; all listed: " + " ".join(f"{t}={v[0]:.1f}" for t, v in each.items())
                  + f"; with quantization: best listed {with_q:.1f} = {fp / with_q:.2f}x fp16, dispatch "
                  f"({_chosen(m, n, k)}) {auto:.1f} = {fp / auto:.2f}x fp16" + forced, flush=True)
        del pws, w16s


def deep(tiles=False):
    """M = 4 and 16: tiled decode GEMM configs the autotuner does not see (the deep-pipeline
    ``DEEP_DECODE_CONFIGS``, 4-10 stages; ``tiles``: ``DECODE_TILES``) against the autotuned ones and the GEMV."""
    from qcompile.backends.triton import w4_gemm_kernel as kern
    from qcompile.backends.triton.w4_linear import launch_gemm

    configs = kern.DEEP_DECODE_CONFIGS
    if tiles:
        configs = [kern._cfg(16, bn, upi, w, st, 1, sk) for bn, upi, w, st, sk in DECODE_TILES]
    _config_sweep(f"decode tiles {'(DECODE_TILES)' if tiles else 'with deep pipelines'}", launch_gemm,
                  [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs],
                  lambda c: (f"{c['BLOCK_N']},u{c['UNITS_PER_ITER']},w{c['num_warps']},s{c['num_stages']},"
                             f"k{c['SPLIT_K']}"), (4, 16), {"gemv": launch_gemv})


# --ksplit: (BLOCK_N, S, warps, stages) the autotuner does not see, timed beside KSPLIT_CONFIGS. On the H100
# (2026-12-06, second run, ``examples/results/ksplit_extra_h100.txt``) none of them was the best of a case; within
# 4 % of it: (16, 4, 4, 3) at 4096x4096, M <= 4, and (64, 2, 2, 3) at 14336x4096, M = 16. Offline sm_90 SASS
# (Triton 3.6) of the K loop, warp instructions per chunk per 32 channels: BLOCK_N 64 348-350 (S = 4 or 2),
# 32 380-382, 16 450.
KSPLIT_EXTRA = [(64, 4, 4, 3), (32, 8, 8, 3), (16, 8, 8, 3), (16, 4, 4, 3), (16, 4, 4, 4), (64, 2, 2, 3),
                (64, 4, 4, 2), (32, 16, 16, 2), (32, 8, 8, 2), (16, 16, 16, 2), (64, 8, 8, 2)]
# KSPLIT_SWEEP="32,4,4,3;32,4,2,3": --ksplit times these (BLOCK_N, S, warps, stages) instead of KSPLIT_CONFIGS +
# KSPLIT_EXTRA. S = 2 x warps gives each warp two chunks per step (two independent unpack + mma chains).
KSPLIT_SWEEP = [tuple(int(v) for v in c.split(",")) for c in os.environ.get("KSPLIT_SWEEP", "").split(";") if c]
# KSPLIT_MS=32,64: --ksplit's rows per call (up to 64: 32- and 64-row tiles above 16, where the public op is also timed
# on each prefill path, "inloop" and "ksplit")
KSPLIT_MS = tuple(int(m) for m in os.environ.get("KSPLIT_MS", "1,4,16").split(","))


def ksplit():
    """M = 1, 4, 16: the decode GEMM with K split across warps (``launch_ksplit``), each of ``KSPLIT_CONFIGS`` and
    ``KSPLIT_EXTRA``, and autotuned, against the autotuned tiled and split-K decode GEMMs."""
    from qcompile.backends.triton.w4_ksplit_kernel import KSPLIT_CONFIGS, ksplit_config
    from qcompile.backends.triton.w4_linear import launch_ksplit

    configs = ([ksplit_config(*c) for c in KSPLIT_SWEEP] if KSPLIT_SWEEP
               else KSPLIT_CONFIGS + [ksplit_config(*c) for c in KSPLIT_EXTRA])
    _config_sweep("decode GEMM with K split across warps", launch_ksplit,
                  [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs],
                  lambda c: f"{c['BLOCK_N']},S{c['S']},w{c['num_warps']},s{c['num_stages']}",
                  KSPLIT_MS, {"ksplit_autotuned": launch_ksplit})


def ksplit_lut():
    """M = 1, 4, 16: each config of ``KSPLIT_CONFIGS`` with the arithmetic unpacker (A) and the table unpacker (L),
    against the autotuned tiled and split-K decode GEMMs. (A biased table, B, was timed here on 2026-12-07 and
    removed: ``examples/results/ksplit_lut_bias_h100.txt``.)"""
    from qcompile.backends.triton.w4_ksplit_kernel import KSPLIT_CONFIGS
    from qcompile.backends.triton.w4_linear import launch_ksplit

    kinds = {"A": False, "L": True}

    def launch(xq, xs, xz, p, y, config):
        return launch_ksplit(xq, xs, xz, p, y, config={k: v for k, v in config.items() if k != "kind"},
                             lut=kinds[config["kind"]])

    _config_sweep("k-split decode GEMM: arithmetic (A) and table (L) unpackers", launch,
                  [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, kind=kind)
                   for c in KSPLIT_CONFIGS for kind in kinds],
                  lambda c: f"{c['kind']}{c['BLOCK_N']},S{c['S']},w{c['num_warps']},s{c['num_stages']}",
                  (1, 4, 16), {})


def ksplit_pdl():
    """M = 1, 4, 16: ``quantize_rows`` + the k-split decode GEMM as two plain launches vs the GEMM as a programmatic
    dependent launch of the quantization (``DISPATCH.ksplit_pdl``), each config of ``KSPLIT_CONFIGS`` (codes given,
    plain, PDL; outputs checked bitwise equal), best of each, beside FP16 and the dispatch's pick (weights
    streamed from HBM). To find which side costs where PDL loses, two more kinds take PDL on one side only: "quant
    PDL only" (the quantization launched as a programmatic dependent, with its trigger and wait; the GEMM a plain
    launch) and "GEMM PDL only" (the GEMM launched as a programmatic dependent, with its wait and trigger, after a
    quantization that never triggers). In neither does a kernel start early, so each times one kernel's PDL code
    and launch attribute alone: if "GEMM PDL only" is as slow as "PDL", the k-split kernel's own PDL form is what
    loses, not the overlap."""
    from qcompile.backends.triton.w4_ksplit_kernel import KSPLIT_CONFIGS
    from qcompile.backends.triton.w4_linear import launch_ksplit

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; quantize_rows + k-split decode GEMM, plain vs programmatic "
          "dependent launch (PDL), GPU time per call in us (weights streamed from HBM)", flush=True)
    configs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in KSPLIT_CONFIGS]
    for n, k in SHAPES:
        pws, w16s = _streamed_weights(n, k)
        for m in (1, 4, 16):
            x, y, fp, auto = _timed_case(n, k, m, w16s, pws)
            q = quantize_rows(x, 8, False)

            def call(p, cfg, q_on, g_on, codes=None):
                return launch_ksplit(*(codes or quantize_rows(x, 8, False, pdl=q_on)), p, y, config=cfg, pdl=g_on)

            best, ref = {}, None
            kinds = (("codes given", False, False, q), ("plain", False, False, None), ("PDL", True, True, None),
                     ("quant PDL only", True, False, None), ("GEMM PDL only", False, True, None))
            for cfg in configs:
                tag = f"{cfg['BLOCK_N']},S{cfg['S']},w{cfg['num_warps']},s{cfg['num_stages']}"
                for kind, q_on, g_on, codes in kinds:
                    ref = _same_as(ref, [call(pws[0], cfg, q_on, g_on, codes)], f"{n}x{k} M={m} {kind} {tag}")
                    t = bench_graph(lambda p: call(p, cfg, q_on, g_on, codes), pws)
                    if kind not in best or t < best[kind][0]:
                        best[kind] = (t, tag)
            cells = [f"{kind} {best[kind][0]:.1f} ({best[kind][1]})" for kind, *_ in kinds]
            print(f"[{time.time() - t0:4.0f}s] {n}x{k} M={m}: fp16 {fp:.1f}; dispatch ({_chosen(m, n, k)}) {auto:.1f} "
                  f"= {fp / auto:.2f}x; " + "; ".join(cells)
                  + f"; PDL saves {best['plain'][0] - best['PDL'][0]:.1f} us: {fp / best['PDL'][0]:.2f}x fp16 "
                  f"(plain {fp / best['plain'][0]:.2f}x)", flush=True)
        del pws, w16s


def _chosen(m, n, k) -> str:
    from qcompile.backends.triton.w4_linear import chosen_path
    return chosen_path(m, n, k) or "?"


def self_l2():
    """M = 1, 2, 4: quantize_rows + GEMV as programmatic dependent launches (autotuned GEMV config), with each
    program first asking for its share of the first X MB of its *own* weight in L2 (``cp.async.bulk.prefetch``,
    before it waits for the quantization) or not; and without PDL with the whole weight asked for. Outputs
    checked bitwise equal; weights streamed from HBM."""
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; GEMV asking for its own weights in L2 at its start, GPU time "
          "per call in us", flush=True)
    saved = DISPATCH.l2_prefetch, DISPATCH.l2_prefetch_mb
    try:
        for n, k in SHAPES:
            pws, w16s = _streamed_weights(n, k)
            mb = n * k / 2 / 1e6
            for m in (1, 2, 4):
                x, y, fp, auto = _timed_case(n, k, m, w16s, pws)

                def call(p, pdl, cap):
                    DISPATCH.l2_prefetch, DISPATCH.l2_prefetch_mb = ("start", cap) if cap else ("off", 0.0)
                    return launch_gemv(*quantize_rows(x, 8, False, pdl=pdl), p, y, pdl=pdl, l2_next=[p.qweight])

                cells, ref = [], None
                for pdl, cap in ((True, 0), (True, 2), (True, 4), (True, 8), (True, 64), (False, 0), (False, 64)):
                    ref = _same_as(ref, [call(pws[0], pdl, cap)], f"{n}x{k} M={m} pdl={pdl} {cap} MB")
                    cells.append((f"{'pdl' if pdl else 'plain'}{f' +{cap} MB' if cap else ''}",
                                  bench_graph(lambda p: call(p, pdl, cap), pws)))
                base = cells[0][1]
                best = min(cells, key=lambda c: c[1])
                print(f"[{time.time() - t0:4.0f}s] {n}x{k} M={m} ({mb:.1f} MB): fp16 {fp:.1f}; dispatch "
                      f"({_chosen(m, n, k)}) {auto:.1f} = {fp / auto:.2f}x; "
                      + "; ".join(f"{name} {t:.1f} ({base / t:.3f}x)" for name, t in cells)
                      + f"; best {best[0]} = {fp / best[1]:.2f}x fp16", flush=True)
            del pws, w16s
    finally:
        DISPATCH.l2_prefetch, DISPATCH.l2_prefetch_mb = saved


PDL_CONFIGS = [(4, 256, 4), (4, 128, 2), (4, 64, 1), (8, 64, 2), (8, 128, 4), (16, 64, 4), (32, 64, 4), (16, 128, 8)]
PDL_MS = [int(m) for m in os.environ.get("PDL_MS", "1,4").split(",")]  # --pdl-configs: rows per call


def pdl_configs():
    """M = 1 and 4 (``PDL_MS``): each GEMV config of ``PDL_CONFIGS`` (PREFETCH 1 and 2; per-row accumulators at
    M > 1) on given codes and behind its quantization as a programmatic dependent launch, outputs checked bitwise
    equal, ranked by the latter; beside FP16 and the dispatch (whose GEMV autotuner times each config behind the
    quantization, ``w4_linear._timed_after``) and the config its autotuner picked. Weights streamed from HBM."""
    from qcompile.backends.triton import w4_linear

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; GEMV configs on given codes vs behind quantize_rows (PDL), GPU "
          "time per call in us (weights streamed from HBM)", flush=True)
    for n, k in SHAPES:
        pws, w16s = _streamed_weights(n, k)
        for m in PDL_MS:
            x = torch.randn(m, k, device="cuda").half()
            y = torch.empty(m, n, device="cuda", dtype=torch.half)
            q = quantize_rows(x, 8, False)
            kw = {"direct_rows": True} if m > 1 else {}
            fp = bench_graph(lambda w: F_nn.linear(x, w), w16s)
            auto = bench_graph(lambda p: w4a8_linear(x, p), pws)
            tuned = getattr(w4_linear._gemv_kernels[DISPATCH.gemv_prefetch2], "best_config", None)
            picked = "-" if tuned is None else (f"{tuned.kwargs['BLOCK_N']},{tuned.kwargs['BLOCK_W']},"
                                                f"w{tuned.num_warps},pf{tuned.kwargs['PREFETCH']}")
            ref, res = None, []
            for bn, bw, nw in PDL_CONFIGS:
                for pf in (1, 2):
                    cfg = {"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw, "PREFETCH": pf}
                    tag = f"{bn},{bw},w{nw},pf{pf}"
                    ref = _same_as(ref, [launch_gemv(*q, pws[0], y, config=cfg, **kw)], f"{n}x{k} M={m} {tag}")
                    given = bench_graph(lambda p: launch_gemv(*q, p, y, config=cfg, **kw), pws)
                    behind = bench_graph(lambda p: launch_gemv(*quantize_rows(x, 8, False, pdl=True), p, y,
                                                               config=cfg, pdl=True, **kw), pws)
                    res.append((behind, given, tag))
            res.sort()
            print(f"[{time.time() - t0:4.0f}s] {n}x{k} M={m}: fp16 {fp:.1f}; dispatch ({_chosen(m, n, k)}; GEMV "
                  f"autotuner's last pick {picked}) {auto:.1f} = {fp / auto:.2f}x; best behind the quantization "
                  f"{res[0][0]:.1f} ({res[0][2]}) = {fp / res[0][0]:.2f}x; all (behind / codes given): "
                  + " ".join(f"{t}={a:.1f}/{b:.1f}" for a, b, t in res), flush=True)
        del pws, w16s


# --wload: the GEMV configs that won behind the quantization on the H100 (tenth session,
# ``gemv_pdl_configs_h100_tenth.txt``), (BLOCK_N, BLOCK_W, warps, PREFETCH).
WLOAD_CONFIGS = [(8, 128, 4, 2), (4, 128, 2, 2), (16, 128, 8, 2), (4, 256, 4, 2), (4, 256, 4, 1)]
WLOAD_ROUNDS = int(os.environ.get("WLOAD_ROUNDS", "3"))


def wload():
    """M = 1 and 4 (``PDL_MS``): each of ``WLOAD_CONFIGS`` behind its quantization (PDL, as the dispatch runs it) with
    the weight loads' cache hints ``W_LOAD`` = 0 (none), 1 (``evict_first``), 2 (``.cg``), timed in turn
    ``WLOAD_ROUNDS`` times (medians), outputs checked bitwise equal; beside FP16 and the dispatch."""
    import statistics

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; GEMV weight-load cache hints behind quantize_rows (PDL), GPU "
          f"time per call in us (weights streamed from HBM), medians of {WLOAD_ROUNDS} rounds in turn", flush=True)
    for n, k in SHAPES:
        pws, w16s = _streamed_weights(n, k)
        for m in PDL_MS:
            x = torch.randn(m, k, device="cuda").half()
            y = torch.empty(m, n, device="cuda", dtype=torch.half)
            kw = {"direct_rows": True} if m > 1 else {}
            auto = bench_graph(lambda p: w4a8_linear(x, p), pws)
            calls, ref = {}, None
            for bn, bw, nw, pf in WLOAD_CONFIGS:
                for wl in (0, 1, 2):
                    cfg = {"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw, "PREFETCH": pf, "W_LOAD": wl}
                    tag = f"{bn},{bw},w{nw},pf{pf},L{wl}"

                    def call(p, cfg=cfg):
                        return launch_gemv(*quantize_rows(x, 8, False, pdl=True), p, y, config=cfg, pdl=True, **kw)

                    ref = _same_as(ref, [call(pws[0])], f"{n}x{k} M={m} {tag}")
                    calls[tag] = call
            times = {t: [] for t in ["fp16", *calls]}
            for _ in range(WLOAD_ROUNDS):
                times["fp16"].append(bench_graph(lambda w: F_nn.linear(x, w), w16s))
                for t, call in calls.items():
                    times[t].append(bench_graph(call, pws))
            med = {t: statistics.median(v) for t, v in times.items()}
            fp = med.pop("fp16")
            best = {wl: min((v, t) for t, v in med.items() if t.endswith(f"L{wl}")) for wl in (0, 1, 2)}
            print(f"[{time.time() - t0:4.0f}s] {n}x{k} M={m}: fp16 {fp:.1f}; dispatch ({_chosen(m, n, k)}) {auto:.1f}; "
                  "best per hint: " + ", ".join(f"L{wl} {v:.1f} ({t}) = {fp / v:.2f}x" for wl, (v, t) in best.items())
                  + "; all: " + " ".join(f"{t}={v:.2f}" for t, v in med.items()), flush=True)
        del pws, w16s


def wload_op():
    """M = 1 and 4 (``PDL_MS``): the public op on the GEMV path (``gemv``; ``gemv_rows`` at M > 1), the GEMV
    autotuned afresh for each ``DISPATCH.gemv_w_load`` (it is in the autotuner's key), hints 0 and 1 timed in turn
    ``WLOAD_ROUNDS`` times (medians), outputs checked bitwise equal; beside FP16."""
    import statistics

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; w4a8_linear on the GEMV path, DISPATCH.gemv_w_load 0 vs 1, GPU "
          f"time per call in us (weights streamed from HBM), medians of {WLOAD_ROUNDS} rounds in turn", flush=True)
    default = (DISPATCH.gemv_w_load, DISPATCH.decode_path)
    for n, k in SHAPES:
        pws, w16s = _streamed_weights(n, k)
        for m in PDL_MS:
            x = torch.randn(m, k, device="cuda").half()
            DISPATCH.decode_path = "gemv" if m == 1 else "gemv_rows"
            outs = []
            for wl in (0, 1):
                DISPATCH.gemv_w_load = wl
                outs.append(w4a8_linear(x, pws[0]).clone())
            if not torch.equal(*outs):
                print(f"   MISMATCH {n}x{k} M={m}", flush=True)
            times = {"fp16": [], 0: [], 1: []}
            for _ in range(WLOAD_ROUNDS):
                times["fp16"].append(bench_graph(lambda w: F_nn.linear(x, w), w16s))
                for wl in (0, 1):
                    DISPATCH.gemv_w_load = wl
                    times[wl].append(bench_graph(lambda p: w4a8_linear(x, p), pws))
            med = {t: statistics.median(v) for t, v in times.items()}
            print(f"[{time.time() - t0:4.0f}s] {n}x{k} M={m} ({DISPATCH.decode_path}): fp16 {med['fp16']:.1f}; "
                  f"no hint {med[0]:.2f} ({med['fp16'] / med[0]:.2f}x), evict_first {med[1]:.2f} "
                  f"({med['fp16'] / med[1]:.2f}x): {med[1] / med[0]:.3f} of the time; rounds (fp16 / 0 / 1): "
                  + "; ".join(f"{a:.1f} / {b:.2f} / {c:.2f}" for a, b, c in zip(times["fp16"], times[0], times[1])),
                  flush=True)
        del pws, w16s
    DISPATCH.gemv_w_load, DISPATCH.decode_path = default


# --fused: explicit GEMV configs (BLOCK_N, BLOCK_W, warps, PREFETCH) timed with the quantization fused, beside the
# autotuned one: the redundant per-program quantization shrinks as BLOCK_N grows (fewer programs).
FUSED_CFGS = [(8, 64, 2, 1), (4, 64, 1, 1), (16, 64, 4, 1), (32, 64, 4, 1), (8, 128, 4, 1), (16, 128, 4, 1),
              (32, 128, 8, 1), (8, 64, 2, 2), (16, 64, 4, 2)]


def fused():
    """M = 1, 2, 4: the GEMV with the activation quantization in its prologue (``gemv_fused``: every program codes
    its K slice into a buffer, then streams as on given codes) against the two-launch paths the dispatch takes
    (``gemv``: quantize_rows + the GEMV as its programmatic dependent; ``gemv_rows`` at M = 2-4), each forced
    through the public op, and ``gemv_fused`` with each of ``FUSED_CFGS``; outputs checked bitwise equal to the
    ``gemv`` path's (the same codes). Weights streamed from HBM."""
    from qcompile.backends.triton.w4_linear import _rows_candidate

    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; GEMV with the quantization fused vs two launches, GPU time per "
          "call in us", flush=True)
    saved = DISPATCH.decode_path
    try:
        for n, k in SHAPES:
            pws, w16s = _streamed_weights(n, k)
            for m in (1, 2, 4):
                x, y, fp, auto = _timed_case(n, k, m, w16s, pws)
                pick = _chosen(m, n, k)
                paths = ["gemv", "gemv_fused"] + (["gemv_rows"] if _rows_candidate(m) else [])
                r, ref = {}, None
                for path in paths:
                    DISPATCH.decode_path = path
                    ref = _same_as(ref, [w4a8_linear(x, pws[0])], f"{n}x{k} M={m} {path}")
                    r[path] = bench_graph(lambda p: w4a8_linear(x, p), pws)
                DISPATCH.decode_path = saved
                each = {}
                for bn, bw, nw, pf in FUSED_CFGS:
                    if m * bn * bw > 64 * 32 * nw:
                        continue
                    cfg = {"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw, "PREFETCH": pf}
                    tag = f"{bn}x{bw}w{nw}p{pf}"
                    _same_as(ref, [launch_gemv(x, None, None, pws[0], y, fuse_quant=True, config=cfg)], tag)
                    each[tag] = bench_graph(lambda p: launch_gemv(x, None, None, p, y, fuse_quant=True, config=cfg),
                                            pws)
                best = min(each, key=each.get)
                two = min(r[p] for p in paths if p != "gemv_fused")
                print(f"[{time.time() - t0:4.0f}s] {n}x{k} M={m}: fp16 {fp:.1f}; dispatch ({pick}) {auto:.1f} = "
                      f"{fp / auto:.2f}x; forced: " + ", ".join(f"{a} {b:.1f}" for a, b in r.items())
                      + f"; fused, best config {each[best]:.1f} ({best}) = {fp / each[best]:.2f}x fp16, "
                      f"{two / each[best]:.2f}x the best two-launch path; all fused: "
                      + " ".join(f"{t}={v:.1f}" for t, v in each.items()), flush=True)
            del pws, w16s
    finally:
        DISPATCH.decode_path = saved


# each replaces the default run (main() then groups(); --groups-only: groups())
MODES = {"--fused": fused, "--ksplit": ksplit, "--ksplit-lut": ksplit_lut, "--ksplit-pdl": ksplit_pdl,
         "--deep": deep, "--decode-tiles": lambda: deep(tiles=True), "--self-l2": self_l2,
         "--l2": l2, "--direct": direct, "--rows": rows, "--quant": quant, "--quant-div": quant_div,
         "--pdl": pdl, "--pdl-configs": pdl_configs, "--pipeline": pipeline,
         "--splitk": splitk, "--slope": slope, "--wload": wload,
         "--wload-op": wload_op}

if __name__ == "__main__":
    mode = next((fn for flag, fn in MODES.items() if flag in sys.argv), None)
    if mode is not None:
        mode()
    else:
        if "--groups-only" not in sys.argv:
            main()
        groups()
