"""Bytes in flight of the decode GEMV's configs, from offline sm_90 compiles (no GPU needed).

At M = 1 a W4A8 linear is a weight stream, and by Little's law a stream runs at (bytes in flight) /
(memory latency). This compiles ``w4_gemv_kernel`` for Hopper (sm_90) with the ptxas that ships with
Triton, reads registers and shared memory per program from the cubin, and prints, per config and weight
shape, how many programs fit on an SM (registers, shared memory, threads, and the grid itself) and how
many weight bytes each SM then has requested and not yet received:

    in flight per SM = programs per SM x tile bytes x tiles ahead
    tiles ahead      = PREFETCH (PIPELINE = 0: the register buffer, 1 or 2) or PIPELINE - 1 (cp.async stages),
                       at most the K loop's trip count (K = 4096 here)

It also counts the cp.async copies in the PTX, which shows whether the compiler pipelined the stream.

``--sass``: what one step of the K loop costs, from the disassembled cubin (nvdisasm): SASS instructions
per weight word (32 bits = 8 codes) and per thread, and the barriers and shared-memory accesses in the
loop, per config and BLOCK_M (1, 4, 16). A layout change inside the loop shows up as STS / LDS / LDSM
between BAR.SYNCs.

    python examples/gemv_occupancy.py            # every GEMV config, LLaMA-2-7B decode shapes
    python examples/gemv_occupancy.py --sms 132  # H100 SXM / H200 have 132 SMs
    python examples/gemv_occupancy.py --variants # every variant the autotuner may compile: failures, lost cp.async
    python examples/gemv_occupancy.py --sass     # the K loop's instruction mix per weight word

``loads_after_loop`` counts the global loads left in a kernel's tail, after its K loop (the CPU test
``test_channel_tables_load_before_the_loop`` holds the GEMV and the k-split GEMM, ``compile_ksplit``, to none).

A model of the hardware, not a timing: ``examples/bench_gemv_pieces.py`` on the GPU says what is fast.
"""
from __future__ import annotations

import argparse
import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

SHAPES = (4096, 11008, 14336)  # N of the LLaMA-2-7B / LLaMA-3-8B decode GEMVs (K = 4096)
REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM, PROGRAMS_PER_SM = 65536, 228 * 1024, 2048, 32
ARG_TYPES = dict(x_ptr="*i8", x_scale_ptr="*fp32", x_zp_ptr="*i32", stride_xm="i32", w_ptr="*u8",
                 w_scale_ptr="*fp32", w_sum_ptr="*i32", w_zero_ptr="*u8", bias_ptr="*fp16", y_ptr="*fp16",
                 stride_ym="i32", ws_ptr="*i32", cnt_ptr="*i32", M="i32", N="i32", K="i32",
                 pf0_ptr="*u8", pf0_bytes="i32", pf1_ptr="*u8", pf1_bytes="i32", pf2_ptr="*u8", pf2_bytes="i32")
for _g in range(3):  # the group kernel's per-weight arguments
    ARG_TYPES.update({f"w{_g}_ptr": "*u8", f"s{_g}_ptr": "*fp32", f"t{_g}_ptr": "*i32", f"z{_g}_ptr": "*u8",
                      f"b{_g}_ptr": "*fp16", f"y{_g}_ptr": "*fp16", f"stride_y{_g}": "i32", f"N{_g}": "i32"})
ALIGNED = {"N", "K", "stride_xm", "stride_ym"}  # multiples of 16 at the model shapes, like the pointers


