"""How fast can any kernel read a linear's weight bytes? The bound that the W4A8 speed-up over FP16 lives under (GPU).

A decode linear (M <= 16) is a weight stream, so a W4A8 kernel can be no faster than a kernel that only reads the
packed 4-bit weight once. This script times such a read-only kernel (``_read_words``: every program sums its share
of the bytes as int32 words and stores one number, so nothing is optimised away) over a sweep of launch shapes, and
keeps the fastest. Per LLaMA shape N x K, GPU time in one CUDA graph cycling weight copies (> 2x the L2, so every
read comes from HBM), median, microseconds:

  * ``fp16``: cuBLAS ``F.linear`` at M = 1 and M = 16 (the issue's baseline);
  * ``read fp16``: the fastest read of the fp16 weight's bytes (how close cuBLAS streams to the read floor);
  * ``read w4``: the fastest read of the packed dINT4 weight (``qweight``, 0.25x the fp16 bytes; the per-channel
    tables add 12 bytes per row and are not read here);
  * ``quant``: ``quantize_rows`` of the activation alone (M = 1, 4 and 16): one launch of a W4A8 linear;
  * ``w4a8``: ``w4a8_linear`` (the dispatch's pick, activation quantization included) at M = 1, 4 and 16;
  * ``cuBLAS w4 bytes``: cuBLAS ``F.linear`` at the same M on an fp16 weight with exactly the packed weight's bytes,
    [N, K / 4] or [N / 4, K], whichever is faster: how fast the vendor's own kernel streams that many bytes into M
    rows, with nothing to unpack and no activation to quantize;
  * ``empty``: a one-element launch, the fixed cost of any kernel in the graph.

The printed bound ``fp16 / read w4`` is the largest speed-up over FP16 that a kernel reading the packed weight once
could reach with the activation quantization for free; ``w4a8 / read w4`` says how far the kernels are from it.
``fp16 / cuBLAS w4 bytes`` is the speed-up a W4A8 kernel would reach if it streamed its bytes as well as cuBLAS
streams the same number of fp16 bytes, again with the unpacking and the quantization free.

    python examples/bench_read_floor.py
"""
import time

import torch
import torch.nn.functional as F_nn
import triton
import triton.language as tl
from gpu_timing import bench_graph, clones, streamed_copies

from qcompile import formats as F
from qcompile.backends.triton import prepack, w4a8_linear
from qcompile.backends.triton.quantize_kernel import quantize_rows

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
# (words per program, words per step, warps, pipeline stages of the loop)
READ_CONFIGS = [(wp, blk, w, st) for wp in (2048, 8192, 32768) for blk in (512, 2048) for w in (4, 8)
                for st in (1, 3) if blk <= wp]


