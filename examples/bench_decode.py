"""Decode tokens/s with a KV cache: LLaMA-2-7B-shaped model, random fp16 weights, lowbit W4A8 vs FP16.

Both sides are the same HF model and the same decode loop, in the same run:
  * FP16: ``torch.compile(step)`` with the default backend (Inductor);
  * W4A8: the module form from ``quantize_linears`` (dINT4 per-channel weights, int8 per-token
    activations; lm_head stays fp16 as the recipes keep it) under ``torch.compile(step, backend="lowbit")``.
A step is one token for every sequence of the batch: ``model(ids [B, 1], position_ids, cache=StaticCache)``
plus the greedy argmax, captured in one CUDA graph after warm-up (host overhead excluded on both sides),
then replayed; tokens/s = B * steps / time (median of 5 timings). Prints a markdown table, and writes it
to ``$OUT/bench_decode.md`` when OUT is set.

    python examples/bench_decode.py              # batch 1 and 16 on the GPU
    python examples/bench_decode.py --batch 1    # one batch size
    python examples/bench_decode.py --tiny       # smoke test: a 2-layer model (CPU without CUDA)
    python examples/bench_decode.py --inductor-quant   # also lowbit with options={"inductor_quant": True}
    python examples/bench_decode.py --no-pdl     # also lowbit with the GEMVs as plain launches (PDL is the default)
    python examples/bench_decode.py --no-prefetch2  # also lowbit without the GEMV's PREFETCH = 2 configs
    python examples/bench_decode.py --no-direct  # also lowbit with the M = 1 GEMV's activation words broadcast
    python examples/bench_decode.py --batch 4 --direct-rows  # also lowbit with the M = 2-4 GEMV's per-row accumulators
    python examples/bench_decode.py --batch 4 --no-rows-candidate  # ... without them as a per-shape candidate
    python examples/bench_decode.py --l2-prefetch end end:48 start   # also lowbit with the GEMVs prefetching
                                                 # the next weights into L2 (DISPATCH.l2_prefetch[:_mb])
    python examples/bench_decode.py --interleave 20   # + 20 rounds timing FP16, then each lowbit run, in turn
    python examples/bench_decode.py --profile    # + where a step's GPU time goes, kernels grouped by kind
"""
import argparse
import inspect
import os
import statistics
import time
import types

import torch
import transformers

from qcompile.backends.triton import codes_ops, dynamo
from qcompile.backends.triton.qmodules import QuantizedLinear, quantize_linears
from qcompile.backends.triton.w4_linear import DISPATCH

RECIPE = "w4a8-rtn-dint4"
SHAPE_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
SHAPE_TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
PROMPT, STEPS = 128, 64  # prompt length (prefill, eager), timed decode steps per replay round
CACHE_LEN = PROMPT + STEPS + 8  # each timing round restarts at position PROMPT + 3

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, nargs="*", default=[1, 16])
parser.add_argument("--tiny", action="store_true")
parser.add_argument("--inductor-quant", action="store_true",
                    help="also time lowbit with options={'inductor_quant': True} (inductor_quant.py)")
parser.add_argument("--no-pdl", action="store_true",
                    help="also time lowbit with DISPATCH.gemv_pdl = False (the decode GEMV as a plain launch "
                         "instead of a programmatic dependent of its activation quantization)")
parser.add_argument("--no-prefetch2", action="store_true",
                    help="also time lowbit with DISPATCH.gemv_prefetch2 = False (no GEMV configs two tiles ahead)")
parser.add_argument("--no-direct", action="store_true",
                    help="also time lowbit with DISPATCH.gemv_direct = False (the M = 1 GEMV as before 2026-12-05)")
parser.add_argument("--direct-rows", action="store_true",
                    help="also time lowbit with DISPATCH.gemv_direct_rows = True (the M = 2-4 GEMV with one "
                         "accumulator per row; for --batch 2 / 4)")