def compile_gemv(config, k: int = 4096, block_m: int = 1, fuse_quant: bool = False, group: int = 0,
                 pdl: bool = False, direct: bool = True, l2_next: int = 0, l2_early: bool = False,
                 rows: bool = False):
    """The decode GEMV compiled for sm_90 with one autotune ``config`` (dINT4): ``w4_gemv_kernel``, or
    ``w4_gemv_group_kernel`` for ``group`` = 2 or 3 weights; int8 codes given, or fp16 activations
    quantized in the kernel (``fuse_quant``); ``pdl``: as a programmatic dependent launch; ``direct``:
    ``X_DIRECT`` where the dispatch sets it (``DISPATCH.gemv_direct``: M = 1, int8 codes given); ``EVEN`` as
    at the LLaMA shapes (N a multiple of BLOCK_N, ``k`` a whole number of steps, no split); ``l2_next`` /
    ``l2_early``: that many L2 prefetch regions, issued after (or before) the weight loop; ``rows``: ``X_DIRECT``
    at BLOCK_M 2 and 4 too (``DISPATCH.gemv_direct_rows``: one accumulator per row)."""
    from qcompile.backends.triton import w4_gemv_kernel as G

    fn = G.w4_gemv_group_kernel if group else G.w4_gemv_kernel
    const = dict(DINT=True, DINT_R=2, PACK_K=128, HAS_BIAS=False, INT_OUT=False, USE_ASM=True,
                 FUSE_QUANT=fuse_quant, X_WORDS=not fuse_quant, LUT=False, X_QMAX=255, X_SYMMETRIC=False,
                 X_RECIP_DIV=False, STAT_BLOCK=G.stat_block(k, block_m), BLOCK_M=block_m, PDL=pdl,
                 X_DIRECT=direct and not fuse_quant and (block_m == 1 or (rows and block_m <= 4)),
                 L2_NEXT=l2_next, L2_EARLY=l2_early,
                 EVEN=G.even([4096], k, 128, config.kwargs["BLOCK_N"], config.kwargs["BLOCK_W"],
                             config.kwargs.get("SPLIT_K", 1)),
                 **config.kwargs)
    if group:
        const["G"] = group
    return _compile_sm90(fn, const, config, pdl, {"x_ptr": "*fp16"} if fuse_quant else {})


def _compile_sm90(fn, const: dict, config, pdl: bool, types: dict):
    """``fn`` compiled for sm_90 with the constexprs ``const`` and ``config``'s warps and stages; argument types
    from ``ARG_TYPES`` (``types`` overrides or adds), pointers and ``ALIGNED`` integers 16-divisible."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = dict(ARG_TYPES, **types)
    names = fn.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    aligned = [i for i, n in enumerate(names) if n in types and (types[n][0] == "*" or n in ALIGNED)]
    src = ASTSource(fn, signature, {(names.index(n),): v for n, v in const.items()},
                    {(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl))


def check_variants(configs) -> int:
    """Compile every variant the autotuner can meet (single and group kernel, codes given or quantization
    fused, BLOCK_M 1 / 4 / 16 where the config survives pruning); print failures and pipelined configs that
    came out without cp.async. Returns the number of problems."""
    from qcompile.backends.triton.w4_gemv_kernel import accumulator_fits

    problems = n = 0
    for cfg in configs:
        for group, fuse, bm in itertools.product((0, 3), (False, True), (1, 4, 16)):
            if not accumulator_fits(cfg, bm):
                continue  # pruned at this M
            n += 1
            try:
                res = resources(compile_gemv(cfg, block_m=bm, fuse_quant=fuse, group=group))
            except Exception as e:  # noqa: BLE001  (report any compiler failure, keep going)
                problems += 1
                print(f"FAILED {cfg.kwargs} warps={cfg.num_warps} group={group} fused={fuse} BLOCK_M={bm}: "
                      f"{type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            if cfg.kwargs.get("PIPELINE", 0) > 1 and not res["cp_async"]:
                problems += 1
                print(f"NOT PIPELINED {cfg.kwargs} group={group} fused={fuse} BLOCK_M={bm}", flush=True)
    print(f"{n} variants compiled for sm_90, {problems} problem(s)")
    return problems


def resources(kernel) -> dict:
    """Registers per thread and shared bytes per program (cuobjdump of the cubin), cp.async count (PTX)."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    return {"regs": regs, "smem": kernel.metadata.shared,
            "cp_async": len(re.findall(r"cp\.async\.c[ag]\.shared", kernel.asm["ptx"]))}


