"""Launch the decode cases that still have headroom once each, for Nsight Compute (GPU).

The sixteenth session's read floor (``bench_read_floor.py``) showed where a W4A8 kernel can still gain at M <= 16: on
11008x4096, 4096x11008 and 14336x4096 at M = 4 and 16, cuBLAS streams the packed weight's bytes 3.34-3.42x faster
than FP16 runs, while the k-split GEMM reaches 2.30-2.63x. This script launches, on given int8 codes, the k-split GEMM
with the configs the autotuner picks there, and beside them the two references for the same bytes: the bare read
kernel (``bench_read_floor._read_words``) and cuBLAS FP16 ``F.linear`` on an fp16 weight of the packed weight's bytes.
Each launch is one profiled kernel between ``cudaProfilerStart`` / ``cudaProfilerStop`` (compiles and warm-up happen
before), so Nsight Compute sees only these:

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section SchedulerStats \\
        --section LaunchStats --metrics dram__bytes_read.sum,smsp__inst_executed.sum,<stall ratios> \\
        python examples/ncu_decode_cases.py

Without ncu it prints each case's name and launch order, so the profiler's report can be matched to it.
"""
import torch
import torch.nn.functional as F_nn
from bench_read_floor import read_words

from qcompile import formats as F
from qcompile.backends.triton import prepack
from qcompile.backends.triton.quantize_kernel import quantize_rows
from qcompile.backends.triton.w4_linear import launch_ksplit

# (N, K, M, k-split config (BLOCK_N, S, warps, stages)): the autotuner's picks on the H100 (w4_ksplit_kernel.py)
CASES = [
    (11008, 4096, 16, (32, 4, 4, 3)), (11008, 4096, 16, (32, 2, 2, 3)), (11008, 4096, 4, (32, 2, 2, 3)),
    (4096, 11008, 16, (32, 4, 4, 4)), (14336, 4096, 16, (32, 2, 2, 3)), (4096, 4096, 16, (32, 4, 4, 3)),
]
READ_CONFIG = (2048, 2048, 4, 1)  # the fastest read shape at these sizes (read_floor_cublas_bytes_h100.txt)


def main():
    launches = []
    for n, k, m, (bn, s, warps, stages) in CASES:
        w16 = (torch.randn(n, k, device="cuda") * 0.02).half()
        pw = prepack(*F.quantize(w16.float(), F.FormatSpec.parse("dint4"), F.Granularity.parse("channel")),
                     "dint4", "channel")
        x = torch.randn(m, k, device="cuda").half()
        codes = quantize_rows(x, 8, False)
        y = torch.empty(m, n, device="cuda", dtype=torch.half)
        cfg = dict(BLOCK_N=bn, S=s, num_warps=warps, num_stages=stages)
        launches.append((f"ksplit {n}x{k} M={m} {bn},S{s},w{warps},s{stages}",
                         lambda codes=codes, pw=pw, y=y, cfg=cfg: launch_ksplit(*codes, pw, y, config=cfg)))
    for n, k in sorted({(n, k) for n, k, *_ in CASES}):
        words = torch.randint(-2**31, 2**31 - 1, (n * k // 8,), device="cuda", dtype=torch.int32)
        out = torch.zeros(-(-words.numel() // READ_CONFIG[0]), device="cuda", dtype=torch.int32)
        launches.append((f"read {n}x{k} w4 bytes {READ_CONFIG}",
                         lambda words=words, out=out: read_words(words, out, READ_CONFIG)))
        w_eq = (torch.randn(n, k // 4, device="cuda") * 0.02).half()
        x_eq = torch.randn(16, k // 4, device="cuda").half()
        launches.append((f"cuBLAS {n}x{k} M=16 on the w4 bytes ([N, K/4] fp16)",
                         lambda w_eq=w_eq, x_eq=x_eq: F_nn.linear(x_eq, w_eq)))
    for _, fn in launches:  # compile and warm up outside the profiled range
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for i, (name, fn) in enumerate(launches):
        print(f"launch {i}: {name}", flush=True)
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