@triton.jit
def _read_words(src_ptr, out_ptr, n_words, WORDS: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Program p sums words [p * WORDS, (p + 1) * WORDS) of ``src`` (int32 view) and stores the sum."""
    base = tl.program_id(0).to(tl.int64) * WORDS
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.range(0, WORDS, BLOCK, num_stages=STAGES):
        offs = base + i + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def read_words(src: torch.Tensor, out: torch.Tensor, cfg) -> torch.Tensor:
    """Launch ``_read_words`` over ``src`` (any contiguous tensor of whole int32 words) with ``cfg`` =
    (words per program, words per step, warps, stages); ``out`` holds one int32 per program."""
    words = src.view(torch.int32).reshape(-1)
    wp, blk, warps, stages = cfg
    grid = (triton.cdiv(words.numel(), wp),)
    _read_words[grid](words, out, words.numel(), WORDS=wp, BLOCK=blk, STAGES=stages, num_warps=warps)
    return out


def fastest_read(tensors) -> tuple:
    """(µs, config) of the fastest ``read_words`` over ``tensors`` (copies of one weight), sums checked."""
    words = tensors[0].view(torch.int32).reshape(-1)
    best = None
    for cfg in READ_CONFIGS:
        out = torch.zeros(triton.cdiv(words.numel(), cfg[0]), device="cuda", dtype=torch.int32)
        got = read_words(tensors[0], out, cfg).sum(dtype=torch.int64)
        if int(got) % 2**32 != int(words.sum(dtype=torch.int64)) % 2**32:
            raise RuntimeError(f"read_words {cfg} summed the words wrong")
        t = bench_graph(lambda w: read_words(w, out, cfg), tensors)
        if best is None or t < best[0]:
            best = (t, cfg)
    return best


def main():
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}; GPU time per call in us (CUDA graph cycling weight copies, "
          "weights read from HBM), median", flush=True)
    dummy = torch.zeros(1, device="cuda")
    empty = bench_graph(lambda d: d.zero_(), clones(dummy, 4))
    print(f"empty launch (a 1-element zero_): {empty:.2f} us", flush=True)
    rows = []
    spec, gran = F.FormatSpec.parse("dint4"), F.Granularity.parse("channel")
    for n, k in SHAPES:
        w16 = (torch.randn(n, k, device="cuda") * 0.02).half()
        w16s = streamed_copies(w16, n * k * 2)
        pws = streamed_copies(prepack(*F.quantize(w16.float(), spec, gran), "dint4", "channel"), n * k // 2)
        r16, c16 = fastest_read(w16s)
        r4, c4 = fastest_read([p.qweight for p in pws])
        # fp16 weights with the packed weight's bytes: a quarter of K, or a quarter of N
        eq_k = streamed_copies((torch.randn(n, k // 4, device="cuda") * 0.02).half(), n * k // 2)
        eq_n = streamed_copies((torch.randn(n // 4, k, device="cuda") * 0.02).half(), n * k // 2)
        cells, eq_both = {}, {}
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda").half()
            x_eq = x[:, : k // 4].contiguous()
            eq_both[m] = (bench_graph(lambda w: F_nn.linear(x_eq, w), eq_k),
                          bench_graph(lambda w: F_nn.linear(x, w), eq_n))
            cells[m] = (bench_graph(lambda w: F_nn.linear(x, w), w16s),
                        bench_graph(lambda _: quantize_rows(x, 8, False), [None]),
                        bench_graph(lambda p: w4a8_linear(x, p), pws),
                        min(eq_both[m]))
        mb16, mb4 = n * k * 2 / 1e6, n * k / 2 / 1e6
        print(f"[{time.time() - t0:4.0f}s] {n}x{k}: read fp16 {r16:.1f} ({mb16 / r16:.2f} TB/s, {c16}), read w4 "
              f"{r4:.1f} ({mb4 / r4:.2f} TB/s, {c4}); "
              + "; ".join(f"M={m}: fp16 {fp:.1f} ({mb16 / fp:.2f} TB/s), quant {q:.1f}, w4a8 {w:.1f}, cuBLAS w4 "
                          f"bytes {eq:.1f} ({mb4 / eq:.2f} TB/s; [N, K/4] {eq_both[m][0]:.1f}, [N/4, K] "
                          f"{eq_both[m][1]:.1f})" for m, (fp, q, w, eq) in cells.items()), flush=True)
        rows.append((n, k, r16, r4, cells))
        del w16s, pws, eq_k, eq_n

    print("\n| N x K | read fp16 | read w4 | M | FP16 | FP16 / read fp16 | bound: FP16 / read w4 | cuBLAS w4 bytes "
          "| FP16 / cuBLAS w4 bytes | quant | W4A8 | W4A8 vs FP16 | W4A8 / read w4 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, k, r16, r4, cells in rows:
        for m, (fp, q, w, eq) in cells.items():
            print(f"| {n}x{k} | {r16:.1f} | {r4:.1f} | {m} | {fp:.1f} | {fp / r16:.2f} | {fp / r4:.2f}x | {eq:.1f} "
                  f"| {fp / eq:.2f}x | {q:.1f} | {w:.1f} | {fp / w:.2f}x | {w / r4:.2f} |")
    print(f"\nempty launch {empty:.2f} us. Read floors: the fastest of {len(READ_CONFIGS)} read-only launch shapes "
          "(words per program, words per step, warps, stages) per weight.")


if __name__ == "__main__":
    main()
