"""Benchmark the ONNX export under onnxruntime (CPU): fast-form W4A8 vs the FP32 export of the same model.

Model: the default SmolLM2-135M (LLaMA: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads,
vocab 49152, tied embeddings) when `qcompile assets fetch` has run, else a random-weight LlamaConfig
of the same shapes (said in the output). Each recipe is quantized (RTN, no calibration) and exported in
both forms from one trace; the FP32 model is exported through the same torch.onnx path.
Latency: batch 1 x sequence 512 (prefill) and single-token decode without cache (sequence 1), at 1 and
2 intra-op threads, every variant in the same loop (interleaved), median of REPS runs.
Accuracy: EVAL_WINDOWS windows of EVAL_WINDOW tokens of the Wikipedia sample (random tokens for a
random model): logits and perplexity of exact / fast ONNX vs the PyTorch reference, whose attention runs
PyTorch's SDPA "math" kernel (the MatMul -> Softmax -> MatMul formula the graph holds; onnx_parity's
default), and the exact form also vs PyTorch's default SDPA kernel. As a yardstick for float noise, the
reference with the math kernel is compared with itself on the default kernel.

    python examples/bench_onnx.py           # also writes $OUT/bench_onnx.md when OUT is set
"""
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import qcompile
from qcompile.backends.onnx.export import export_onnx_forms
from qcompile.backends.onnx.markers import trace_to_onnx
from qcompile.backends.onnx.parity import onnx_parity, ort_session
from qcompile.capture import capture

RECIPES = ["w4a8v4-rtn-int4", "w4a8-rtn-dint4"]
SHAPES = [(1, 512), (1, 1)]          # (batch, sequence)
THREADS = [1, 2]
REPS = {512: 10, 1: 50}              # timed runs per variant, by sequence length
EVAL_WINDOWS, EVAL_WINDOW = 8, 2048
OUT = os.environ.get("OUT")
torch.manual_seed(0)
torch.set_num_threads(1)
cpu = platform.machine()
if Path("/proc/cpuinfo").exists():
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), cpu)
load_before = os.getloadavg()

# 1. the model: the real default model if its assets are present, else random weights of its shapes
try:
    model, tokenizer = qcompile.load_model("default"), qcompile.load_tokenizer("default")
    source = "SmolLM2-135M-Instruct (real weights)"
except Exception as e:  # noqa: BLE001 - any asset/model problem falls back to random weights, said below
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                   rope_theta=100000.0)
    model, tokenizer = transformers.LlamaForCausalLM(cfg).eval(), None
    source = f"random weights of SmolLM2-135M's shapes (default model not loadable: {type(e).__name__})"
print(f"model: {source}; CPU: {cpu} ({os.cpu_count()} cores); onnxruntime {onnxruntime.__version__}", flush=True)

# 2. export: the FP32 model, then each recipe in the exact and the fast form
workdir = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
t0 = time.perf_counter()
ir.save(trace_to_onnx(capture(model), 21), workdir / "fp32.onnx")
print(f"FP32 export {time.perf_counter() - t0:.0f} s", flush=True)
quantized, paths = {}, {"fp32": workdir / "fp32.onnx"}
for recipe in RECIPES:
    t0 = time.perf_counter()
    quantized[recipe] = qcompile.quantize(model, recipe, progress=False)
    for form, path in export_onnx_forms(quantized[recipe], {"exact": workdir / f"{recipe}.exact.onnx",
                                                            "fast": workdir / f"{recipe}.fast.onnx"}).items():
        paths[f"{recipe} {form}"] = path
    print(f"{recipe}: quantize + export {time.perf_counter() - t0:.0f} s", flush=True)
print("files: " + ", ".join(f"{k} {p.stat().st_size / 2**20:.0f} MiB" for k, p in paths.items()), flush=True)


# 3. latency: all variants in one loop (interleaved, so load changes hit all alike); exact runs with
#    onnxruntime's defaults (it fuses the int4 DequantizeLinear + MatMul into MatMulNBits, int8 inside)
def median_ms(sessions: dict, ids: np.ndarray, reps: int) -> dict:
    for s in sessions.values():
        s.run(None, {"input_ids": ids})
    times = {k: [] for k in sessions}
    for _ in range(reps):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"input_ids": ids})
            times[name].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


rows = []
for threads in THREADS:
    sessions = {k: ort_session(p, threads, qdq_accuracy_level=None) for k, p in paths.items()}
    for batch, seq in SHAPES:
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)).astype(np.int64)
        ms = median_ms(sessions, ids, REPS[seq])
        rows.append((threads, batch, seq, ms))
        print(f"threads {threads} [{batch}x{seq}] " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()), flush=True)
    del sessions