parser.add_argument("--no-rows-candidate", action="store_true",
                    help="also time lowbit with DISPATCH.gemv_rows_candidate = False (the per-row GEMV, a decode "
                         "candidate timed per shape at M = 2-4 by default, left out; for --batch 2 / 4)")
parser.add_argument("--ksplit-pdl", action="store_true",
                    help="also time lowbit with DISPATCH.ksplit_pdl = True (the k-split GEMM as a programmatic "
                         "dependent of its activation quantization)")
parser.add_argument("--no-ksplit-lut", action="store_true",
                    help="also time lowbit with DISPATCH.ksplit_lut = False (the k-split GEMM's arithmetic unpacker)")
parser.add_argument("--no-ksplit", action="store_true",
                    help="also time lowbit with DISPATCH.ksplit_candidate = False (the decode GEMM with K split "
                         "across warps, w4_ksplit_kernel, not a candidate)")
parser.add_argument("--swiglu-quant", action="store_true",
                    help="also time lowbit with options={'swiglu_quant': True} (silu(gate) * up computed in the down "
                         "projection's activation quantization, swiglu_quant.py)")
parser.add_argument("--norm-quant", action="store_true",
                    help="also time lowbit with options={'norm_quant': True} (residual add + RMSNorm inside the next "
                         "activation quantization, norm_quant.py), and with swiglu_quant as well")
parser.add_argument("--no-inductor-pdl", action="store_true",
                    help="also time lowbit with options={'inductor_pdl': False} (Inductor's kernels as plain launches)")
parser.add_argument("--fp16-pdl", action="store_true",
                    help="also time FP16 with Inductor's programmatic dependent launches "
                         "(options={'triton.enable_pdl': True}, what lowbit's inductor_pdl turns on)")
parser.add_argument("--no-decode-attention", action="store_true",
                    help="also time lowbit with SDPA for decode attention (options={'decode_attention': False}; "
                         "the default runs the split-key kernel)")
parser.add_argument("--fp16-decode-attention", action="store_true",
                    help="also time the FP16 model with the decode-attention kernel (through lowbit without a "
                         "recipe: nothing quantized, only attention lowered), compared with the default lowbit run")
parser.add_argument("--l2-prefetch", nargs="*", default=[], metavar="MODE[:MB]",
                    help="also time lowbit with DISPATCH.l2_prefetch = MODE ('end' / 'start') and l2_prefetch_mb = MB "
                         "(default: the dispatch's), one run each: the GEMV prefetches the next linear's weights")
parser.add_argument("--interleave", type=int, default=0, metavar="R",
                    help="after each batch size's runs, R rounds timing the captured FP16 step and each lowbit run's "
                         f"in turn ({STEPS} replays each; FP16 first in even rounds, last in odd ones): every lowbit "
                         "run's speed-up per round (median, min, max), all sides timed seconds apart on one machine")
parser.add_argument("--profile", action="store_true",
                    help="profile a few replayed steps of each model: GPU time per step by kernel kind")
args = parser.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = dev.type == "cuda"
torch.manual_seed(0)
t_start = time.time()
log = print

# 1. The model: random fp16 weights (HF init, std 0.02), and its W4A8 module form (same codes as RTN).
config = transformers.LlamaConfig(**(SHAPE_TINY if args.tiny else SHAPE_7B), tie_word_embeddings=False)
config._attn_implementation = "sdpa"
dtype = torch.float16 if gpu else torch.float32
with torch.device(dev):
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
qmodel = quantize_linears(model, RECIPE)
log(f"[{time.time() - t_start:4.0f}s] model built: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
    f"{torch.cuda.get_device_name() if gpu else 'cpu'}, torch {torch.__version__}, "
    f"transformers {transformers.__version__}")
CACHE_ARG = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(batch):
    return transformers.StaticCache(config=config, max_cache_len=CACHE_LEN, max_batch_size=batch, device=dev,
                                    dtype=dtype)