def _sass(kernel) -> list:
    """The disassembled cubin (nvdisasm), one line per entry."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([str(tool), "-c", f.name], capture_output=True, text=True, check=True).stdout.splitlines()


def _labels(lines) -> dict:
    """A SASS listing's labels: name -> line index."""
    return {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}


def _loops(lines) -> list:
    """``(first, last)`` line indices of every loop of a SASS listing: a branch back to a label above it."""
    labels = _labels(lines)
    loops = []
    for j, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), j) < j:
            loops.append((labels[m.group(1)], j))
    return loops


def _is_instruction(line: str) -> bool:
    return re.search(r"/\*[0-9a-f]{4}\*/", line) is not None


def _instructions(lines) -> list:
    return [x for x in lines if _is_instruction(x)]


def _opcode(line: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", re.sub(r"/\*[0-9a-f]+\*/", "", line).strip()).split()[0].split(".")[0]


def loop_mix(kernel, config) -> dict:
    """The K loop of a compiled GEMV (the longest loop of its SASS): ``instructions`` per step and thread,
    ``per_word`` (per weight word a thread unpacks), ``ops`` (opcode -> count), ``barriers``, ``shared`` (shared
    memory loads and stores) and ``dp4a`` (IDP) in it."""
    import collections

    lines = _sass(kernel)
    bodies = [_instructions(lines[first + 1:last + 1]) for first, last in _loops(lines)]
    body = max(bodies, key=len, default=[])
    ops = collections.Counter(_opcode(x) for x in body)
    kw = config.kwargs
    words = kw["BLOCK_N"] * kw["BLOCK_W"] / (32 * config.num_warps)  # weight words per thread and step
    return dict(instructions=len(body), per_word=len(body) / words, ops=dict(ops), barriers=ops["BAR"],
                shared=sum(ops[o] for o in ("STS", "LDS", "LDSM")), dp4a=ops["IDP"])


def loads_after_loop(kernel) -> int:
    """Global loads (``LDG``; not the cp.async copies) after the K loop: each one is a memory round trip in the
    program's tail, after the weight stream (``w4_gemv_kernel.channel_tables``). Counted on the path from every
    loop's back branch (the group GEMV has one loop per weight) to the first unpredicated ``EXIT``, following
    unpredicated forward branches (past the block a zero-trip loop takes, to an epilogue the loops share)."""
    lines = _sass(kernel)
    labels = _labels(lines)
    count = 0
    for _, back_branch in _loops(lines):
        i, seen = back_branch + 1, set()
        while i < len(lines) and i not in seen:
            seen.add(i)
            x = lines[i]
            i += 1
            if not _is_instruction(x):
                continue
            if re.search(r"\*/\s+EXIT\b", x):
                break
            jump = re.search(r"\*/\s+BRA `\((\.L_x_\d+)\)", x)
            if jump and labels[jump.group(1)] > i:
                i = labels[jump.group(1)]
            count += _opcode(x) == "LDG"
    return count


def compile_ksplit(config, pdl: bool = False, lut: bool = True, has_bias: bool = False):
    """The k-split decode GEMM (``w4_ksplit_kernel``) compiled for sm_90 with one ``config`` (dINT4, the table
    unpacker unless ``lut`` is off; ``pdl``: as a programmatic dependent launch)."""
    from qcompile.backends.triton.w4_ksplit_kernel import w4_ksplit_kernel

    const = dict(DINT=True, DINT_R=2, PACK_K=128, HAS_BIAS=has_bias, INT_OUT=False, USE_ASM=True, PDL=pdl, LUT=lut,
                 BLOCK_M=16, **config.kwargs)
    return _compile_sm90(w4_ksplit_kernel, const, config, pdl, {"M_BUCKET": "i32"})


def in_flight(config, res: dict, n: int, sms: int, k: int = 4096) -> tuple[float, float]:
    """(programs per SM, KB of weights requested and not yet received per SM) for a ``[n, k]`` weight."""
    kw, threads = config.kwargs, 32 * config.num_warps
    steps = math.ceil(math.ceil(k / 128) / (kw["BLOCK_W"] // 16))  # K loop trips (128 codes per chunk)
    per_sm = min(REGS_PER_SM // (math.ceil(res["regs"] / 8) * 8 * threads), THREADS_PER_SM // threads,
                 SMEM_PER_SM // max(res["smem"], 1), PROGRAMS_PER_SM)
    programs = min(math.ceil(n / kw["BLOCK_N"]) / sms, per_sm)
    ahead = min(kw.get("PIPELINE", 0) - 1 if kw.get("PIPELINE", 0) > 1 else kw.get("PREFETCH", 1), steps)
    return programs, programs * kw["BLOCK_N"] * kw["BLOCK_W"] * 4 * ahead / 1024


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sms", type=int, default=132, help="SMs of the GPU (H100 SXM / H200: 132)")
    p.add_argument("--variants", action="store_true",
                   help="instead: compile every kernel variant of every config the autotuner can meet (~1-2 min)")
    p.add_argument("--sass", action="store_true", help="instead: the K loop's SASS instruction mix per config")
    args = p.parse_args(argv)
    from qcompile.backends.triton import w4_gemv_kernel as G

    if args.variants:
        return [{"problems": check_variants(G.GEMV_CONFIGS + G.GEMV_SPLITK_CONFIGS + G.GEMV_PIPELINED_CONFIGS
                                            + G.GEMV_PREFETCH2_CONFIGS)}]
    if args.sass:
        print("| BLOCK_M | per-row accumulators | BLOCK_N | BLOCK_W | warps | PREFETCH | loop instructions | "
              "per weight word | dp4a | barriers | shared ld/st |\n|" + "---:|" * 11)
        rows = []
        for (bm, per_row), cfg in itertools.product(((1, False), (4, False), (4, True), (16, False)),
                                                    G.GEMV_CONFIGS + G.GEMV_PREFETCH2_CONFIGS):
            if G.accumulator_fits(cfg, bm):
                mix = loop_mix(compile_gemv(cfg, block_m=bm, rows=per_row), cfg)
                kw = cfg.kwargs
                print(f"| {bm} | {'yes' if per_row else 'no'} | {kw['BLOCK_N']} | {kw['BLOCK_W']} | {cfg.num_warps} | "
                      f"{kw['PREFETCH']} | {mix['instructions']} | "
                      f"{mix['per_word']:.1f} | {mix['dp4a']} | {mix['barriers']} | {mix['shared']} |", flush=True)
                rows.append(dict(block_m=bm, rows=per_row, config=dict(kw, num_warps=cfg.num_warps), **mix))
        return rows

    head = ["BLOCK_N", "BLOCK_W", "warps", "PIPELINE", "PREFETCH", "regs", "smem KB", "cp.async"]
    head += [f"N={n}: progs/SM, KB in flight/SM" for n in SHAPES]
    print("| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
    rows = []
    for cfg in G.GEMV_CONFIGS + G.GEMV_PREFETCH2_CONFIGS + G.GEMV_PIPELINED_CONFIGS:
        res = resources(compile_gemv(cfg))
        kw = cfg.kwargs
        cells = [kw["BLOCK_N"], kw["BLOCK_W"], cfg.num_warps, kw.get("PIPELINE", 0), kw.get("PREFETCH", 1), res["regs"],
                 f"{res['smem'] / 1024:.1f}", res["cp_async"]]
        flights = [in_flight(cfg, res, n, args.sms) for n in SHAPES]
        cells += [f"{p:.1f}, {kb:.0f}" for p, kb in flights]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)
        rows.append(dict(config=dict(kw, num_warps=cfg.num_warps), **res, in_flight_kb=[kb for _, kb in flights]))
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