load_after = os.getloadavg()

# 4. accuracy on the same windows: PyTorch reference, the SDPA-math yardstick, exact and fast ONNX
if tokenizer is not None:
    from qcompile.assets import read_text
    from qcompile.evaluate import encode
    tokens, text_name = torch.tensor(encode(tokenizer, read_text("wiki"))), "Wikipedia sample"
else:
    tokens, text_name = torch.randint(0, model.config.vocab_size, (EVAL_WINDOWS * EVAL_WINDOW,)), "random tokens"
windows = tokens[: EVAL_WINDOWS * EVAL_WINDOW].view(EVAL_WINDOWS, EVAL_WINDOW)
batches = list(windows.split(1))
fp_ppl = qcompile.perplexity(model, windows.flatten(), window=EVAL_WINDOW, progress=False)["ppl"]


def nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum"))


def sdpa_math_yardstick(qm) -> dict:
    """The reference vs itself with PyTorch's other attention kernel: the scale of float-order noise."""
    err_max = err_sum = nll_ref = nll_alt = 0.0
    with torch.no_grad():
        for ids in batches:
            ref = qm(ids)
            with sdpa_kernel(SDPBackend.MATH):
                alt = qm(ids)
            diff = (alt - ref).abs()
            err_max, err_sum = max(err_max, float(diff.max())), err_sum + float(diff.double().sum())
            nll_ref, nll_alt = nll_ref + nll(ref, ids), nll_alt + nll(alt, ids)
    n = len(batches) * (EVAL_WINDOW - 1)
    return {"ppl_reference": math.exp(nll_ref / n), "ppl_onnx": math.exp(nll_alt / n),
            "ppl_rel_diff": math.exp((nll_alt - nll_ref) / n) - 1, "max_abs_logit_error": err_max,
            "mean_abs_logit_error": err_sum / (len(batches) * EVAL_WINDOW * model.config.vocab_size)}


accuracy = []
for recipe, qm in quantized.items():
    accuracy.append((recipe, "PyTorch math kernel vs PyTorch default kernel (yardstick)", sdpa_math_yardstick(qm)))
    accuracy.append((recipe, "exact", onnx_parity(qm, paths[f"{recipe} exact"], batches, threads=2)))
    accuracy.append((recipe, "exact vs PyTorch's default SDPA kernel",
                     onnx_parity(qm, paths[f"{recipe} exact"], batches, threads=2, attention="default")))
    accuracy.append((recipe, "exact, onnxruntime defaults", onnx_parity(qm, paths[f"{recipe} exact"], batches,
                                                                          threads=2, qdq_accuracy_level=None)))
    accuracy.append((recipe, "fast", onnx_parity(qm, paths[f"{recipe} fast"], batches, threads=2)))
    print(f"{recipe}: accuracy done", flush=True)

# 5. the tables
lines = [(f"onnxruntime {onnxruntime.__version__} (CPU provider) on {cpu}, {os.cpu_count()} cores; load average "
          f"{load_before[0]:.1f} before / {load_after[0]:.1f} after timing; model {source}; float32 logits; "
          "ms = median of interleaved runs; `exact` as onnxruntime runs it by default."), "",
         "| threads | batch x seq | FP32 ms | recipe | exact ms | fast ms | fast speed-up vs FP32 |",
         "|---:|---|---:|---|---:|---:|---:|"]
for threads, batch, seq, ms in rows:
    for recipe in RECIPES:
        lines.append(f"| {threads} | {batch} x {seq} | {ms['fp32']:.1f} | {recipe} | {ms[f'{recipe} exact']:.1f} | "
                     f"{ms[f'{recipe} fast']:.1f} | {ms['fp32'] / ms[f'{recipe} fast']:.2f}x |")
lines += ["", f"Accuracy: {EVAL_WINDOWS} windows x {EVAL_WINDOW} tokens ({text_name}); FP32 PyTorch ppl {fp_ppl:.3f}.",
          "", "| recipe | run | ppl reference | ppl run | rel. diff | max abs logit err | mean abs logit err |",
          "|---|---|---:|---:|---:|---:|---:|"]
for recipe, run, r in accuracy:
    lines.append(f"| {recipe} | {run} | {r['ppl_reference']:.3f} | {r['ppl_onnx']:.3f} | {r['ppl_rel_diff']:+.2%} | "
                 f"{r['max_abs_logit_error']:.2e} | {r['mean_abs_logit_error']:.2e} |")
table = "\n".join(lines)
print("\n" + table)
if OUT:
    Path(OUT, "bench_onnx.md").write_text(table + "\n")
shutil.rmtree(workdir)  # ~1.3 GB of ONNX files