def pin_positions(cache, pos):
    """Make the (prefilled) static cache write each step's K/V at ``pos``, our own static position tensor,
    instead of its internal running counter, so replaying a captured step at reset positions stays in
    bounds and the decode step's inputs are only (ids, pos)."""
    def update(layer, key_states, value_states, *args, **kwargs):
        layer.keys.index_copy_(2, pos.view(-1), key_states)
        layer.values.index_copy_(2, pos.view(-1), value_states)
        return layer.keys, layer.values

    for layer in cache.layers:
        layer.update = types.MethodType(update, layer)


def make_step(m, cache):
    kv_pos = torch.arange(CACHE_LEN, device=dev)

    def step(ids, pos):  # ids [B, 1], pos [1, 1] -> next ids [B, 1] (greedy), logits [B, V]
        mask = (kv_pos <= pos.view(-1, 1))[None, None]  # [1, 1, 1, L]: causal over the static cache
        logits = m(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                   **{CACHE_ARG: cache}).logits[:, -1]
        return logits.argmax(-1, keepdim=True), logits
    return step


def eager_step_logits(m, batch, prompt):
    """The first decode step's logits, eager (for the lowbit model: the reference QDQ ops)."""
    cache = new_cache(batch)
    with torch.no_grad():
        m(input_ids=prompt, use_cache=True, **{CACHE_ARG: cache})
        pos = torch.full((1, 1), PROMPT, device=dev, dtype=torch.long)
        pin_positions(cache, pos)
        return make_step(m, cache)(prompt[:, -1:].clone(), pos)[1].float()


def decode_run(m, batch, backend, options=None, label=None, keep=False):
    """Prefill eagerly, compile the decode step, capture it in a CUDA graph (``label``: its profile's name).
    ``keep``: keep the captured step in ``KEPT[(batch, label or backend)]`` as a timer (``timer(rounds)`` ->
    seconds per step of each round), for ``--interleave``.

    Returns (tokens/s, first-step logits, compile seconds, first-step logits of eager ``m``)."""
    prompt = torch.randint(0, config.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(1)).to(dev)
    ref_logits = eager_step_logits(m, batch, prompt)
    cache = new_cache(batch)
    with torch.no_grad():
        m(input_ids=prompt, use_cache=True, **{CACHE_ARG: cache})  # prefill (eager, not timed)
        ids = prompt[:, -1:].clone()
        pos = torch.full((1, 1), PROMPT, device=dev, dtype=torch.long)
        pin_positions(cache, pos)
        torch._dynamo.reset()
        step = torch.compile(make_step(m, cache), backend=backend, dynamic=False, options=options)
        t0 = time.time()
        first_logits = step(ids, pos)[1].float().clone()  # compiles (and autotunes, packs weights) here
        for _ in range(2):
            pos += 1
            step(ids, pos)
        compile_s = time.time() - t0
        if not gpu:
            return float("nan"), first_logits, compile_s, ref_logits
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # one decode step: model + argmax + feed back + advance the position
            nxt, _ = step(ids, pos)
            ids.copy_(nxt)
            pos.add_(1)
        prof = profile_steps(graph, pos) if args.profile else None

        def timer(rounds, graph=graph, pos=pos, _alive=(cache, ids, step)):  # what the graph reads stays alive
            secs = []
            for _ in range(rounds):
                pos.fill_(PROMPT + 3)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(STEPS):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                secs.append(start.elapsed_time(end) / 1e3 / STEPS)
            return secs

        secs = timer(5)  # seconds per step, each of 5 rounds of STEPS replays
        if keep:
            KEPT[(batch, label or backend)] = timer
        del graph, timer
    if prof is not None:
        PROFILES[(batch, label or backend)] = (prof, statistics.median(secs))
        log(f"  {label or backend}, top kernels per step: " + "; ".join(
            f"{name[:60]} {us:.0f} us ({n:.0f})" for us, n, name in TOP_KERNELS[-1][:10]))
    return batch / statistics.median(secs), first_logits, compile_s, ref_logits


