"""Launch wrappers and M-dispatch for the W4 GEMM kernels (imports triton; use through ``ops.py``).

Dispatch by M (rows of the flattened activation):

* ``M <= 16`` (decode): GEMV-like configs (BLOCK_M = 16, small BLOCK_N, several chunks per step).
  Paths: ``fused`` (the GEMM quantizes the activation itself: one launch), ``unfused``
  (``quantize_rows`` then the GEMM), ``splitk`` (``quantize_rows`` then a split-K GEMM: per-channel
  weights; more programs and shorter K loops when N / BLOCK_N tiles cannot fill the GPU), ``ksplit``
  (``quantize_rows`` then ``w4_ksplit_kernel``: each warp of a program takes its own chunks of K), and for
  per-channel weights with per-token activations ``gemv`` / ``gemv_fused`` (``w4_gemv_kernel``: dp4a
  on 32-bit words, no MMA; the H200 picks it at M = 1 on every LLaMA shape).
* larger M (prefill): tiled wgmma configs. Paths: ``inloop`` (unpack in the K loop) or, from
  ``expand_min_m`` rows on, ``expand`` (unpack the weight once to int8, then a plain int8 GEMM).

Within a path, ``triton.autotune`` picks the tile config per (M bucket, N, K, variant). Between paths,
``DISPATCH.decode_path`` / ``prefill_path`` = ``"auto"`` times the candidates once per
(M bucket, N, K, format, dtypes) on first use (GPU time in a CUDA graph with the L2 flushed before each
call, ``path_clock``) — like the autotuner, but across launch sequences — and caches the winner. Set a path
name to force it (the benchmark does, to report each).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import triton

from . import dispatch_cache, path_clock
from . import w4_gemm_kernel as kern
from . import w4_gemv_kernel as gemv_kern
from . import w4_ksplit_kernel as ksplit_kern
from ._common import interpreting, pdl_launch, recip_div, stream_key
from .packing import PackedWeight
from .quantize_kernel import quantize_rows

__all__ = [
    "DISPATCH",
    "Dispatch",
    "expand_weight",
    "interpreting",
    "launch_gemm",
    "launch_gemv",
    "launch_gemv_group",
    "launch_ksplit",
    "dispatch_choices",
    "splitk_workspace",
    "w4_linear_2d",
    "w4_linear_2d_codes",
    "w4_linear_2d_shared",
]


@dataclass
class Dispatch:
    """Dispatch thresholds and path switches."""

    decode_max_m: int = 16
    # "auto" | "fused" | "unfused" | "splitk" | "ksplit" | "ksplit_pdl" | "gemv" | "gemv_fused" | "gemv_rows"
    decode_path: str = "auto"
    prefill_path: str = "auto"  # "auto" | "inloop" | "expand" | "ksplit" (M <= KSPLIT_MAX_M)
    expand_min_m: int = 256  # "expand" is a candidate from this M on
    use_asm: bool = True  # PTX SIMD unpacker on GPU (never under the interpreter)
    # The GEMV's table unpacker for dINT with R <= 4: 12 instead of 19 instructions per 8 codes, but on the
    # H200 it timed the same as the arithmetic one (the GEMV waits on memory, not on the ALUs), so off.
    gemv_lut: bool = False
    # Sibling linears of one input at decode (w4_linear_2d_shared): "auto" | "per_weight" | "gemv_group" |
    # "gemv_group_fused" | "gemv_group_rows"
    group_path: str = "auto"
    # The decode GEMV launched as a programmatic dependent of its activation quantization (Hopper; the
    # weight prologue overlaps quantize_rows): 0.6-1.6 us less per linear on the H100 (bench_gemv_pieces
    # --pdl, bitwise the same outputs); LLaMA-2-7B decode batch 1 on the H100: 375.1 -> 389.9 tok/s
    # (2026-12-05; bench_decode.py --no-pdl times it off).
    gemv_pdl: bool = True
    # The same for the tiled decode GEMM ("unfused", "splitk"): ``w4_gemm_kernel`` PDL. Off: on the H100
    # (2026-12-06, ``BENCH_MS=1,4,16 bench_w4a8_linear.py --variants``, four shapes) it saved up to 1.3 us on
    # some paths at M <= 4 and cost up to 3.8 us on others; at M = 16 it made 7 of 8 paths slower, by up to
    # 35.7 us (4096x11008 "unfused": 23.7 -> 59.4 us). Why was not found.
    gemm_pdl: bool = False
    # At M = 1 the GEMV reads the activation words straight into its accumulator's layout instead of
    # broadcasting them (no shared memory or barrier in the K loop; examples/results/gemv_sass_sm90.md).
    # Same outputs; H100, M = 1: 1.13x on 4096x4096, noise on the other shapes (bench_gemv_pieces --direct).
    gemv_direct: bool = True
    # The same at M = 2-4 (BLOCK_M 2 or 4): one accumulator per row, each row's words read into the weight
    # tile's layout (w4_gemv_kernel ROWS); same outputs. Off: on the H100 (bench_gemv_pieces --rows, 2026-12-06)
    # up to 1.22x faster on 9 of 12 shapes and groups, but 0.62x on 4096x11008 at M = 4.
    gemv_direct_rows: bool = False
    # Per shape instead: at M = 2-4 the per-row GEMV is one more decode candidate ("gemv_rows"; with sibling
    # weights "gemv_group_rows" and "gemv_rows" per weight), timed against the rest once per shape like every
    # path. On: LLaMA-2-7B decode at batch 4 on the H100 (2026-12-06, bench_decode.py --batch 4 --rows-candidate
    # --interleave 10) 1276.7 -> 1456.0 tok/s, in turn with FP16 1.99x -> 2.25x, logits bitwise the same.
    gemv_rows_candidate: bool = True
    # The decode GEMM with K split across warps (w4_ksplit_kernel) is one more decode candidate (per-channel
    # weights, per-token activations), timed against the rest once per shape. H100, codes given (2026-12-06,
    # bench_gemv_pieces.py --ksplit): 1.20x the tiled decode GEMM at 4096x4096 (M = 1-16), 1.37x at 4096x11008,
    # 1.03-1.06x at 11008x4096, 0.98x at 14336x4096.
    ksplit_candidate: bool = True
    # The k-split GEMM's table unpacker for dINT (``_common.unpack_bytes_lut``): offline sm_90 SASS (Triton 3.6),
    # 298 instead of 382 instructions per warp and chunk, on warps that wait on each instruction. H100, codes
    # given (2026-12-06, ``bench_gemv_pieces.py --ksplit-lut``): 1.04-1.15x the arithmetic unpacker on every
    # config at 4096x4096 and 4096x11008, 1.01-1.05x on the other two shapes. Bitwise the same outputs.
    ksplit_lut: bool = True
    # The k-split GEMM launched as a programmatic dependent of its activation quantization (its launch overlaps
    # quantize_rows, as the GEMV's does with ``gemv_pdl``). Off: on the H100 (2026-12-06, ``bench_gemv_pieces.py
    # --ksplit-pdl``) it saved 1.4-1.6 us at M = 1 on three shapes and at M = 4 on two, but lost at M = 16 on every
    # shape and at 4096x11008 at every M (up to 17.8 us), like ``gemm_pdl``; the cause is not found. Where it won,
    # a GEMV path was faster still except 14336x4096 at M = 4. The GPU test checks it is bitwise the plain launch.
    ksplit_pdl: bool = False
    # So with ``ksplit_pdl`` off the dependent launch is a decode path of its own ("ksplit_pdl"), which the
    # dispatch times against the rest once per shape and M, like every path. H100, tenth session (2026-12-06,
    # ``ksplit_pdl_sides_h100.txt``): 14336x4096 at M = 4, 15.5 us as a dependent launch vs 17.1 plain (the
    # dispatch's pick then, 2.42x FP16); at M = 16 it lost again (17.7 vs 17.2). Through the dispatch (eleventh
    # session, H100): picked at 14336x4096, M = 4, in both runs of the day (15.4 and 15.6 us, 2.77x and 2.75x FP16;
    # ``triton_bench_w4a8_linear_h100_eleventh.md``, ``ksplit_lut_bias_h100.txt``), nowhere else.
    ksplit_pdl_candidate: bool = True
    # The k-split GEMM with BLOCK_M = 32 / 64 (``w4_ksplit_kernel``: each unpacked weight fragment meets 2-4 row
    # tiles of the activation) as a candidate from M = 17 to ``KSPLIT_MAX_M``, beside the tiled GEMM ("inloop").
    # Exact under the interpreter and compiled offline for sm_90 without spills (2026-12-07); off until a GPU has
    # checked and timed it (``KSPLIT_MS=32,64 python examples/bench_gemv_pieces.py --ksplit`` prints both paths).
    ksplit_wide_candidate: bool = False
    # The autotuned GEMV configs plus the PREFETCH = 2 ones (two tiles ahead in the register buffer:
    # w4_gemv_kernel.GEMV_PREFETCH2_CONFIGS). On given codes they timed 0.94-0.97x on 7 of 8 shapes (H100,
    # ``bench_gemv_pieces.py --direct``), but behind the quantization, as the GEMV runs (its first tiles load
    # before it waits), the best PREFETCH = 2 config beat the best PREFETCH = 1 one at M = 1 on three of four
    # shapes by 0.1-0.3 us and lost by 0.2 on the fourth (H100, 2026-12-06, ``gemv_pdl_configs_h100.txt``). On
    # since the autotuner times configs behind the quantization (``_timed_after``); not yet timed end to end.
    gemv_prefetch2: bool = True
    # Cache hints on the GEMV's weight-code loads (``_common.stream_load``): 0 none, 1 ``evict_first``, 2 ``.cg``.
    # H100, 2026-12-07, medians of 3 rounds in turn (``examples/results/gemv_wload_h100.txt``). Five explicit
    # configs behind the quantization, M = 1 and 4, four shapes (``bench_gemv_pieces.py --wload``): evict_first
    # 0.93-1.04x the unhinted time (faster in 29 of 40 cases), .cg 0.96-1.12x. The public op on the GEMV path, the
    # autotuner picking per hint (``--wload-op``): evict_first 0.961-0.973x at 4096x4096 M = 1 and 4 and 14336x4096
    # M = 4, 0.99-1.005x on four cases, but 1.066x at 11008x4096 M = 1 (every round; 3.21x FP16 -> 3.01x). Mixed,
    # so off; it stays for experiments. (cp.async, the k-split GEMM's loads, takes no eviction hint in Triton 3.6.)
    gemv_w_load: int = 0
    # The decode GEMV asks for (part of) the next linear's weights in L2 (``l2_next`` of the launchers, from
    # ``l2_chain.py``): "off", "end" (each program once its own weights are read: the traffic fills the gap
    # of norm / attention / quantization kernels before the next GEMV) or "start" (before its own loop);
    # at most ``l2_prefetch_mb`` MB per launch (H100 / H200 L2: 50 MB), from the start of each weight.
    l2_prefetch: str = "off"
    l2_prefetch_mb: float = 24.0


DISPATCH = Dispatch()
# Under TRITON_INTERPRET=1 the autotuner would interpret every config: use one small fixed config.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, UNITS_PER_ITER=2, GROUP_M=2, SPLIT_K=1, num_warps=4, num_stages=1)
SPLITK_MAX_M = 16  # the split-K workspace holds 16 rows
KSPLIT_MAX_M = 64  # the k-split GEMM's widest row tile (BLOCK_M 16, 32 or 64)
_WORKSPACES: dict = {}


def splitk_workspace(device, n: int):
    """Zeroed int32 ``[16, N]`` partial sums and ``[ceil(N / 4) + 4]`` arrival counters for split-K decode
    (one per output tile of >= 4 channels; the group GEMV lays its 2-3 weights' sums and counters one after
    the other, ``N`` = their total), one pair per (device, stream, N); every split-K launch leaves them zero again
    (the last slice re-zeroes its tile). Kernels on one stream run in order, so linears of the same N can
    share them; each stream has its own (``_common.stream_key``). Never freed: a captured CUDA graph keeps
    pointing at them."""
    key = (*stream_key(device), n)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros((SPLITK_MAX_M, n), dtype=torch.int32, device=device),
                            torch.zeros((triton.cdiv(n, 4) + 4,), dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def _config_clock(fn, quantiles):
    """The autotuners' clock: a config's GPU time with the L2 cold, replayed in a CUDA graph
    (``path_clock.streaming_time``), the clock the dispatch ranks whole paths by. The earlier clock,
    ``triton.testing.do_bench``, times each call on its own after a memset of the L2; on the H100
    (2026-12-06, ``python examples/bench_autotune_clock.py``) three fresh autotunes per case with each clock,
    12 cases (four shapes; GEMV at M = 1 and 4, k-split at M = 16), picked configs that ran in total 13.5 us
    slower than each case's best (once 8.9 us against 5.9: 4096x4096 at M = 1), against 0.9 us with this one.

    Inside ``_timed_after(producer)`` each timed call is ``producer()`` then the config's launch: a programmatic
    dependent launch (PDL) is timed behind the kernel it overlaps, as it runs. On its own the GEMV's best config
    and its best behind ``quantize_rows`` differ: H100, 2026-12-06 (``examples/results/gemv_pdl_configs_h100.txt``;
    ``bench_gemv_pieces.py --pdl-configs`` times the same), M = 1, 11008x4096: (4, 64, 1 warp) 10.4 us alone but
    12.1 behind the quantization, (16, 64, 4 warps) 11.0 / 11.1."""
    producer = _PRODUCER[-1] if _PRODUCER else None
    call = fn if producer is None else (lambda: (producer(), fn()))
    t = path_clock.streaming_time(call, torch.device("cuda", torch.cuda.current_device()),
                                  "w4a8 kernel config choice")
    return [t] * len(quantiles) if quantiles else t


# The launch a PDL kernel waits on, for ``_config_clock`` (innermost last): set by ``_timed_after`` around
# launches that follow their own activation quantization.
_PRODUCER: list = []


@contextlib.contextmanager
def _timed_after(producer):
    """Within: an autotuner timing a config (``_config_clock``) runs ``producer()`` (None: nothing) before each
    launch it times. Used around GEMV launches that are programmatic dependents of a quantization, which
    ``producer`` launches again."""
    _PRODUCER.append(producer)
    try:
        yield
    finally:
        _PRODUCER.pop()


def _autotune(configs, key, prune, kernel):
    """``triton.autotune`` with our benchmark; the tuning results kept on disk in Triton's cache (keyed by
    Triton, target, kernel source, key values and configs) where this Triton can (>= 3.4), so a second
    process compiles only the winning config of each shape instead of all of them. ``QCOMPILE_AUTOTUNE_CACHE=0``
    turns that off."""
    extra = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        extra["cache_results"] = dispatch_cache.enabled()
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune}, do_bench=_config_clock,
                           **extra)(kernel)


def m_bucket(m: int) -> int:
    """The M bucket of ``m`` rows (the next power of two, at most 4096): the tiled GEMM autotuner's ``M_BUCKET`` and
    the M part of every path-choice key, so one timing serves the Ms of a bucket."""
    return min(triton.next_power_of_2(m), 4096)


_KEY = ["M_BUCKET", "N", "K", "n_units", "W_KIND", "GROUPED", "X_GROUPED", "USE_ASM", "FUSE_QUANT"]
_decode_kernel = _autotune(kern.DECODE_CONFIGS, _KEY, kern.prune_configs, kern.w4_gemm_kernel)
_splitk_decode_kernel = _autotune(kern.SPLITK_DECODE_CONFIGS, _KEY, kern.prune_configs, kern.w4_gemm_kernel)
_fused_decode_kernel = _autotune(kern.FUSED_DECODE_CONFIGS, _KEY, kern.prune_configs, kern.w4_gemm_kernel)
_GEMV_AUTOTUNED = gemv_kern.GEMV_CONFIGS + gemv_kern.GEMV_SPLITK_CONFIGS  # split ones pruned below SPLITK_MIN_K
_GEMV_KEY = ["BLOCK_M", "K", "DINT", "FUSE_QUANT", "X_WORDS", "USE_ASM", "LUT", "X_DIRECT", "PDL", "W_LOAD"]


def _with_even(kernel, n_args):
    """``kernel`` with EVEN (no masks in the K loop) set from the shapes (``n_args``: its N arguments) and the
    config the autotuner (or the caller) picked."""
    return triton.heuristics({"EVEN": lambda a: gemv_kern.even(
        [a[n] for n in n_args], a["K"], a["PACK_K"], a["BLOCK_N"], a["BLOCK_W"], a["SPLIT_K"])})(kernel)


_gemv_even = _with_even(gemv_kern.w4_gemv_kernel, ["N"])
_gemv_group_even = _with_even(gemv_kern.w4_gemv_group_kernel, ["N0", "N1", "N2"])
# One autotuner per config set: DISPATCH.gemv_prefetch2 adds the PREFETCH = 2 configs.
_GEMV_SETS = {False: _GEMV_AUTOTUNED, True: _GEMV_AUTOTUNED + gemv_kern.GEMV_PREFETCH2_CONFIGS}
_gemv_kernels = {pf: _autotune(cfgs, ["N", *_GEMV_KEY], gemv_kern.prune_gemv_configs, _gemv_even)
                 for pf, cfgs in _GEMV_SETS.items()}
_gemv_group_kernels = {pf: _autotune(cfgs, ["N0", "N1", "N2", "G", *_GEMV_KEY], gemv_kern.prune_gemv_configs,
                                     _gemv_group_even) for pf, cfgs in _GEMV_SETS.items()}
_prefill_kernel = _autotune(kern.PREFILL_CONFIGS, _KEY, kern.prune_configs, kern.w4_gemm_kernel)
_KSPLIT_KEY = ["M_BUCKET", "N", "K", "DINT", "USE_ASM", "LUT", "PDL"]
_ksplit_kernel = _autotune(ksplit_kern.KSPLIT_CONFIGS, _KSPLIT_KEY, ksplit_kern.prune_ksplit_configs,
                           ksplit_kern.w4_ksplit_kernel)
_ksplit_wide_kernel = _autotune(ksplit_kern.KSPLIT_WIDE_CONFIGS, _KSPLIT_KEY, ksplit_kern.prune_ksplit_configs,
                                ksplit_kern.w4_ksplit_kernel)


def _use_asm(device: torch.device, use_asm: bool | None) -> bool:
    on_gpu = device.type == "cuda" and not interpreting()
    return on_gpu and (DISPATCH.use_asm if use_asm is None else use_asm)


def expand_weight(pw: PackedWeight, use_asm: bool | None = None) -> torch.Tensor:
    """int8 ``[C, N, PACK_K]`` weight values ``t`` (natural k order in each chunk), for ``W_KIND == 2``."""
    c, n, half = pw.qweight.shape
    out = torch.empty((c, n, 2 * half), dtype=torch.int8, device=pw.device)
    block_n = 64
    kern.expand_kernel[(c, triton.cdiv(n, block_n))](
        pw.qweight, pw.zero_byte, out, n, GROUPED=pw.group_size > 0,
        CHUNKS_PER_UNIT=max(1, pw.group_size // pw.pack_k), W_KIND=_w_kind(pw), DINT_R=pw.dint_r,
        PACK_K=pw.pack_k, USE_ASM=_use_asm(pw.device, use_asm), BLOCK_N=block_n)
    return out


def _w_kind(pw: PackedWeight) -> int:
    return 1 if pw.spec.kind == "dint" else 0


def launch_gemm(x, x_scale, x_zp, pw: PackedWeight, y, *, act_bits=8, act_sym=False, fuse_quant=False,
                x_grouped=False, bias=None, int_out=False, w_expanded=None, config=None, use_asm=None,
                split_k=False, pdl=False):
    """Run ``w4_gemm_kernel`` into ``y [M, N]``.

    Args:
        x: int8 codes ``[M, K]`` (signed convention), or the fp activation when ``fuse_quant``.
        x_scale, x_zp: ``[M, Gx]`` fp32 / int32 activation qparams (ignored when ``fuse_quant``).
        pw: packed weight; y: output (fp16/bf16/fp32, or int32 with ``int_out``).
        int_out: store the exact int32 accumulator ``sum_k (xq - zx) t`` (scales ignored), for tests.
        w_expanded: int8 weight from ``expand_weight`` (skips in-loop unpacking).
        config: explicit tile config (dict of BLOCK_M, BLOCK_N, UNITS_PER_ITER, GROUP_M, SPLIT_K, num_warps,
            num_stages) instead of the autotuner.
        split_k: the split-K decode kernel (per-channel weights, quantized activations, M <= 16).
        pdl: launch as a programmatic dependent of the previous kernel (``quantize_rows(pdl=True)``); CUDA only.
    """
    m, k = x.shape
    n = pw.out_features
    grouped = pw.group_size > 0
    n_units = pw.n_groups if grouped else pw.qweight.shape[0]
    if fuse_quant:
        x_scale, x_zp = x, x  # unused by the kernel
    meta = dict(
        W_KIND=2 if w_expanded is not None else _w_kind(pw), DINT_R=pw.dint_r, PACK_K=pw.pack_k,
        CHUNKS_PER_UNIT=pw.group_size // pw.pack_k if grouped else 1, GROUPED=grouped, X_GROUPED=x_grouped,
        HAS_BIAS=bias is not None, INT_OUT=int_out, USE_ASM=_use_asm(x.device, use_asm),
        FUSE_QUANT=fuse_quant, X_QMAX=(1 << act_bits) - 1, X_SYMMETRIC=act_sym, X_RECIP_DIV=recip_div(x.device))
    if pdl_launch(pdl, x.device):
        meta.update(PDL=True, launch_pdl=True)
    splitting = split_k or (config is not None and config.get("SPLIT_K", 1) > 1)
    if splitting and (grouped or fuse_quant or m > SPLITK_MAX_M):
        raise ValueError("split-K takes per-channel weights, pre-quantized activations and M <= 16")
    ws, locks = splitk_workspace(x.device, n) if splitting else (y, y)
    args = (x, x_scale, x_zp, x.stride(0), x_scale.stride(0) if x_scale.dim() == 2 else 1,
            pw.qweight if w_expanded is None else w_expanded, pw.unit_scale, pw.code_sum, pw.zero_byte,
            y if bias is None else bias, y, y.stride(0), ws, locks, m, n, k, n_units, m_bucket(m))

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]) * meta_["SPLIT_K"],)

    if config is None and interpreting():
        config = dict(INTERPRET_CONFIG, SPLIT_K=3 if split_k else 1)
    if config is not None:
        kern.w4_gemm_kernel[grid](*args, **meta, **{"SPLIT_K": 1, **config})
    elif split_k:
        _splitk_decode_kernel[grid](*args, **meta)
    elif m <= DISPATCH.decode_max_m:
        (_fused_decode_kernel if fuse_quant else _decode_kernel)[grid](*args, **meta)
    else:
        _prefill_kernel[grid](*args, **meta)
    return y


def _gemv_meta(x, pw: PackedWeight, *, act_bits, act_sym, fuse_quant, has_bias, int_out, use_asm, lut,
               pdl=False, direct_rows=None) -> dict:
    """The GEMV's compile-time arguments for activation ``x [M, K]`` and weight ``pw`` (checks both), and
    the ``launch_pdl`` launch option where ``pdl`` takes effect (``_common.pdl_launch``). ``direct_rows``: the
    per-row accumulators at M = 2-4 (default ``DISPATCH.gemv_direct_rows``)."""
    m, k = x.shape
    if pw.group_size > 0 or m > SPLITK_MAX_M:
        raise ValueError("the GEMV takes per-channel weights, per-token activations, M <= 16, packed codes")
    pdl = pdl_launch(pdl, x.device)
    block_m = triton.next_power_of_2(max(m, 1))
    # int8 codes read as words: x itself, or with fuse_quant the kernel's contiguous codes buffer
    x_words = k % 4 == 0 and (fuse_quant or (x.stride(0) % 4 == 0 and x.data_ptr() % 4 == 0))
    lut_ok = _w_kind(pw) == 1 and pw.dint_r <= 4
    use_lut = lut_ok and (DISPATCH.gemv_lut if lut is None else lut)
    if lut and not lut_ok:
        raise ValueError(f"the table unpacker takes dINT weights with R <= 4, not {pw.fmt}")
    return dict(DINT=_w_kind(pw) == 1, LUT=use_lut, DINT_R=pw.dint_r, PACK_K=pw.pack_k, HAS_BIAS=has_bias,
                INT_OUT=int_out, USE_ASM=_use_asm(x.device, use_asm), FUSE_QUANT=fuse_quant, X_WORDS=x_words,
                X_QMAX=(1 << act_bits) - 1, X_SYMMETRIC=act_sym, X_RECIP_DIV=recip_div(x.device),
                STAT_BLOCK=gemv_kern.stat_block(k, block_m), BLOCK_M=block_m, PDL=pdl, W_LOAD=DISPATCH.gemv_w_load,
                X_DIRECT=DISPATCH.gemv_direct and x_words and not use_lut and (block_m == 1 or (
                    (DISPATCH.gemv_direct_rows if direct_rows is None else direct_rows) and block_m <= 4)),
                **({"launch_pdl": True} if pdl else {}))  # the launch option only where used


INTERPRET_GEMV_CONFIG = dict(BLOCK_N=8, BLOCK_W=32, SPLIT_K=1, num_warps=4)
EXPLICIT_GEMV_DEFAULTS = dict(SPLIT_K=1, PIPELINE=0, PREFETCH=1)  # what an explicit GEMV config may leave out


def _l2_args(l2_next, y: torch.Tensor):
    """The GEMV's prefetch arguments ``(pf0_ptr, pf0_bytes, ..., pf2_bytes)`` and meta (``L2_NEXT``,
    ``L2_EARLY``) for ``l2_next`` (up to 3 tensors: the next kernel's weights), ``DISPATCH.l2_prefetch``
    and its byte cap; nothing on CPU / under the interpreter (no bulk prefetch there)."""
    mode = DISPATCH.l2_prefetch
    if mode not in ("off", "end", "start"):
        raise ValueError(f"DISPATCH.l2_prefetch must be 'off', 'end' or 'start', not {mode!r}")
    regions, budget = [], int(DISPATCH.l2_prefetch_mb * 2**20)
    if mode != "off" and l2_next and y.device.type == "cuda" and not interpreting():
        for t in list(l2_next)[:3]:
            nbytes = min(t.numel() * t.element_size(), budget) // 16 * 16
            if nbytes > 0 and t.device == y.device and t.data_ptr() % 16 == 0:
                regions.append((t, nbytes))
                budget -= nbytes
    args = [a for t, nb in regions for a in (t, nb)]
    args += [y, 0] * (3 - len(regions))
    return tuple(args), dict(L2_NEXT=len(regions), L2_EARLY=mode == "start")


def _gemv_workspace(device, n: int, k: int, config: dict | None, y: torch.Tensor):
    """The split-K workspace where this launch may split K (an explicit SPLIT_K > 1, or an autotuned one
    with K >= SPLITK_MIN_K, the only case its split configs survive pruning); else ``(y, y)``, never read."""
    split = config.get("SPLIT_K", 1) > 1 if config is not None else k >= gemv_kern.SPLITK_MIN_K
    return splitk_workspace(device, n) if split else (y, y)


def _gemv_activation(x, x_scale, x_zp, fuse_quant: bool):
    """The GEMV kernels' ``x_scale``, ``x_zp`` and ``xq`` arguments. With ``fuse_quant`` the kernel reads ``x``'s
    values, writes their codes into a new int8 buffer ``xq`` and reads them back (the qparams are its own: the two
    pointers are never read); else ``xq`` is never read."""
    if not fuse_quant:
        return x_scale, x_zp, x
    return x, x, torch.empty(x.shape, dtype=torch.int8, device=x.device)


def launch_gemv(x, x_scale, x_zp, pw: PackedWeight, y, *, act_bits=8, act_sym=False, fuse_quant=False,
                x_grouped=False, bias=None, int_out=False, w_expanded=None, config=None, use_asm=None,
                split_k=False, lut=None, pdl=False, l2_next=None, direct_rows=None):
    """Run ``w4_gemv_kernel`` into ``y [M, N]`` (same arguments as ``launch_gemm``; per-channel weights,
    per-token activations, M <= 16). ``config``: explicit ``BLOCK_N``, ``BLOCK_W``, ``num_warps`` and
    optionally ``SPLIT_K`` (default 1), ``PREFETCH`` (tiles ahead in the register buffer, 1 or 2; default 1)
    and ``PIPELINE`` (stages of the compiler-pipelined weight stream; default 0, the register buffer).
    ``lut``: the table unpacker (dINT with R <= 4 only); default ``DISPATCH.gemv_lut``.
    ``pdl``: launch as a programmatic dependent of the previous kernel (``quantize_rows(pdl=True)``): the
    weight prologue overlaps that kernel (Hopper; CUDA only, off in the interpreter).
    ``l2_next``: the next kernel's weight tensors, prefetched into L2 as ``DISPATCH.l2_prefetch`` says.
    ``direct_rows``: one accumulator per row at M = 2-4 (default ``DISPATCH.gemv_direct_rows``)."""
    m, k = x.shape
    n = pw.out_features
    if x_grouped or w_expanded is not None or split_k:
        raise ValueError("the GEMV takes per-channel weights, per-token activations, M <= 16, packed codes")
    meta = _gemv_meta(x, pw, act_bits=act_bits, act_sym=act_sym, fuse_quant=fuse_quant, has_bias=bias is not None,
                      int_out=int_out, use_asm=use_asm, lut=lut, pdl=pdl, direct_rows=direct_rows)
    x_scale, x_zp, xq = _gemv_activation(x, x_scale, x_zp, fuse_quant)
    if config is None and interpreting():
        config = INTERPRET_GEMV_CONFIG
    ws, tickets = _gemv_workspace(x.device, n, k, config, y)
    pf_args, pf_meta = _l2_args(l2_next, y)
    meta.update(pf_meta)
    args = (x, x_scale, x_zp, x.stride(0), xq, pw.qweight, pw.unit_scale, pw.code_sum, pw.zero_byte,
            y if bias is None else bias, y, y.stride(0), ws, tickets, *pf_args, m, n, k)

    def grid(meta_):
        return (triton.cdiv(n, meta_["BLOCK_N"]), meta_["SPLIT_K"])

    if config is not None:
        _gemv_even[grid](*args, **{**meta, **EXPLICIT_GEMV_DEFAULTS, **config})  # a config's W_LOAD wins
    else:
        _gemv_kernels[DISPATCH.gemv_prefetch2][grid](*args, **meta)
    return y


GROUP_MAX = 3  # weights per w4_gemv_group_kernel launch


def launch_gemv_group(x, x_scale, x_zp, pws: list, ys: list, *, act_bits=8, act_sym=False, fuse_quant=False,
                      biases=None, int_out=False, config=None, use_asm=None, lut=None, pdl=False, l2_next=None,
                      direct_rows=None):
    """``launch_gemv`` for 2 or 3 weights of one activation in a single launch (``w4_gemv_group_kernel``).

    Every weight must have the same format (dINT R), pack width and ``in_features`` = ``x.shape[1]``;
    ``biases``: ``None`` or one per weight, all tensors or all ``None``. Outputs are bitwise those of
    ``launch_gemv`` per weight with the same tile config.
    """
    m, k = x.shape
    biases = list(biases) if biases is not None else [None] * len(pws)
    if not 2 <= len(pws) <= GROUP_MAX or len(ys) != len(pws) or len(biases) != len(pws):
        raise ValueError(f"launch_gemv_group takes 2..{GROUP_MAX} weights with one output (and bias) each")
    has_bias = biases[0] is not None
    if any((b is not None) != has_bias for b in biases):
        raise ValueError("launch_gemv_group: give a bias for every weight or for none")
    metas = [_gemv_meta(x, pw, act_bits=act_bits, act_sym=act_sym, fuse_quant=fuse_quant, has_bias=has_bias,
                        int_out=int_out, use_asm=use_asm, lut=lut, pdl=pdl, direct_rows=direct_rows) for pw in pws]
    if any(md != metas[0] for md in metas) or any(pw.in_features != k for pw in pws):
        raise ValueError("launch_gemv_group: the weights differ in format, packing or in_features")
    x_scale, x_zp, xq = _gemv_activation(x, x_scale, x_zp, fuse_quant)
    sets = [(pw.qweight, pw.unit_scale, pw.code_sum, pw.zero_byte, y if b is None else b, y, y.stride(0),
             pw.out_features) for pw, y, b in zip(pws, ys, biases)]
    sets += sets[-1:] * (GROUP_MAX - len(sets))
    ns = [pw.out_features for pw in pws]
    if config is None and interpreting():
        config = INTERPRET_GEMV_CONFIG
    ws, tickets = _gemv_workspace(x.device, sum(ns), k, config, ys[0])
    pf_args, pf_meta = _l2_args(l2_next, ys[0])
    metas[0].update(pf_meta)
    args = (x, x_scale, x_zp, x.stride(0), xq, *[a for st in sets for a in st], ws, tickets, *pf_args, m, k)

    def grid(meta_):
        return (sum(triton.cdiv(n, meta_["BLOCK_N"]) for n in ns), meta_["SPLIT_K"])

    if config is not None:
        _gemv_group_even[grid](*args, G=len(pws), **{**metas[0], **EXPLICIT_GEMV_DEFAULTS, **config})
    else:
        _gemv_group_kernels[DISPATCH.gemv_prefetch2][grid](*args, G=len(pws), **metas[0])
    return ys


def _quantized_gemm(x, pw, y, act_bits, act_sym, act_group, bias, expand, split_k=False):
    # Decode: the GEMM launches as a programmatic dependent of the quantization, as the GEMV does.
    pdl = DISPATCH.gemm_pdl and x.shape[0] <= DISPATCH.decode_max_m
    xq, xs, xz = quantize_rows(x, act_bits, act_sym, act_group, pdl=pdl)
    w_exp = expand_weight(pw) if expand else None
    return launch_gemm(xq, xs, xz, pw, y, act_bits=act_bits, act_sym=act_sym, x_grouped=act_group > 0,
                       bias=bias, w_expanded=w_exp, split_k=split_k, pdl=pdl)


INTERPRET_KSPLIT_CONFIG = dict(BLOCK_N=16, S=4, num_warps=4, num_stages=1)


def launch_ksplit(x, x_scale, x_zp, pw: PackedWeight, y, *, bias=None, int_out=False, config=None, use_asm=None,
                  pdl=False, lut=None):
    """Run ``w4_ksplit_kernel`` (K split across warps) into ``y [M, N]``: int8 codes ``x [M, K]`` with per-token
    ``x_scale`` / ``x_zp`` (``quantize_rows``), per-channel weights, M <= 64 (row tiles of 16, 32 or 64: the
    next power of two, at least 16). ``config``: explicit ``BLOCK_N``,
    ``S``, ``num_warps``, ``num_stages`` instead of the autotuner. ``int_out``: the exact int32 sums
    ``sum_k (xq - zx) t`` (scales ignored), for tests. ``pdl``: launch as a programmatic dependent of the previous
    kernel (CUDA only). ``lut``: the table unpacker (dINT weights only); default ``DISPATCH.ksplit_lut``.
    Bitwise the output of ``launch_gemm`` on the same codes."""
    m, k = x.shape
    n = pw.out_features
    if pw.group_size > 0 or m > KSPLIT_MAX_M or x.dtype != torch.int8:
        raise ValueError(f"the k-split GEMM takes per-channel weights, int8 per-token codes and M <= {KSPLIT_MAX_M}")
    if x_scale.numel() != m or x_zp.numel() != m or k != pw.in_features:
        raise ValueError(f"the k-split decode GEMM takes per-token qparams ({m} rows) and K = {pw.in_features}")
    dint = _w_kind(pw) == 1
    if lut and not dint:
        raise ValueError(f"the k-split table unpacker takes dINT weights, not {pw.fmt}")
    meta = dict(DINT=dint, DINT_R=pw.dint_r, PACK_K=pw.pack_k, HAS_BIAS=bias is not None,
                INT_OUT=int_out, USE_ASM=_use_asm(x.device, use_asm), PDL=False,
                LUT=dint and (DISPATCH.ksplit_lut if lut is None else lut), BLOCK_M=ksplit_kern.ksplit_block_m(m))
    if pdl_launch(pdl, x.device):
        meta.update(PDL=True, launch_pdl=True)
    args = (x, x_scale.reshape(m), x_zp.reshape(m), x.stride(0), pw.qweight, pw.unit_scale, pw.code_sum,
            pw.zero_byte, y if bias is None else bias, y, y.stride(0), m, n, k, m_bucket(m))

    def grid(meta_):
        return (triton.cdiv(n, meta_["BLOCK_N"]),)

    if config is None and interpreting():
        config = INTERPRET_KSPLIT_CONFIG
    if config is not None:
        ksplit_kern.w4_ksplit_kernel[grid](*args, **meta, **config)
    else:
        (_ksplit_kernel if m <= 16 else _ksplit_wide_kernel)[grid](*args, **meta)
    return y


def _after_quantization(x, act_bits, act_sym, pdl, launch):
    """``launch(xq, xs, xz)`` on ``x``'s per-token codes from ``quantize_rows``; with ``pdl`` (the launch a
    programmatic dependent of the quantization) its kernel configs are timed behind a replay of that
    quantization (``_timed_after``), as it runs."""
    def quantize():
        return quantize_rows(x, act_bits, act_sym, 0, pdl=pdl)

    q = quantize()
    with _timed_after(quantize if pdl else None):
        return launch(*q)


def _quantized_ksplit(x, pw, y, act_bits, act_sym, bias, pdl=None):
    pdl = DISPATCH.ksplit_pdl if pdl is None else pdl
    return _after_quantization(x, act_bits, act_sym, pdl,
                               lambda xq, xs, xz: launch_ksplit(xq, xs, xz, pw, y, bias=bias, pdl=pdl))


def _quantized_gemv(x, pw, y, act_bits, act_sym, bias, l2_next=None, direct_rows=None):
    pdl = DISPATCH.gemv_pdl
    return _after_quantization(x, act_bits, act_sym, pdl, lambda xq, xs, xz: launch_gemv(
        xq, xs, xz, pw, y, act_bits=act_bits, act_sym=act_sym, bias=bias, pdl=pdl, l2_next=l2_next,
        direct_rows=direct_rows))


def _fallback_first(m: int, gemv: dict, tiled: dict) -> dict:
    """Decode candidates with the one ``_choose_path`` takes untimed first: the GEMV at M <= 4, the tiled GEMM
    above (the paths the H100 runs chose most)."""
    return {**gemv, **tiled} if m <= 4 else {**tiled, **gemv}


def _rows_candidate(m: int) -> bool:
    """Whether the per-row GEMV is a candidate of its own at this M (``DISPATCH.gemv_rows_candidate``)."""
    return DISPATCH.gemv_rows_candidate and not DISPATCH.gemv_direct_rows and 2 <= m <= 4


def _ksplit_wide(m: int) -> bool:
    """Whether the k-split GEMM with a 32- or 64-row tile is a candidate at this M (above the decode M, up to
    ``KSPLIT_MAX_M``; ``DISPATCH.ksplit_wide_candidate``)."""
    return DISPATCH.ksplit_wide_candidate and DISPATCH.decode_max_m < m <= KSPLIT_MAX_M


_PATH_CACHE: dict = {}
# Paths run because they were a call's only candidate (e.g. the tiled GEMM at M = 64): not timed, so never reused as
# a choice (the same key may offer more candidates at another M of its bucket); kept for the reports below.
_SOLE_PATH: dict = {}


def _paths_run() -> dict:
    """Every path the dispatch ran in this process, by choice key: the timed choices over the sole candidates."""
    return {**_SOLE_PATH, **_PATH_CACHE}


def chosen_path(m: int, out_features: int, in_features: int, act_bits: int = 8) -> str | None:
    """The path the dispatch chose in this process for a single weight of this shape at ``m`` rows (its M
    bucket) and activation width (the only one where it had one candidate), or None if it has run none
    (benchmarks print it)."""
    bucket = m_bucket(m)
    return next((path for key, path in _paths_run().items()  # single-weight keys only: (decode?, bucket, N, K, ...)
                 if isinstance(key[0], bool) and key[1] == bucket and key[2:4] == (out_features, in_features)
                 and key[6] == act_bits), None)


def dispatch_choices(m: int) -> dict:
    """Every path the dispatch chose (or ran as the only candidate) in this process at ``m`` rows' M bucket under
    the current ``DISPATCH`` switches, as ``{site: path}``; a site is ``"linear NxK"`` (one weight),
    ``"shared NxK"`` (one of sibling weights on shared codes), or ``"group N1+N2xK"`` / ``"group_codes ..."``
    (sibling weights together). For benchmarks to say which kernels a model ran."""
    bucket, switches, out = m_bucket(m), _kernel_switches(), {}
    for key, path in _paths_run().items():
        if key[-2] != switches:
            continue
        if isinstance(key[0], bool):  # w4_linear_2d: (decode?, bucket, N, K, ...)
            site, b = f"linear {key[2]}x{key[3]}", key[1]
        elif key[0] == "shared":  # ("shared", decode?, bucket, N, K, ...)
            site, b = f"shared {key[3]}x{key[4]}", key[2]
        else:  # ("group" | "group_codes", bucket, (N, ...), K, ...)
            site, b = f"{key[0]} {'+'.join(map(str, key[2]))}x{key[3]}", key[1]
        if b == bucket:
            out[site] = path
    return out


def _kernel_switches() -> tuple:
    """The ``DISPATCH`` switches that change what a path's kernels do: part of every path-choice key, so a
    choice timed with one setting is not reused under another (an experiment that speeds up one path gets
    the choice between paths timed again)."""
    d = DISPATCH
    return (d.gemv_direct, d.gemv_direct_rows, d.gemv_rows_candidate, d.gemv_prefetch2, d.gemv_pdl, d.gemm_pdl,
            d.gemv_lut, d.use_asm, d.l2_prefetch, d.l2_prefetch_mb, d.ksplit_candidate, d.ksplit_lut, d.ksplit_pdl,
            d.ksplit_pdl_candidate, d.ksplit_wide_candidate, d.gemv_w_load)


def _choose_path(key: tuple, candidates: dict, forced: str) -> str:
    """``forced`` if set, else the fastest candidate for ``key`` (the call's shapes and options, ending with
    its device) under the current kernel switches (``_kernel_switches``): timed once, kept in this process
    and on disk (``dispatch_cache``: a later process takes it without timing or compiling the rest)."""
    if forced != "auto":
        if forced not in candidates:
            raise ValueError(f"path {forced!r} is not available here; candidates: {sorted(candidates)}")
        return forced
    key = (*key[:-1], _kernel_switches(), key[-1])
    # A choice is taken only where this call offers it: an M bucket can straddle a candidate's bound (bucket 256 is
    # M = 129-256, and "expand" is offered from DISPATCH.expand_min_m = 256), so "expand" timed at M = 256 is no
    # answer at M = 200, which runs its only candidate instead.
    if _PATH_CACHE.get(key) in candidates:
        return _PATH_CACHE[key]
    first = next(iter(candidates))  # the fallback where nothing can be timed: callers put a good guess first
    if len(candidates) == 1:
        _SOLE_PATH[key] = first
        return first
    if interpreting() or torch.compiler.is_compiling():
        return first
    env = dispatch_cache.environment(key[-1])
    stored = dispatch_cache.lookup(env, key)
    if stored in candidates:
        _PATH_CACHE[key] = stored
        return stored
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return first  # a CUDA graph being captured: no timing here (a choice stored earlier is taken above)
    times = {}
    for name, fn in candidates.items():
        fn()  # compiles and autotunes this path's kernels first
        times[name] = path_clock.streaming_time(fn, key[-1])  # weights from HBM, as in a model
    _PATH_CACHE[key] = min(times, key=times.get)
    dispatch_cache.store(env, key, _PATH_CACHE[key])
    return _PATH_CACHE[key]


def w4_linear_2d(x: torch.Tensor, pw: PackedWeight, act_bits: int, act_sym: bool, act_group: int,
                 bias: torch.Tensor | None, l2_next=None) -> torch.Tensor:
    """``y = dequant(quant(x)) @ dequant(W).T (+ bias)`` for a contiguous ``x [M, K]`` on the Triton path.
    ``l2_next``: the next linear's weight tensors, for the GEMV paths' L2 prefetch (``launch_gemv``)."""
    m = x.shape[0]
    y = torch.empty((m, pw.out_features), dtype=x.dtype, device=x.device)
    if m == 0:
        return y

    def gemm(expand, split_k=False):
        return lambda: _quantized_gemm(x, pw, y, act_bits, act_sym, act_group, bias, expand, split_k)

    if m <= DISPATCH.decode_max_m:
        candidates = {"unfused": gemm(False)}
        if pw.group_size == 0 and m <= SPLITK_MAX_M:
            candidates["splitk"] = gemm(False, split_k=True)
        if DISPATCH.ksplit_candidate and pw.group_size == 0 and act_group == 0:
            candidates["ksplit"] = lambda: _quantized_ksplit(x, pw, y, act_bits, act_sym, bias)
            if DISPATCH.ksplit_pdl_candidate and not DISPATCH.ksplit_pdl:
                candidates["ksplit_pdl"] = lambda: _quantized_ksplit(x, pw, y, act_bits, act_sym, bias, pdl=True)
            gemv = {"gemv": lambda: _quantized_gemv(x, pw, y, act_bits, act_sym, bias, l2_next)}
            candidates = _fallback_first(m, gemv, candidates)
            if _rows_candidate(m):
                candidates["gemv_rows"] = lambda: _quantized_gemv(x, pw, y, act_bits, act_sym, bias, l2_next, True)
            candidates["gemv_fused"] = lambda: launch_gemv(x, None, None, pw, y, act_bits=act_bits,
                                                           act_sym=act_sym, fuse_quant=True, bias=bias,
                                                           l2_next=l2_next)
        if act_group == 0:  # last: it never won a timing on the H100 (75-560 us)
            candidates["fused"] = lambda: launch_gemm(x, None, None, pw, y, act_bits=act_bits, act_sym=act_sym,
                                                      fuse_quant=True, bias=bias)
        forced = DISPATCH.decode_path
    else:
        candidates = {"inloop": gemm(False)}
        if m >= DISPATCH.expand_min_m:
            candidates["expand"] = gemm(True)
        if _ksplit_wide(m) and pw.group_size == 0 and act_group == 0:
            candidates["ksplit"] = lambda: _quantized_ksplit(x, pw, y, act_bits, act_sym, bias)
        forced = DISPATCH.prefill_path
    key = (m <= DISPATCH.decode_max_m, m_bucket(m), pw.out_features, pw.in_features,
           pw.fmt, pw.group_size, act_bits, act_sym, act_group, x.dtype, bias is not None, x.device)
    return candidates[_choose_path(key, candidates, forced)]()


def w4_linear_2d_shared(x: torch.Tensor, pws: list, act_bits: int, act_sym: bool, biases: list,
                        l2_next=None) -> list:
    """``w4_linear_2d`` for several per-channel weights on one ``x [M, K]`` with int8 per-token
    activations, quantized once.

    Decode (M <= 16, 2-3 weights, biases all or none), one of (``DISPATCH.group_path``; ``auto`` times
    them once per shape set and keeps the fastest):

    * ``per_weight``: one ``quantize_rows`` launch, then each weight's fastest pre-quantized path;
    * ``gemv_group``: one ``quantize_rows`` launch, then one ``w4_gemv_group_kernel`` launch for all;
    * ``gemv_group_fused``: the group kernel quantizing the activation itself: a single launch;
    * ``gemv_group_rows`` (M = 2-4, ``DISPATCH.gemv_rows_candidate``): ``gemv_group`` with per-row accumulators.

    Otherwise ``per_weight`` (prefill: ``inloop`` / ``expand`` per weight on the shared codes).
    ``l2_next``: the next linear's weight tensors, for the GEMVs' L2 prefetch (``launch_gemv``).
    """
    if any(pw.group_size > 0 for pw in pws):
        raise ValueError("w4_linear_2d_shared takes per-channel weights")
    m = x.shape[0]
    ys = [torch.empty((m, pw.out_features), dtype=x.dtype, device=x.device) for pw in pws]
    if m == 0:
        return ys
    pdl = DISPATCH.gemv_pdl

    def quantize():
        return quantize_rows(x, act_bits, act_sym, 0, pdl=pdl)

    cands = _codes_candidates(quantize, pws, ys, biases, act_bits, act_sym, pdl, l2_next,
                              producer=quantize if pdl else None)
    if not _groupable(m, pws, biases):
        return cands["per_weight"]()
    cands["gemv_group_fused"] = lambda: launch_gemv_group(x, None, None, pws, ys, biases=biases, fuse_quant=True,
                                                          act_bits=act_bits, act_sym=act_sym, l2_next=l2_next)
    key = ("group", m_bucket(m), tuple(pw.out_features for pw in pws), pws[0].in_features,
           pws[0].fmt, act_bits, act_sym, x.dtype, biases[0] is not None, x.device)
    return cands[_choose_path(key, cands, DISPATCH.group_path)]()


def w4_linear_2d_codes(xq: torch.Tensor, xs: torch.Tensor, xz: torch.Tensor, pws: list, act_bits: int,
                       act_sym: bool, biases: list, out_dtype: torch.dtype) -> list:
    """``w4_linear_2d_shared`` on activations quantized elsewhere: ``xq [M, K]`` int8 codes, ``xs [M, 1]``
    fp32 scales, ``xz [M, 1]`` int32 zero-points (``quantize_rows``'s signed convention), for one or more
    per-channel weights. Decode with 2-3 weights: ``per_weight`` or ``gemv_group`` (timed, as there);
    else each weight's fastest pre-quantized path."""
    if any(pw.group_size > 0 for pw in pws):
        raise ValueError("w4_linear_2d_codes takes per-channel weights")
    m = xq.shape[0]
    ys = [torch.empty((m, pw.out_features), dtype=out_dtype, device=xq.device) for pw in pws]
    if m == 0:
        return ys
    cands = _codes_candidates(lambda: (xq, xs, xz), pws, ys, biases, act_bits, act_sym, DISPATCH.gemv_pdl)
    if not _groupable(m, pws, biases):
        return cands["per_weight"]()
    forced = DISPATCH.group_path if DISPATCH.group_path in cands else "auto"
    key = ("group_codes", m_bucket(m), tuple(pw.out_features for pw in pws),
           pws[0].in_features, pws[0].fmt, act_bits, act_sym, out_dtype, biases[0] is not None, xq.device)
    return cands[_choose_path(key, cands, forced)]()


def _codes_candidates(codes, pws, ys, biases, act_bits, act_sym, pdl=False, l2_next=None, producer=None) -> dict:
    """The decode paths both shared entry points time on activation codes ``codes()`` = ``(xq, xs, xz)``
    (called inside each candidate, so a quantizing ``codes`` is part of what is timed); ``pdl``: the group
    GEMV (and the per-weight GEMVs) as programmatic dependents of the kernel before them (``codes()``'s
    quantization, or whatever wrote the codes: they wait for it before reading them); ``l2_next``: weights to
    prefetch into L2 (by the group GEMV, or the last weight's GEMV); ``producer``: the launch the group GEMV's
    configs are timed behind (``_timed_after``), None where the codes come from elsewhere."""
    def group(**kw):
        q = codes()
        with _timed_after(producer):
            return launch_gemv_group(*q, pws, ys, biases=biases, act_bits=act_bits, act_sym=act_sym, pdl=pdl,
                                     l2_next=l2_next, **kw)

    cands = {"per_weight": lambda: _shared_per_weight(codes(), pws, ys, biases, act_bits, act_sym, l2_next, pdl,
                                                      producer),
             "gemv_group": group}
    if _rows_candidate(ys[0].shape[0]):
        cands["gemv_group_rows"] = lambda: group(direct_rows=True)
    return cands


def _groupable(m: int, pws: list, biases: list) -> bool:
    """Whether one group GEMV launch can take these weights at this M."""
    return (m <= DISPATCH.decode_max_m and m <= SPLITK_MAX_M and 2 <= len(pws) <= GROUP_MAX
            and len({b is None for b in biases}) == 1 and len({(pw.fmt, pw.pack_k) for pw in pws}) == 1)


def _shared_per_weight(q, pws, ys, biases, act_bits, act_sym, l2_next=None, pdl=False, producer=None) -> list:
    """Each weight's fastest path on the activation codes ``q = (xq, xs, xz)`` (chosen and cached like
    ``w4_linear_2d``'s). ``producer``: the launch that wrote ``q``, which the first weight's kernel configs are
    timed behind (``_timed_after``; the later weights' launches follow the one before them)."""
    xq, xs, xz = q
    m = xq.shape[0]
    kw = dict(act_bits=act_bits, act_sym=act_sym)

    def candidates(pw, y, bias, nxt):
        if m <= DISPATCH.decode_max_m:
            gemm_pdl = pdl and DISPATCH.gemm_pdl
            cands = {"unfused": lambda: launch_gemm(xq, xs, xz, pw, y, bias=bias, pdl=gemm_pdl, **kw),
                     "splitk": lambda: launch_gemm(xq, xs, xz, pw, y, bias=bias, split_k=True, pdl=gemm_pdl, **kw)}
            gemv = {"gemv": lambda: launch_gemv(xq, xs, xz, pw, y, bias=bias, **kw, l2_next=nxt, pdl=pdl)}
            cands = _fallback_first(m, gemv, cands)
            if _rows_candidate(m):
                cands["gemv_rows"] = lambda: launch_gemv(xq, xs, xz, pw, y, bias=bias, **kw, l2_next=nxt, pdl=pdl,
                                                         direct_rows=True)
            if DISPATCH.ksplit_candidate:  # (the shared path: per-channel weights, per-token codes)
                cands["ksplit"] = lambda: launch_ksplit(xq, xs, xz, pw, y, bias=bias, pdl=pdl and DISPATCH.ksplit_pdl)
            forced = DISPATCH.decode_path
        else:
            cands = {"inloop": lambda: launch_gemm(xq, xs, xz, pw, y, bias=bias, **kw)}
            if m >= DISPATCH.expand_min_m:
                cands["expand"] = lambda: launch_gemm(xq, xs, xz, pw, y, bias=bias, w_expanded=expand_weight(pw),
                                                      **kw)
            if _ksplit_wide(m):
                cands["ksplit"] = lambda: launch_ksplit(xq, xs, xz, pw, y, bias=bias)
            forced = DISPATCH.prefill_path
        return cands, forced if forced in cands else "auto"

    for i, (pw, y, bias) in enumerate(zip(pws, ys, biases)):
        cands, forced = candidates(pw, y, bias, l2_next if i == len(pws) - 1 else None)
        key = ("shared", m <= DISPATCH.decode_max_m, m_bucket(m), pw.out_features,
               pw.in_features, pw.fmt, act_bits, act_sym, y.dtype, bias is not None, xq.device)
        with _timed_after(producer if i == 0 else None):
            cands[_choose_path(key, cands, forced)]()
    return ys
