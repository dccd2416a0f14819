"""Scale benchmark: offloaded W4A8V4 AQAS + OPTQ calibration of LLaMA-2-7B and -13B-shaped models.

The models have random fp16 weights made from their configs (no download): weights in CPU memory,
one decoder block at a time on the GPU (``qcompile.calibration.offload.Offload``), calibration on
128 x 512 random-token windows. Per model it reports the wall time of every stage, the time per
block and the peak GPU memory; a model run on fewer blocks than it has is extrapolated from its
steady per-block time (said so in the table). From the measured per-block costs it writes a paper
estimate for LLaMA-2-70B on 1, 2, 4 and 8 GPUs (data-parallel, ``qcompile.calibration.distributed``).

    python examples/bench_scale.py                          # GPU: 7B then 13B, every block
    python examples/bench_scale.py --models 7b:4            # 7B, first 4 blocks only
    torchrun --nproc-per-node 1 examples/bench_scale.py --dp-smoke   # NCCL data-parallel smoke run
    python examples/bench_scale.py --report scale.json      # (any machine) rewrite the markdown

Results go to $OUT/scale.json (after every model) and examples/results/scale.md (or $OUT/scale.md).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from qcompile.calibration.distributed import NO_MULTICAST, init_from_env
from qcompile.calibration.offload import Offload
from qcompile.recipes import PRESETS, Recipe

SHAPES = {  # LLaMA-2 configs (hidden, MLP, blocks, heads, KV heads)
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
           "num_key_value_heads": 40},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2},  # a CPU dry run of this script
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
           "num_key_value_heads": 8},
}
VOCAB = 32000
N_SAMPLES, SEQ_LEN, MICRO_BATCH = 128, 512, 8
PRESET = "w4a8v4-aqas-optq-dint4"
RECIPE = PRESETS.get(PRESET) or Recipe(PRESET, weight_format="dint4", act_format="int8", v_format="int4",
                                        scaling="aqas", scale_criterion="max", rounding="optq")
NVLINK_BUS_GBS = 350.0  # assumed NCCL all-reduce bus bandwidth on H100 NVLink (not measured here)
OUT = Path(os.environ.get("OUT", "examples/results"))
for _k, _v in NO_MULTICAST.items():
    os.environ.setdefault(_k, _v)


def build_model(shape: dict, n_layers: int, seed: int = 0):
    """LLaMA ``shape`` with ``n_layers`` blocks, random fp16 weights in CPU memory (drawn on the GPU)."""
    import transformers

    cfg = transformers.LlamaConfig(**{**shape, "num_hidden_layers": n_layers}, vocab_size=VOCAB,
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.float16)
    model.to_empty(device="cpu")
    gen_dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            t = torch.empty(p.shape, dtype=torch.float16, device=gen_dev)
            if p.dim() == 1:  # RMSNorm gains around 1
                t.uniform_(0.8, 1.2, generator=g)
            else:
                t.normal_(0.0, cfg.initializer_range, generator=g)
            p.copy_(t)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # its buffers were on meta
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    return model.eval()


def block_facts(shape: dict) -> dict:
    """Per-block work drivers: parameters, sum of K^2 over the Hessians, OPTQ columns, largest K."""
    c, f = shape["hidden_size"], shape["intermediate_size"]
    kv = c * shape["num_key_value_heads"] // shape["num_attention_heads"]
    linears = [(c, c), (kv, c), (kv, c), (c, c), (f, c), (f, c), (c, f)]  # (N, K): q k v o gate up down
    return {"params": sum(n * k for n, k in linears), "sum_k2": sum(k * k for _, k in linears),
            "columns": sum(k for _, k in linears), "k_max": max(k for _, k in linears),
            "rows_k": {f"{n}x{k}": k for n, k in linears}, "ks": [k for _, k in linears]}


class LoggedOffload(Offload):
    """Offload that prints a line every few blocks and saves partial results (a cut run still counts)."""

    def __init__(self, on_block, **kw):
        super().__init__(**kw)
        self.on_block = on_block

    def propagate(self, layer, inputs):
        out = super().propagate(layer, inputs)
        self.on_block(self)
        return out


def run_model(name: str, n_blocks: int, spill: bool, results: dict, dev: torch.device) -> dict:
    from qcompile.calibration.engine import calibrate

    shape = SHAPES[name]
    t = time.perf_counter()
    model = build_model(shape, n_blocks)
    build_s = time.perf_counter() - t
    batches = torch.randint(0, VOCAB, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    row = {"model": f"llama2-{name}", "blocks_run": n_blocks, "blocks_full": shape["num_hidden_layers"],
           "spill": spill, "build_s": round(build_s, 1), "recipe": RECIPE.name, "samples": N_SAMPLES,
           "seq_len": SEQ_LEN, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    t0 = time.perf_counter()

    def on_block(pl):
        row.update(block_seconds=[round(s, 3) for s in pl.block_seconds], peak_alloc_gib=pl.peak_bytes / 2**30,
                   block_stages=[{k: round(v, 3) for k, v in st.items()} for st in pl.block_stages],
                   elapsed_s=time.perf_counter() - t0)
        results[name] = row
        save(results)
        i = len(pl.block_seconds)
        if i % 4 == 0 or i == n_blocks:
            print(f"  {name} block {i}/{n_blocks}: {pl.block_seconds[-1]:.2f} s/block, elapsed "
                  f"{row['elapsed_s']:.0f} s, peak {row['peak_alloc_gib']:.2f} GiB", flush=True)

    placement = LoggedOffload(on_block, spill=spill)
    res = calibrate(model, RECIPE, batches, progress=False, device=dev, micro_batch=MICRO_BATCH,
                    placement=placement)
    row.update(calib_s=time.perf_counter() - t0, stages={k: round(v, 2) for k, v in res.seconds.items()},
               peak_alloc_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0,
               peak_reserved_gib=torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else 0.0,
               n_codes=len(res.weights))
    results[name] = row
    save(results)
    del model, res
    return row


def save(results: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scale.json").write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------------------------------- report
STAGES = ("load", "stats", "search", "rounding", "propagate")
# Per-block seconds of the non-rounding stages of the 7B shape, used only when a run did not record its
# stage split (the first H200 run predates Offload.block_stages). From counts: load 0.4 GB H2D; stats
# = 16 micro-batch forwards + float64 Hessian GEMMs (~30 TFLOP at ~50 TFLOP/s); search = 4 groups x
# 20 alphas of fp32 Q(W s) Q(x/s) on 4096 tokens (~33 TFLOP at ~50 TFLOP/s + fake-quant passes);
# propagate = fake-quant + 16 forwards + spill copies. Rounding is the rest of the measured block time.
MODELED_7B_SPLIT = {"load": 0.1, "stats": 1.0, "search": 1.5, "propagate": 0.5}


def steady_block_s(row: dict) -> float:
    """Mean block wall time after the first (the first carries CUDA/cuBLAS warm-up)."""
    steady = row["block_seconds"][1:] or row["block_seconds"]
    return sum(steady) / len(steady)


def blocks_done(row: dict) -> int:
    return len(row["block_seconds"])


def measured_s(row: dict) -> float:
    return row.get("calib_s", row.get("elapsed_s", 0.0))


def full_seconds(row: dict) -> float:
    """Measured wall time, or for a cut/partial run: measured + mean steady block x blocks not run."""
    return measured_s(row) + (row["blocks_full"] - blocks_done(row)) * steady_block_s(row)


def block_split(row: dict, name: str) -> tuple[dict, bool]:
    """Steady per-block seconds per stage, and whether it was measured (else modeled, see above)."""
    stages = row.get("block_stages") or []
    steady = stages[1:] or stages
    if steady:
        return {k: sum(s[k] for s in steady) / len(steady) for k in STAGES}, True
    f, ref = block_facts(SHAPES[name]), block_facts(SHAPES["7b"])
    scale = {"load": f["params"] / ref["params"], "stats": f["sum_k2"] / ref["sum_k2"],
             "search": f["params"] / ref["params"], "propagate": f["params"] / ref["params"]}
    split = {k: MODELED_7B_SPLIT[k] * scale[k] for k in MODELED_7B_SPLIT}
    split["rounding"] = max(steady_block_s(row) - sum(split.values()), 0.0)
    return {k: split[k] for k in STAGES}, False


def estimate_70b(split: dict, ref_name: str) -> list[tuple]:
    """Paper estimate of 70B on 1/2/4/8 GPUs from one measured shape's per-block stage split.

    Per block: load scales with parameters (every rank loads every block); stats with sum K^2 (float64
    Hessian GEMMs) and is split over the ranks; scale search (rank 0) with parameters; rounding with
    OPTQ columns (a launch-bound column loop), each linear on one rank (longest first), so a rank's
    share is the largest load; propagate with parameters, split over the ranks; plus an all-reduce of
    the float64 Hessians at ``NVLINK_BUS_GBS``. Memory per GPU: ``memory_model``.
    """
    from qcompile.calibration.distributed import assign_owners

    big, small = block_facts(SHAPES["70b"]), block_facts(SHAPES[ref_name])
    r_params, r_k2, r_cols = (big["params"] / small["params"], big["sum_k2"] / small["sum_k2"],
                              big["columns"] / small["columns"])
    rows = []
    for gpus in (1, 2, 4, 8):
        owners = assign_owners({str(i): k for i, k in enumerate(big["ks"])}, gpus)
        share = max(sum(k for i, k in enumerate(big["ks"]) if owners[str(i)] == r) for r in range(gpus))
        comm = 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * big["sum_k2"] * 8 / (NVLINK_BUS_GBS * 1e9)
        stage = {"load": split["load"] * r_params,
                 "stats": split["stats"] * r_k2 / gpus + comm,
                 "search": split["search"] * r_params,
                 "rounding": split["rounding"] * r_cols * share / big["columns"],
                 "propagate": split["propagate"] * r_params / gpus}
        rows.append((gpus, SHAPES["70b"]["num_hidden_layers"] * sum(stage.values()) / 60,
                     memory_model("70b", True), stage))
    return rows


def memory_model(name: str, spill: bool) -> float:
    """Peak GPU GiB of one block: fp16 weights + float64 Hessians of the 7 linears + ~7 K_max^2 float64
    OPTQ temporaries (H copies, damped H, Cholesky, inverse, upper factor of the widest linear) +
    the hidden states (in and out) unless spilled."""
    f = block_facts(SHAPES[name])
    hidden = 0.0 if spill else 2 * N_SAMPLES * SEQ_LEN * SHAPES[name]["hidden_size"] * 2
    return (f["params"] * 2 + f["sum_k2"] * 8 + 7 * f["k_max"] ** 2 * 8 + hidden) / 2**30


def report(results: dict) -> str:
    models = [(k, r) for k, r in results.items() if k in SHAPES]
    first = models[0][1] if models else {}
    lines = [f"## Offloaded calibration at scale ({first.get('device', '?')}, torch {first.get('torch', '?')})", "",
             (f"Recipe `{RECIPE.name}` (W4A8V4: dINT4 per-channel weights, int8 per-token activations, int4 V; "
             f"AQAS scale search + OPTQ), {N_SAMPLES} x {SEQ_LEN} random-token windows, micro-batch "
             f"{MICRO_BATCH}; random fp16 weights in CPU memory, one block on the GPU, hidden states spilled "
             "to pinned CPU memory (`qcompile.calibration.offload.Offload(spill=True)`). "
             "Command: `python examples/bench_scale.py` (or one model a call: `--models 7b`, `--models 13b`)."),
             "", ("| model | blocks measured | measured wall | s / block (steady) | whole model | "
             "peak GPU memory (max allocated) | max reserved |"), "|---|---|---|---|---|---|---|"]
    for name, r in models:
        done, full = blocks_done(r), r["blocks_full"]
        whole = f"**{full_seconds(r) / 60:.1f} min**" + ("" if done == full else f" (est., {full - done} blocks "
                                                                                     "extrapolated)")
        lines.append(f"| {r['model']} | {done}/{full} | {measured_s(r):.0f} s | {steady_block_s(r):.1f} s | "
                     f"{whole} | {r['peak_alloc_gib']:.2f} GiB{r.get('peak_note', '')} | "
                     + (f"{r['peak_reserved_gib']:.2f} GiB |" if "peak_reserved_gib" in r else "- |"))
    lines += ["", "| model | per block: load | stats | scale search | rounding | propagate | split |",
              "|---|---|---|---|---|---|---|"]
    for name, r in models:
        split, measured = block_split(r, name)
        lines.append(f"| {r['model']} | " + " | ".join(f"{split[k]:.2f} s" for k in STAGES)
                     + f" | {'measured' if measured else 'modeled: rounding = block time - the others'} |")
    lines += [""] + [f"Memory formula (block weights fp16 + float64 Hessians + ~7 K_max^2 float64 OPTQ "
                     f"temporaries), {r['model']}: {memory_model(name, r['spill']):.2f} GiB."
                     for name, r in models]
    notes = results.get("notes", [])
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if models:
        ref_name, ref = max(models, key=lambda m: SHAPES[m[0]]["hidden_size"] if m[1].get("block_stages")
                            or m[0] == "7b" else 0)
        split, measured = block_split(ref, ref_name)
        lines += ["", (f"### Paper estimate: LLaMA-2-70B (80 blocks, GQA 8 KV heads) from the {ref['model']} "
                  f"per-block split ({'measured' if measured else 'modeled'})"), "",
                  "| GPUs | calibration | per-GPU memory | per block: load / stats / search / rounding / propagate |",
                  "|---|---|---|---|"]
        for gpus, minutes, mem, stage in estimate_70b(split, ref_name):
            lines.append(f"| {gpus} | {minutes:.0f} min | {mem:.0f} GiB | "
                         + " / ".join(f"{v:.1f}" for v in stage.values()) + " s |")
        big, small = block_facts(SHAPES["70b"]), block_facts(SHAPES[ref_name])
        ratio = {k: big[k] / small[k] for k in ("params", "sum_k2", "columns")}
        lines += ["", ("How: each stage's per-block time is scaled by its work driver (load, scale search, "
                  f"propagate: block parameters, {ratio['params']:.1f}x the {ref['model']} block; stats: sum of "
                  f"K^2 over the Hessians, {ratio['sum_k2']:.1f}x; rounding: OPTQ columns, "
                  f"{ratio['columns']:.1f}x) and multiplied by 80 blocks. Data-parallel over N GPUs "
                  "divides stats and propagate by N, gives each rank the OPTQ of whole linears (longest "
                  "first: the 28672-column down_proj alone bounds rounding at 37% of the columns from 4 "
                  "GPUs on), keeps the scale search on rank 0, and every rank loads every block; the float64 "
                  f"Hessian all-reduce (9.1 GiB a block) is costed at an assumed {NVLINK_BUS_GBS:.0f} GB/s "
                  "NVLink bus bandwidth. Memory is per block, so it does not shrink with N; the 70B weights "
                  "(129 GiB in fp16) exceed a 128 GiB host and would need memory-mapped safetensors.")]
    smoke = results.get("dp_smoke")
    if smoke:
        lines += ["", "### torch.distributed smoke run", "", smoke["summary"] + "."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- NCCL smoke
def dp_smoke(device: str) -> dict:
    """torchrun: data-parallel calibration (NCCL) of a small LLaMA-shaped model == one process, Offload."""
    import torch.distributed as dist

    from qcompile.calibration.engine import calibrate

    hooks = init_from_env()
    if hooks is None:
        raise SystemExit("--dp-smoke runs under torchrun")
    shape = SHAPES["tiny"] if device == "cpu" else {
        "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 2, "num_attention_heads": 16,
        "num_key_value_heads": 4}
    model = build_model(shape, 2)
    batches = torch.randint(0, VOCAB, (16, 256), generator=torch.Generator().manual_seed(2))
    t = time.perf_counter()
    dp = calibrate(model, RECIPE, batches, progress=False, device=device, placement=hooks)
    dp_s = time.perf_counter() - t
    out = {}
    if hooks.rank == 0:
        t = time.perf_counter()
        one = calibrate(model, RECIPE, batches, progress=False, device=device, placement=Offload())
        one_s = time.perf_counter() - t
        same_codes = all(torch.equal(dp.weights[k][0], one.weights[k][0]) for k in one.weights)
        same_scales = all(torch.equal(dp.scales[k], one.scales[k]) for k in one.scales)
        flips = sum(int((dp.weights[k][0] != one.weights[k][0]).sum()) for k in one.weights)
        where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        summary = (f"`torchrun --nproc-per-node {hooks.world} examples/bench_scale.py --dp-smoke` on {where} with "
                   f"{dist.get_backend()}: LLaMA-shaped {shape['hidden_size']}/{shape['intermediate_size']} x 2 "
                   f"blocks (GQA), 16 x 256 tokens: codes identical to the one-process Offload run: "
                   f"{same_codes} ({flips} differing codes), scales identical: {same_scales}; "
                   f"{dp_s:.1f} s data-parallel vs {one_s:.1f} s one process")
        out = {"summary": summary, "same_codes": same_codes, "same_scales": same_scales, "world": hooks.world}
        print(summary, flush=True)
        path = OUT / "scale.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        results["dp_smoke"] = out
        save(results)
    dist.destroy_process_group()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="7b,13b", help="name[:blocks],... (names: 7b, 13b; default all blocks)")
    ap.add_argument("--no-spill", action="store_true", help="keep hidden states on the GPU")
    ap.add_argument("--dp-smoke", action="store_true", help="under torchrun: NCCL data-parallel smoke run")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a dry run of the script)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only write the markdown from a saved run")
    args = ap.parse_args()
    if args.dp_smoke:
        dp_smoke(args.device)
        return
    if args.report:
        md = report(json.loads(Path(args.report).read_text()))
        Path("examples/results").mkdir(parents=True, exist_ok=True)
        Path("examples/results/scale.md").write_text(md)
        print(md)
        return
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_scale needs a CUDA GPU (or --device cpu for a dry run, or --report JSON)")
    torch.backends.cuda.matmul.allow_tf32 = False
    path = OUT / "scale.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"recipe {RECIPE.name}", flush=True)
    for item in args.models.split(","):
        name, _, blocks = item.partition(":")
        n = int(blocks or SHAPES[name]["num_hidden_layers"])
        row = run_model(name, n, not args.no_spill, results, dev)
        print(f"{name}: {n} blocks in {row['calib_s']:.0f} s (full model {full_seconds(row) / 60:.1f} min), "
              f"peak {row['peak_alloc_gib']:.2f} GiB, stages {row['stages']}", flush=True)
    md = report(results)
    (OUT / "scale.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