def gpu_state() -> str:
    """The GPU's SM clock, temperature and power draw now (NVML through torch), or why not."""
    if not gpu:
        return "n/a (CPU)"
    try:
        return (f"{torch.cuda.clock_rate()} MHz, {torch.cuda.temperature()} C, "
                f"{torch.cuda.power_draw() / 1000:.0f} W")
    except Exception as exc:  # no NVML bindings: say so instead of failing the run
        return f"(clock / temperature unavailable: {type(exc).__name__})"


def rel_diff(a, ref) -> float:
    """``|a - ref| / |ref|`` (Frobenius norms) of two logit tensors."""
    return ((a - ref).norm() / ref.norm()).item()


INTERLEAVED = {}  # batch -> {lowbit run: (speed-up of each --interleave round, median tok/s)}
INTERLEAVED_FP16 = {}  # batch -> (FP16 median tok/s over the --interleave rounds, GPU state before, after)
KEPT = {}  # (batch, label or backend) -> timer of a kept captured step (decode_run(keep=True)), for --interleave
PROFILES = {}  # (batch, backend) -> ({kind: (µs per step, kernels per step)}, seconds per step)
TOP_KERNELS = []  # per profiled run, in run order: [(µs per step, launches per step, kernel name)], largest first


KINDS = [  # (kind, substrings of the kernel name), first match wins
    ("W4A8 GEMV (ours)", ("w4_gemv",)), ("W4A8 tiled GEMM (ours)", ("w4_gemm",)),
    ("activation quantization (ours)", ("quantize_rows", "quantize_kernel", "_quantize")),
    ("cuBLAS / CUTLASS GEMM, GEMV", ("gemm", "gemv", "sm90_", "cutlass", "splitk", "xmma", "s16816")),
    ("decode attention (ours)", ("decode_attention",)),
    ("attention (SDPA)", ("fmha", "flash", "attention", "efficient")),
    ("Inductor fused (norms, rotary, residual, softmax...)", ("triton_",)),
]


