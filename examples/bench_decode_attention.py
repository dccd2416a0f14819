"""Decode attention (GPU): the split-key Triton kernel against PyTorch SDPA, as an HF decode step calls it.

One query token per sequence over a static KV cache with a boolean mask ``[1, 1, 1, L]`` (what
``bench_decode.py`` passes), fp16, LLaMA-2-7B heads (32 x 128) and a GQA case (32 query heads on 8 KV
heads, which SDPA gets with K / V repeated, as HF's ``repeat_kv`` does). GPU time per call in one CUDA graph
cycling 8 copies of the cache (so it is read from HBM, as in a decode step), median, microseconds: SDPA called
eagerly (with the boolean mask, as HF calls it: its per-call mask handling included), SDPA compiled by Inductor
(what a decode graph runs: ``torch.compile`` of the same call), the kernel's default config
(``decode_attention_kernel.launch_config``) and the best of a sweep over keys per step and slices;
outputs checked against fp32 SDPA (max abs error).

    python examples/bench_decode_attention.py
"""
# ruff: noqa: B023  (every lambda is captured and replayed inside its own loop iteration)
import time

import torch
import torch.nn.functional as F_nn
from gpu_timing import bench_graph

from qcompile.backends.triton.attention_ops import _reference
from qcompile.backends.triton.decode_attention_kernel import decode_attention, launch_config

CASES = [(1, 32, 32, 200), (1, 32, 32, 1024), (1, 32, 32, 4096), (16, 32, 32, 200), (16, 32, 32, 1024),
         (1, 32, 8, 1024)]  # (batch, query heads, KV heads, cache length)
D = 128


def main():
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; decode attention, fp16, head dim {D}, GPU time per call in us",
          flush=True)
    print("| batch | heads (q / kv) | cache L | SDPA eager | SDPA compiled | kernel, default config | vs compiled SDPA "
          "| best config | its time | max abs err (kernel / SDPA, vs fp32) |")
    print("|---:|---|---:|---:|---:|---:|---:|---|---:|---|")
    for b, h, hkv, length in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        sets = []
        for _ in range(8):
            q = torch.randn(b, h, 1, D, device="cuda", generator=g).half()
            k = torch.randn(b, hkv, length, D, device="cuda", generator=g).half()
            v = torch.randn(b, hkv, length, D, device="cuda", generator=g).half()
            sets.append((q, k, v))
        mask = (torch.arange(length, device="cuda") <= length - 9)[None, None, None]
        group = h // hkv

        def sdpa(s):
            k_, v_ = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in s[1:])
            return F_nn.scaled_dot_product_attention(s[0], k_, v_, attn_mask=mask)

        q, k, v = sets[0]
        ref = _reference(q, k, v, mask, D ** -0.5).float()
        err_sdpa = (sdpa(sets[0]).float() - ref).abs().max().item()
        t_sdpa = bench_graph(sdpa, sets)
        torch._dynamo.reset()
        compiled = torch.compile(sdpa, dynamic=False)
        t_compiled = bench_graph(compiled, sets)
        default = launch_config(b * h, length, D)
        t_def = bench_graph(lambda s: decode_attention(*s, mask), sets)
        err = (decode_attention(q, k, v, mask).float() - ref).abs().max().item()
        times = {}
        for block_l in (16, 32, 64):
            for splits in (1, 2, 4, 8, 16, 32):
                if splits * block_l > 2 * length:
                    continue
                for warps in (2, 4):
                    cfg = dict(BLOCK_L=block_l, SPLITS=splits, num_warps=warps)
                    e = (decode_attention(q, k, v, mask, config=cfg).float() - ref).abs().max().item()
                    if e > 4 * max(err, 1e-3):
                        print(f"   config {cfg}: error {e:.1e}", flush=True)
                        continue
                    times[str(cfg)] = bench_graph(lambda s: decode_attention(*s, mask, config=cfg), sets)
        best = min(times, key=times.get)
        print(f"| {b} | {h} / {hkv} | {length} | {t_sdpa:.2f} | {t_compiled:.2f} | {t_def:.2f} ({default['BLOCK_L']} "
              f"keys x {default['SPLITS']} slices) | {t_compiled / t_def:.2f}x | {best} | {times[best]:.2f} | "
              f"{err:.1e} / {err_sdpa:.1e} |", flush=True)
        del sets
    print(f"[{time.time() - t0:.0f}s]")


if __name__ == "__main__":
    main()
