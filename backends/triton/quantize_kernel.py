"""Fused per-token / per-group activation quantization kernel (min-max or abs-max -> signed int8 codes).

One program quantizes ``ROWS`` rows of the contiguous ``[R, L]`` view of ``x`` (a row is a token,
``L = K``, or one group of a token, ``L = g``): it reduces ``min(x, 0)`` / ``max(x, 0)``, computes the
scale and zero-point exactly as ``qcompile.formats.choose_qparams`` does (same fp32 ops, IEEE
division, round-half-even) and writes

* ``codes``: int8, the ``formats`` code minus ``2^(b-1)`` (int8: ``q - 128``; int4: ``q - 8``), so they
  feed ``tl.dot`` directly;
* ``scale``: fp32 per row; ``zp``: int32 per row, also minus ``2^(b-1)``.

Then ``x ~= (codes - zp) * scale`` per row. Codes are bit-exact with the reference on the same input
(tests check it), because every fp32 operation is the same correctly rounded one.

Long rows at decode (``SPLIT`` > 1, a few tokens of K > 4096, e.g. down_proj's 11008): the IEEE
division per element makes one program issue-bound on its SM (offline sm_90 SASS: ~25 instructions
per element, ~400 per thread at 11008 columns on 32 warps). Then ``SPLIT`` programs share a row: each
reduces the whole row (min / max: exact in any order, so all get the same scale and zero-point, which
the first one stores) and quantizes only its ``SLICE`` columns.

``DIV_RCP``: where it timed faster (rows in registers, rows split over programs) ``x / scale`` is the IEEE quotient
computed from one reciprocal per row and two FMA corrections (``_common.div_rn_shared``), bitwise ``div.rn``'s; the
two-pass loop over long prefill rows keeps ``div.rn`` (``launch_config``; ``bench_gemv_pieces.py --quant-div``).

File order (Triton tutorial): configs -> kernel -> wrapper -> check vs torch (``python -m``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._common import act_qparams, act_quantize, act_quantize_rcp, interpreting, pdl_launch, recip_div, recip_rn

__all__ = ["launch_config", "quantize_rows"]


# ----------------------------------------------------------------------------------------------- configs
# Few rows longer than SPLIT_SLICE columns: each row over cdiv(K, SPLIT_SLICE) programs of 8 warps (16 for
# rows over 4096). H100, 2026-12-05 (``bench_gemv_pieces.py --quant``, M = 1): K = 4096 2.35 -> 1.99 us,
# K = 11008 5.59 (one program) -> 2.42 us, K = 14336 5.39 -> 2.26 us; the best of the sweep at M = 1 and 4.
SPLIT_SLICE = 1024


# Many rows (prefill): each row one pass in registers up to 16384 columns (BLOCK: the next power of two), at 4 warps
# (8 up to 1024 rows). H100, 2026-12-07 (``QUANT_MS=1024,4096 bench_gemv_pieces.py --quant``), us per call, one pass
# against the previous rule's two passes over PREFILL_BLOCKS columns (the second read hitting L2), same codes:
# M = 4096: K = 11008 57.2 (4 warps) vs 65.5, K = 14336 63.8 vs 79.5; M = 1024: 17.4 (8 warps; 18.1 at 4) vs 22.7,
# 20.1 (20.4 at 4) vs 26.6; K = 4096 (one pass before too) M = 4096 18.8 at 4 warps. Three sessions before, with an
# IEEE division per element, the same one-pass rows took 146-163 us at K = 11008; the reciprocal division
# (``DIV_RCP``, on for rows in registers) is what made them cheap. Rows over 16384 keep two passes over
# PREFILL_BLOCKS columns, the block that pads the row least (ties: the longer; K = 14336 M = 4096: 79.3 us at 2048,
# 88.5 at 1024, 149.0 at 8192 on 2026-12-06).
PREFILL_BLOCKS = (2048, 1024)
ONE_PASS_MAX = 16384


def prefill_block(row_len: int) -> int:
    """Columns per step of the two-pass prefill quantization: of ``PREFILL_BLOCKS``, the one whose last step
    is fullest (fewest masked columns), the first on a tie."""
    return min(PREFILL_BLOCKS, key=lambda b: -row_len % b)


def _config(n_rows: int, row_len: int, prefill_one_pass: bool = True) -> dict:
    """Whole rows in registers up to ``ONE_PASS_MAX`` elements (one pass over x).

    Few rows (decode) are one program each: a single program's serial work is the launch's latency,
    so it gets up to 32 warps (<= 16 elements per thread); many rows up to 4096 columns keep <= 32 per thread at
    4-8 warps, longer ones one row a program at 4 warps (8 up to 1024 rows; the comment above
    ``PREFILL_BLOCKS``), rows over ``ONE_PASS_MAX`` two passes of ``prefill_block`` columns (the second read
    hits L2). Few rows longer than ``SPLIT_SLICE`` are coded by several programs each (``SPLIT``, module
    docstring). ``prefill_one_pass=False`` keeps the rule timed before it for many rows over 4096 columns (two
    passes of ``prefill_block`` columns at 8 warps): for the kernels that hold more than x per element (the SwiGLU
    prologue, ``rmsnorm_quant_kernel``), whose one-pass rows were not timed.
    """
    block = min(triton.next_power_of_2(max(row_len, 16)), ONE_PASS_MAX)
    rows = max(1, min(4096 // block, triton.next_power_of_2(n_rows)))
    slice_ = 0
    if n_rows <= 64:
        num_warps = max(4, min(32, rows * block // 256))
        if row_len > SPLIT_SLICE:
            slice_ = SPLIT_SLICE
            num_warps = 8 if block <= 4096 else 16
    elif row_len > ONE_PASS_MAX or (block > 4096 and not prefill_one_pass):
        block, num_warps = prefill_block(row_len), 8
    elif block > 4096:
        num_warps = 8 if n_rows <= 1024 else 4
    else:
        num_warps = max(4, min(8, rows * block // 1024))
    return dict(ROWS=rows, BLOCK=block, num_warps=num_warps, SLICE=slice_)


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _load_values(x_ptr, up_ptr, offs, mask, SWIGLU: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 values to quantize at ``offs``: ``x``, or with SWIGLU ``silu(x) * up`` rounded as torch rounds it
    in x's dtype (silu in fp32 with an IEEE division and libdevice's expf, as CUDA's ``silu`` kernel, rounded
    to the dtype; the product of two such values is exact in fp32, then rounded; the interpreter has no
    libdevice: numpy's exp there, which can differ from expf by an ulp). Masked elements are 0."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if SWIGLU:
        g = x.to(tl.float32)
        if INTERPRETED:
            e = tl.exp(-g)
        else:
            e = libdevice.exp(-g)
        silu = tl.math.div_rn(g, 1.0 + e).to(x.dtype).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = (silu * u).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _quantize_rows_kernel(
        x_ptr, codes_ptr, scale_ptr, zp_ptr,  # x [R, L] (fp16/bf16/fp32), codes int8 [R, L], [R] fp32 / int32
        up_ptr,  # SWIGLU: the up projection [R, L], x's dtype: quantize silu(x) * up (else never read)
        n_rows, row_len,
        QMAX: tl.constexpr, SYMMETRIC: tl.constexpr,  # format: INT-b, QMAX = 2^b - 1
        RECIP_DIV: tl.constexpr,  # divide by QMAX as torch does on this device (see _common.act_qparams)
        ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
        PDL: tl.constexpr,  # launched as a programmatic dependent; lets the next one (the GEMV) start now
        SPLIT: tl.constexpr, SLICE: tl.constexpr,  # SPLIT > 1: program (i, j) codes columns [j, j + 1) * SLICE
        DIV_RCP: tl.constexpr,  # x / scale from one reciprocal per row (_common.act_quantize_rcp), else div.rn
        SWIGLU: tl.constexpr = False, INTERPRETED: tl.constexpr = False):
    OFFSET: tl.constexpr = (QMAX + 1) // 2
    if PDL:
        # The GEMV launched after this one may start now (its weight prologue); this launch itself may
        # have started before the kernel writing x finished (it was launched as a programmatic
        # dependent): wait for that kernel before the first read. Triggering before waiting is safe: the
        # GEMV waits for this kernel's completion, which comes after this wait.
        gdc_launch_dependents()
        gdc_wait()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    base = rows.to(tl.int64)[:, None] * row_len
    cols = tl.arange(0, BLOCK)[None, :]
    # Pass 1: lo = min(x, 0), hi = max(x, 0). Masked elements read as 0: harmless, the range holds 0.
    if ONE_PASS:
        mask = row_ok[:, None] & (cols < row_len)
        x = _load_values(x_ptr, up_ptr, base + cols, mask, SWIGLU, INTERPRETED)
        lo = tl.minimum(tl.min(x, axis=1), 0.0)
        hi = tl.maximum(tl.max(x, axis=1), 0.0)
    else:
        # Element-wise running min / max, one reduction after the loop (a reduction inside the loop
        # crashes triton 3.6's OptimizeThreadLocality pass for fp32 inputs).
        lo_t = tl.zeros([ROWS, BLOCK], tl.float32)
        hi_t = tl.zeros([ROWS, BLOCK], tl.float32)
        for k0 in range(0, row_len, BLOCK):
            mask = row_ok[:, None] & (k0 + cols < row_len)
            xk = _load_values(x_ptr, up_ptr, base + k0 + cols, mask, SWIGLU, INTERPRETED)
            lo_t = tl.minimum(lo_t, xk)
            hi_t = tl.maximum(hi_t, xk)
        lo = tl.min(lo_t, axis=1)
        hi = tl.max(hi_t, axis=1)
    scale, zp = act_qparams(lo, hi, QMAX, SYMMETRIC, RECIP_DIV)
    rcp = recip_rn(scale)[:, None]  # once per row (read only when DIV_RCP)
    part = tl.program_id(1)
    if part == 0:
        tl.store(scale_ptr + rows, scale, mask=row_ok)
        tl.store(zp_ptr + rows, zp.to(tl.int32) - OFFSET, mask=row_ok)
    # Pass 2: codes (from registers when the row fitted, else a second read that hits L2).
    if SPLIT > 1:  # this program's slice only (a second read, from L2)
        cols = part * SLICE + tl.arange(0, SLICE)[None, :]
        mask = row_ok[:, None] & (cols < row_len)
        xk = _load_values(x_ptr, up_ptr, base + cols, mask, SWIGLU, INTERPRETED)
        tl.store(codes_ptr + base + cols, _codes(xk, scale, zp, rcp, QMAX, DIV_RCP), mask=mask)
    elif ONE_PASS:
        tl.store(codes_ptr + base + cols, _codes(x, scale, zp, rcp, QMAX, DIV_RCP), mask=mask)
    else:
        for k0 in range(0, row_len, BLOCK):
            mask = row_ok[:, None] & (k0 + cols < row_len)
            xk = _load_values(x_ptr, up_ptr, base + k0 + cols, mask, SWIGLU, INTERPRETED)
            tl.store(codes_ptr + base + k0 + cols, _codes(xk, scale, zp, rcp, QMAX, DIV_RCP), mask=mask)


@triton.jit
def _codes(x, scale, zp, rcp, QMAX: tl.constexpr, DIV_RCP: tl.constexpr):
    """Signed int8 codes of ``x [ROWS, cols]`` with the rows' ``scale`` / ``zp`` (``rcp``: their reciprocals);
    bitwise the same either way (``DIV_RCP`` picks the division, see ``_common.act_quantize_rcp``)."""
    OFFSET: tl.constexpr = (QMAX + 1) // 2
    if DIV_RCP:
        q = act_quantize_rcp(x, scale[:, None], rcp, zp[:, None], QMAX)
    else:
        q = act_quantize(x, scale[:, None], zp[:, None], QMAX)
    return (q - OFFSET).to(tl.int8)


# ----------------------------------------------------------------------------------------------- wrapper
def _check_config(config: dict) -> None:
    """A clear error for a launch config Triton could not compile (tile sizes must be powers of two)."""
    for key in ("ROWS", "BLOCK", "num_warps"):
        v = config.get(key)
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"quantize_rows config: {key} must be a power of two, got {v!r}")
    sl = config.get("SLICE", 0)
    if not isinstance(sl, int) or sl < 0 or sl & (sl - 1):
        raise ValueError(f"quantize_rows config: SLICE must be 0 (one program per row) or a power of two, got {sl!r}")
    if not isinstance(config.get("DIV_RCP", False), bool):
        raise ValueError(f"quantize_rows config: DIV_RCP must be True or False, got {config['DIV_RCP']!r}")


def launch_config(n_rows: int, row_len: int, config: dict | None = None, prefill_one_pass: bool = True) -> dict:
    """The kernel's launch config for ``n_rows`` rows of ``row_len``: ``config`` (checked) or ``_config``'s,
    with what follows from it: ``ONE_PASS`` (the row fits BLOCK) and ``SPLIT`` (programs per row)."""
    if config is None:
        cfg = _config(n_rows, row_len, prefill_one_pass)
    else:
        _check_config(config)
        cfg = dict(config, SLICE=config.get("SLICE", 0))
    one_pass = row_len <= cfg["BLOCK"]
    split = triton.cdiv(row_len, cfg["SLICE"]) if cfg["SLICE"] else 1
    # the reciprocal division where it timed faster: rows in registers or split over programs, not the two-pass
    # loop over long prefill rows (_common.act_quantize_rcp); a config may set DIV_RCP (bench_gemv_pieces --quant-div)
    return dict(cfg, ONE_PASS=one_pass, SPLIT=split, DIV_RCP=cfg.get("DIV_RCP", one_pass or split > 1))


def quantize_rows(x: torch.Tensor, bits: int, symmetric: bool, group_size: int = 0, pdl: bool = False,
                  config: dict | None = None, up: torch.Tensor | None = None):
    """Quantize ``x [M, K]`` per token (``group_size=0``) or per group of ``group_size`` along K.
    ``pdl``: launch as a programmatic dependent of the previous kernel (its launch overlaps that kernel's
    tail; it waits for it before reading ``x``) and let the next kernel, if launched as one
    (``launch_gemv(pdl=True)``), start at once (CUDA only; its reads of these outputs wait for this kernel
    all the same).
    ``config``: ``ROWS``, ``BLOCK``, ``num_warps`` and optionally ``SLICE`` (columns per program, a power of
    two; default: one program per row) and ``DIV_RCP`` (the division, ``launch_config``) instead of ``_config``'s
    (benchmarks sweep them).
    ``up``: quantize ``silu(x) * up`` instead (a SwiGLU MLP's down-projection input; ``up`` like ``x``), the
    product rounded to x's dtype as torch computes it (``_load_values``), so the Inductor kernel that would
    compute it goes away.

    Returns ``(codes int8 [M, K], scale fp32 [M, G], zp int32 [M, G])`` with the signed convention of
    the module docstring (``G = 1`` per token). ``x`` must be 2-D and contiguous (callers check).
    """
    m, k = x.shape
    row_len = group_size or k
    n_rows = m * (k // row_len)
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, k // row_len), dtype=torch.float32, device=x.device)
    zp = torch.empty((m, k // row_len), dtype=torch.int32, device=x.device)
    if n_rows == 0:
        return codes, scale, zp
    cfg = launch_config(n_rows, row_len, config, prefill_one_pass=up is None)
    grid = (triton.cdiv(n_rows, cfg["ROWS"]), cfg["SPLIT"])
    pdl = pdl_launch(pdl, x.device)
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype or up.device != x.device
                           or not up.is_contiguous()):
        raise ValueError(f"quantize_rows: up must be a contiguous tensor like x {tuple(x.shape)} {x.dtype}; got "
                         f"{tuple(up.shape)} {up.dtype} on {up.device}")
    _quantize_rows_kernel[grid](x, codes, scale, zp, x if up is None else up, n_rows, row_len,
                                QMAX=(1 << bits) - 1, SYMMETRIC=symmetric, RECIP_DIV=recip_div(x.device), PDL=pdl,
                                SWIGLU=up is not None, INTERPRETED=interpreting(), **cfg,
                                **({"launch_pdl": True} if pdl else {}))
    return codes, scale, zp


# ------------------------------------------------------------------------------------------ check vs torch
if __name__ == "__main__":
    from qcompile import formats as F

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(37, 4096 + 64, device=dev, dtype=torch.float16) * 3
    codes, scale, zp = quantize_rows(x, 8, False)
    ref, ref_s, ref_z = F.quantize(x.float(), F.FormatSpec.parse("int8"), F.Granularity.parse("token"))
    print("codes equal:", torch.equal(codes.int() + 128, ref.int()), "scales equal:",
          torch.equal(scale, ref_s[..., 0]), "zp equal:", torch.equal(zp + 128, ref_z[..., 0].int()))