def kind_of(name):
    low = name.lower()
    if low.startswith("triton_"):  # Inductor's kernels, named after the ops they fuse ("..._attention_...")
        return KINDS[-1][0]
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def profile_steps(graph, pos, steps=8):
    """Replay the captured step ``steps`` times under the profiler: {kind: (µs per step, kernels per step)}."""
    from torch.profiler import ProfilerActivity, profile
    pos.fill_(PROMPT + 3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    TOP_KERNELS.append(sorted(((getattr(e, "self_device_time_total", 0.0) / steps, e.count / steps, e.key)
                               for e in averages if getattr(e, "self_device_time_total", 0.0) > 0), reverse=True))
    return kinds_per_step(averages, steps)


def kinds_per_step(averages, steps):
    """``{kind: (µs per step, kernels per step)}`` from profiler averages (one entry per kernel name; only
    kernels carry GPU time of their own)."""
    out = {}
    for entry in averages:
        us = getattr(entry, "self_device_time_total", 0.0)
        if us > 0:
            kind = kind_of(entry.key)
            total, n = out.get(kind, (0.0, 0.0))
            out[kind] = (total + us / steps, n + entry.count / steps)
    return out


def log_choices(batch, run):
    """The decode paths the dispatch chose for this batch's M bucket under the current switches, by site."""
    from qcompile.backends.triton.w4_linear import dispatch_choices
    choices = dispatch_choices(batch)
    if choices:
        log(f"         B={batch} {run}: dispatch choices: "
            + ", ".join(f"{site} {path}" for site, path in sorted(choices.items())))


def linear_bytes():
    """(fp16 bytes of the quantized linears, bytes of their packed weights, of the graph codes)."""
    fp16 = packed = codes = 0
    by_id = {id(pw.qweight): pw for pw in codes_ops.cached_packed_weights()}
    for mod in qmodel.modules():
        if isinstance(mod, QuantizedLinear):
            fp16 += mod.out_features * mod.in_features * 2
            codes += sum(t.numel() * t.element_size() for t in (mod.codes, mod.scale, mod.zero_point))
            pw = codes_ops.packed_for_codes(mod.codes, mod.scale, mod.zero_point, mod.fmt, mod.granularity,
                                            mod.in_features)
            packed += by_id.get(id(pw.qweight), pw).nbytes()
    return fp16, packed, codes


# Extra lowbit runs beside the default: (name, backend options, DISPATCH fields to set for the run).
VARIANTS = [v for on, v in [
    (args.inductor_quant, ("inductor_quant on", {"inductor_quant": True}, {})),
    (args.no_pdl, ("no PDL", None, {"gemv_pdl": False})),
    (args.no_prefetch2, ("no PREFETCH 2", None, {"gemv_prefetch2": False})),
    (args.no_direct, ("no direct", None, {"gemv_direct": False})),
    (args.direct_rows, ("per-row GEMV", None, {"gemv_direct_rows": True})),
    (args.no_rows_candidate, ("no per-row GEMV candidate", None, {"gemv_rows_candidate": False})),
    (args.no_ksplit, ("no k-split decode GEMM candidate", None, {"ksplit_candidate": False})),
    (args.no_ksplit_lut, ("k-split arithmetic unpacker", None, {"ksplit_lut": False})),
    (args.ksplit_pdl, ("k-split PDL", None, {"ksplit_pdl": True})),
    (args.no_inductor_pdl, ("no Inductor PDL", {"inductor_pdl": False}, {})),
    (args.no_decode_attention, ("SDPA attention", {"decode_attention": False}, {})),
    (args.swiglu_quant, ("swiglu_quant on", {"swiglu_quant": True}, {})),
    (args.norm_quant, ("norm_quant on", {"norm_quant": True}, {})),
    (args.norm_quant, ("norm_quant + swiglu_quant on", {"norm_quant": True, "swiglu_quant": True}, {})),
] if on]
for spec in args.l2_prefetch:
    mode, _, mb = spec.partition(":")
    mb = float(mb) if mb else DISPATCH.l2_prefetch_mb
    VARIANTS.append((f"L2 prefetch {mode} {mb:g} MB", None, {"l2_prefetch": mode, "l2_prefetch_mb": mb}))
# Extra FP16 runs beside the default, each compared with the default lowbit run: (name, backend, options).
FP16_VARIANTS = [v for on, v in [
    (args.fp16_pdl, ("FP16, Inductor PDL", "inductor", {"triton.enable_pdl": True})),
    (args.fp16_decode_attention, ("FP16, decode attention", "lowbit", {"decode_attention": True})),
] if on]

# 2. Decode, FP16 then lowbit, for each batch size; the first step's logits are compared with the
#    eager reference module form (same codes, reference QDQ ops).
rows = []
for batch in args.batch:
    keep = args.interleave > 0 and gpu
    tps16, logits16, c16, _ = decode_run(model, batch, "inductor", keep=keep)
    log(f"[{time.time() - t_start:4.0f}s] B={batch} fp16: {tps16:8.1f} tok/s (compile {c16:.0f}s); GPU {gpu_state()}")
    extras16 = {}  # FP16 variant name -> (tok/s, first-step logits rel. diff from the default FP16 run)
    for name, backend, options in FP16_VARIANTS:
        tps_v, logits_v, _, _ = decode_run(model, batch, backend, options, name)
        extras16[name] = (tps_v, rel_diff(logits_v, logits16))
        log(f"[{time.time() - t_start:4.0f}s] B={batch} {name}: {tps_v:8.1f} tok/s; first-step logits vs the "
            f"default FP16 run: rel. diff {extras16[name][1]:.1e}")
    tps4, logits4, c4, ref4 = decode_run(qmodel, batch, "lowbit", keep=keep)
    report = dynamo.last_report()
    err = rel_diff(logits4, ref4)
    log(f"[{time.time() - t_start:4.0f}s] B={batch} lowbit: {tps4:8.1f} tok/s (compile {c4:.0f}s); {report.summary()}; "
        f"first-step logits vs the eager reference: rel. err {err:.1e}; GPU {gpu_state()}")
    log_choices(batch, "lowbit")
    extras = {}  # variant name -> (tok/s, first-step logits rel. diff from the default lowbit run)
    for name, options, fields in VARIANTS:
        saved = {f: getattr(DISPATCH, f) for f in fields}
        for f, value in fields.items():
            setattr(DISPATCH, f, value)
        try:
            tps_v, logits_v, _, _ = decode_run(qmodel, batch, "lowbit", options, f"lowbit {name}", keep=keep)
            log_choices(batch, f"lowbit, {name}")
        finally:
            for f, value in saved.items():
                setattr(DISPATCH, f, value)
        extras[name] = (tps_v, rel_diff(logits_v, logits4))
        log(f"[{time.time() - t_start:4.0f}s] B={batch} lowbit, {name}: {tps_v:8.1f} tok/s; first-step logits vs the "
            f"default lowbit run: rel. diff {extras[name][1]:.1e}; {dynamo.last_report().summary()}")
    if keep:  # FP16 and every lowbit run, one after another, R rounds: each lowbit run's speed-up per round
        # (a round's FP16 time over that round's lowbit time)
        timers = {"FP16": KEPT.pop((batch, "inductor")), "lowbit": KEPT.pop((batch, "lowbit"))}
        timers.update((name, KEPT.pop((batch, f"lowbit {name}"))) for name, _, _ in VARIANTS)
        secs = {name: [] for name in timers}
        state0 = gpu_state()
        order = list(timers)
        for r in range(args.interleave):  # FP16 first in even rounds, last in odd ones: no side always follows
            for name in (order if r % 2 == 0 else order[::-1]):  # the same other one
                secs[name].append(timers[name](1)[0])
        state1 = gpu_state()
        del timers
        INTERLEAVED[batch] = {name: ([a / b for a, b in zip(secs["FP16"], s)], batch / statistics.median(s))
                              for name, s in secs.items() if name != "FP16"}
        INTERLEAVED_FP16[batch] = (batch / statistics.median(secs["FP16"]), state0, state1)
        log(f"[{time.time() - t_start:4.0f}s] B={batch} interleaved, {args.interleave} rounds: FP16 "
            f"{INTERLEAVED_FP16[batch][0]:.1f} tok/s (its own run above: {tps16:.1f}); GPU {state0} "
            f"before, {state1} after")
        for name, (rs, tps) in INTERLEAVED[batch].items():
            log(f"[{time.time() - t_start:4.0f}s] B={batch} interleaved, {name}: {tps:.1f} tok/s, speed-up median "
                f"{statistics.median(rs):.2f}x, min {min(rs):.2f}x, max {max(rs):.2f}x")
    rows.append((batch, tps16, tps4, c16, c4, logits16, logits4, report, err, extras, extras16))
    if gpu:
        torch.cuda.empty_cache()

fp16_b, packed_b, codes_b = linear_bytes()
mem = torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else float("nan")
lines = [f"Decode with a StaticCache, {'LLaMA-2-7B' if not args.tiny else 'tiny'}-shaped LLaMA, random fp16 weights, "
         f"prompt {PROMPT}, {STEPS} greedy steps per timing (one CUDA graph per step, median of 5). "
         f"{torch.cuda.get_device_name() if gpu else 'CPU'}; torch {torch.__version__}. W4A8 = {RECIPE} "
         "(dINT4 per-channel, int8 per-token), lm_head fp16 in both.", "",
         "| batch | FP16 tok/s | lowbit W4A8 tok/s | speed-up | compile s (fp16 / lowbit) | lowered linears |"
         + "".join(f" lowbit, {name} | its speed-up |" for name, _, _ in VARIANTS)
         + "".join(f" {name} tok/s | lowbit vs it |" for name, _, _ in FP16_VARIANTS),
         "|---:|---:|---:|---:|---:|---|" + "---:|---:|" * (len(VARIANTS) + len(FP16_VARIANTS))]
for batch, tps16, tps4, c16, c4, _, _, report, _, extras, extras16 in rows:
    lines.append(f"| {batch} | {tps16:.1f} | {tps4:.1f} | {tps4 / tps16:.2f}x | {c16:.0f} / {c4:.0f} | "
                 f"{len(report.lowered)}/{len(report.sites)} |"
                 + "".join(f" {tps:.1f} | {tps / tps16:.2f}x |" for tps, _ in extras.values())
                 + "".join(f" {tps:.1f} | {tps4 / tps:.2f}x |" for tps, _ in extras16.values()))
lines += ["", f"Quantized linear weights: packed {packed_b / 1e9:.3f} GB = {packed_b / fp16_b:.3f}x their FP16 bytes "
          f"({fp16_b / 1e9:.3f} GB; target <= 0.27x). The module form also keeps the graph-form codes "
          f"({codes_b / 1e9:.3f} GB) the packed copy is made from. Peak GPU memory {mem:.1f} GiB (both models).",
          f"Target: >= 2.5x at batch 1. Total {time.time() - t_start:.0f}s."]
for batch, by_run in INTERLEAVED.items():
    tps16_i, state0, state1 = INTERLEAVED_FP16[batch]
    lines.append(f"B={batch}, FP16 and the lowbit runs timed one after another, {args.interleave} rounds of {STEPS} "
                 f"steps each: FP16 {tps16_i:.1f} tok/s (median; GPU {state0} before the rounds, {state1} after).")
    for name, (ratios, tps) in by_run.items():
        lines.append(f"B={batch}, interleaved, {name}: {tps:.1f} tok/s; vs FP16: speed-up median "
                     f"{statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x "
                     f"(every round: {', '.join(f'{r:.2f}' for r in ratios)}).")
for batch, _, _, _, _, l16, l4, report, err, extras, extras16 in rows:
    lines.append(f"B={batch}: first-step logits, lowbit vs the eager reference QDQ module form (same codes): rel. err "
                 f"{err:.1e}; vs the FP16 model: rel. diff {rel_diff(l4, l16):.3f} "
                 "(quantization error of random weights)"
                 + "".join(f"; {name} vs default: rel. diff {diff:.1e}" for name, (_, diff) in extras.items())
                 + "".join(f"; {name} vs FP16: rel. diff {diff:.1e}" for name, (_, diff) in extras16.items())
                 + f". Report: {report.summary()}")
if PROFILES:  # one table per batch size: a column per model
    for batch in args.batch:
        runs = [(name, PROFILES[(b, name)]) for b, name in PROFILES if b == batch]
        kinds = sorted({k for _, (prof, _) in runs for k in prof},
                       key=lambda k: -max(prof.get(k, (0, 0))[0] for _, (prof, _) in runs))
        lines += ["", (f"Where a decode step's GPU time goes, batch {batch} (torch.profiler over 8 replays of the "
                       "captured step; µs per step, kernels per step in brackets; wall = the timed step):"), "",
                  "| kernel kind | " + " | ".join(name for name, _ in runs) + " |", "|---|" + "---:|" * len(runs)]
        for k in kinds:
            lines.append(f"| {k} | " + " | ".join(
                f"{prof.get(k, (0, 0))[0]:.0f} ({prof.get(k, (0, 0))[1]:.0f})" for _, (prof, _) in runs) + " |")
        lines.append("| sum of kernel times | " + " | ".join(
            f"{sum(v[0] for v in prof.values()):.0f} ({sum(v[1] for v in prof.values()):.0f})" for _, (prof, _) in runs)
            + " |")
        lines.append("| wall per step (timed) | " + " | ".join(f"{sec * 1e6:.0f}" for _, (_, sec) in runs) + " |")
table = "\n".join(lines)
print(table)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "bench_decode.md"), "w") as f:
        f.write(table + "\n")
