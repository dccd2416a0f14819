"""Shared checks for the Triton kernels, run under TRITON_INTERPRET=1 (CPU) and on CUDA.

Every check compares a kernel with the reference on the *same* integer codes:
* activation codes / scales / zero-points: bit-exact with ``qcompile.formats.quantize``;
* the int32 accumulator ``sum_k (xq - zx) t``: bit-exact (``INT_OUT`` mode);
* the fp output: within ``fp_tolerance`` of the exact (float64) value on the same codes.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from qcompile import formats as F
from qcompile.backends.triton import prepack
from qcompile.backends.triton._common import div_rn_shared, recip_rn
from qcompile.backends.triton.reference import gemm_reference, quantize_rows_reference

__all__ = ["check_div_rn_shared", "check_gemm", "check_linear", "check_quantize", "division_cases", "fp_tolerance",
           "make_weight", "run_interpreted"]

# Output rounding, relative. The interpreter converts fp32 -> bf16 by truncation (a full ulp, 2^-7;
# triton/runtime/interpreter.py _convert_float), the GPU rounds to nearest (half an ulp).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HALF_ULP = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** (-7 if _INTERPRET else -8), torch.float32: 2.0 ** -24}
SUBNORMAL = {torch.float16: 2.0 ** -25, torch.bfloat16: 0.0, torch.float32: 0.0}


def make_weight(n: int, k: int, fmt: str, gran: str, device, seed: int = 0):
    """Random weight with a few outlier channels -> ``PackedWeight`` (from formats.quantize)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    w[:, : max(1, k // 50)] *= 4
    codes, scale, zp = F.quantize(w, F.FormatSpec.parse(fmt), F.Granularity.parse(gran))
    return prepack(codes, scale, zp, fmt, gran).to(device)


def make_x(m: int, k: int, device, dtype=torch.float16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2 + torch.randn(m, 1, generator=g)  # asymmetric per token
    return x.to(dtype).to(device)


def _magnitude(xq, xs, xz, pw):
    """``sum_g |sx u (sum_k xq t - zx T)|``: the size of what the fp32 group accumulation adds up."""
    m = xq.shape[0]
    g_count = pw.n_groups
    from qcompile.backends.triton.packing import unpack_values

    t = unpack_values(pw).double().view(pw.out_features, g_count, -1)
    acc = torch.einsum("mgk,ngk->mng", xq.double().view(m, g_count, -1), t)
    corr = acc - xz.double()[:, None, :] * pw.code_sum.t().double()[None]
    return (corr * pw.unit_scale.t().double()[None] * xs.double()[:, None, :]).abs().sum(-1)


def fp_tolerance(y_exact, magnitude, n_groups, dtype):
    """Per-element bound: output rounding (half an ulp: 2^-11 relative for fp16, 2^-8 bf16, plus half
    the fp16 subnormal step) + fp32 scaling/accumulation ((G + 3) roundings of 2^-24 relative to the
    summed magnitudes: int->fp32, sx*u, the product, one add per group)."""
    return HALF_ULP[dtype] * y_exact.abs() + (n_groups + 3) * 2.0 ** -24 * magnitude + SUBNORMAL[dtype]


def division_cases(rows: int, cols: int, seed: int = 0):
    """``(x [rows, cols], d [rows])`` fp32 pairs for ``div_rn_shared``: per row one divisor, as a quantization scale
    is, in four kinds of rows in turn: random values of wide range (``|x / d| <= 255``), divisors with an all-ones
    mantissa and quotients near a tie (k + 0.5), power-of-two divisors, and each near-tie value's neighbours."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(rows, cols)
    d = torch.empty(rows)
    for r in range(rows):
        kind = r % 4
        if kind == 1:  # mantissa 1.111...1 x 2^e
            bits = torch.tensor([0x3F7FFFFF - int(torch.randint(0, 256, (1,), generator=g))], dtype=torch.int32)
            d[r] = bits.view(torch.float32)[0] * 2.0 ** int(torch.randint(-20, 8, (1,), generator=g))
        elif kind == 2:
            d[r] = 2.0 ** int(torch.randint(-24, 8, (1,), generator=g))
        else:
            d[r] = (torch.rand((), generator=g) + 1) * 10.0 ** float(torch.empty(()).uniform_(-8, 3, generator=g))
        k = torch.randint(-255, 256, (cols,), generator=g).float()
        if kind == 0:
            x[r] = (torch.rand(cols, generator=g) * 510 - 255) * d[r]
        else:  # near ties, then their float neighbours
            v = (k + 0.5) * d[r]
            if kind == 3:
                v = torch.nextafter(v, torch.where(k > 0, torch.tensor(float("inf")), torch.tensor(-float("inf"))))
            x[r] = v
    return x, d


@triton.jit
def _divide_rows(x_ptr, d_ptr, q_ptr, L, BLOCK: tl.constexpr):
    """``q[r, :] = div_rn_shared(x[r, :], d[r])``, one program per row."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < L
    xv = tl.load(x_ptr + row * L + cols, mask=mask, other=0.0)
    dv = tl.load(d_ptr + row + tl.zeros([1], tl.int32))
    tl.store(q_ptr + row * L + cols, div_rn_shared(xv, dv, recip_rn(dv)), mask=mask)


def check_div_rn_shared(x: torch.Tensor, d: torch.Tensor) -> None:
    """``_common.div_rn_shared`` on ``x [R, L]`` with the per-row divisors ``d [R]`` equals IEEE float32 division
    (torch's on the CPU) bitwise, run where ``x`` lives."""
    q = torch.empty_like(x)
    _divide_rows[(x.shape[0],)](x, d, q, x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]))
    ref = x.cpu() / d.cpu()[:, None]
    bad = (q.cpu().view(torch.int32) != ref.view(torch.int32)).sum().item()
    assert bad == 0, f"div_rn_shared differs from IEEE division on {bad} of {x.numel()} elements"

def check_quantize(x, bits, symmetric, group_size, quantize_rows):
    """Kernel codes, scales and zero-points equal the reference exactly."""
    codes, scale, zp = quantize_rows(x, bits, symmetric, group_size)
    r_codes, r_scale, r_zp = quantize_rows_reference(x, bits, symmetric, group_size)
    assert torch.equal(codes, r_codes), (codes.int() - r_codes.int()).abs().max()
    assert torch.equal(scale, r_scale)
    assert torch.equal(zp, r_zp)


def check_gemm(x, pw, launch_gemm, *, act_bits=8, act_sym=False, act_group=0, out_dtype=torch.float16,
               fuse_quant=False, w_expanded=None, config=None, use_asm=None, bias=None, split_k=False):
    """int32 accumulator bit-exact and fp output within ``fp_tolerance``; returns the max error / bound."""
    m, n = x.shape[0], pw.out_features
    xq, xs, xz = quantize_rows_reference(x, act_bits, act_sym, act_group)  # references run on x.device
    dev = x.device
    kw = dict(act_bits=act_bits, act_sym=act_sym, x_grouped=act_group > 0, config=config, use_asm=use_asm,
              w_expanded=w_expanded, split_k=split_k)
    if not fuse_quant:  # the integer path (fused quantization has no separate codes to feed)
        y_int = torch.full((m, n), -7, dtype=torch.int32, device=dev)  # poisoned: every element is written
        launch_gemm(xq, xs, xz, pw, y_int, int_out=True, **kw)
        ref_int = gemm_reference(xq, xs, xz, pw, int_out=True)
        assert torch.equal(y_int, ref_int), (y_int - ref_int).abs().max()
    y = torch.full((m, n), float("nan"), dtype=out_dtype, device=dev)
    if fuse_quant:
        launch_gemm(x, None, None, pw, y, fuse_quant=True, bias=bias, **kw)
    else:
        launch_gemm(xq, xs, xz, pw, y, bias=bias, **kw)
    y_exact = gemm_reference(xq, xs, xz, pw, torch.float64, bias)
    bound = fp_tolerance(y_exact, _magnitude(xq, xs, xz, pw), pw.n_groups, out_dtype)
    err = (y.double() - y_exact).abs()
    assert not torch.isnan(y).any()
    ratio = (err / bound).max().item() if err.numel() else 0.0
    assert ratio <= 1.0, f"max error / bound = {ratio:.3f}"
    return ratio


def ksplit_unpackers(pw) -> list:
    """The k-split GEMM's unpackers for ``pw`` (its ``lut`` argument): arithmetic, and for dINT the table."""
    return [False, True] if pw.fmt.startswith("dint") else [False]


def ksplit_launcher(config=None, lut=None):
    """``launch_ksplit`` under ``check_gemm``'s ``launch_gemm`` signature (per-token codes, packed weights), with
    ``config`` unless the call names one (``check_gemm`` passes its own, None by default)."""
    from qcompile.backends.triton.w4_linear import launch_ksplit

    default = config

    def launch(xq, xs, xz, pw, y, *, x_grouped=False, w_expanded=None, split_k=False, bias=None, int_out=False,
               use_asm=None, act_bits=8, act_sym=False, config=None):
        assert not x_grouped and w_expanded is None and not split_k
        return launch_ksplit(xq, xs, xz, pw, y, bias=bias, int_out=int_out, config=config or default,
                             use_asm=use_asm, lut=lut)
    return launch


def check_linear(x, pw, linear_fn, act_fmt, act_group=0):
    """The public op vs ``linear(fake_quantize(x), dequantize(W))`` computed in float64 from formats."""
    spec = F.FormatSpec.parse(act_fmt)
    gran = F.Granularity("group", act_group) if act_group else F.Granularity("token")
    x_dq = F.fake_quantize(x.float(), spec, gran).double()
    from qcompile.backends.triton.packing import unpack_values

    g = pw.group_size or pw.in_features
    w_dq = unpack_values(pw).double() * pw.unit_scale.t().double().repeat_interleave(g, dim=1)
    y = linear_fn(x, pw, act_fmt=act_fmt)
    y_ref = x_dq @ w_dq.t()
    rel = ((y.double() - y_ref).norm() / y_ref.norm()).item()
    # Output rounding: measured ~2e-4 for fp16 (half ulp 2^-11); bf16's half ulp is 2^-8 (H100: 1.7e-3).
    assert rel < (4e-3 if y.dtype == torch.bfloat16 else 1e-3), rel
    return rel


def run_interpreted(test_file: str, *pytest_args: str, timeout: int = 900) -> None:
    """Run ``test_file`` (its tests chosen by ``pytest_args``) with pytest in a child process under
    ``TRITON_INTERPRET=1``, and fail unless they pass. Triton decides interpreter vs compiled when a kernel
    is decorated, so the variable must be set before the kernels are imported, and kept out of the parent,
    where GPU tests run. Skips without triton >= 3.7."""
    triton = pytest.importorskip("triton")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
        # 3.6's interpreter passes runtime ints as 1-element arrays that range() cannot take (numpy 2).
        pytest.skip(f"the interpreter tests need triton >= 3.7 (3.9 tested); found {triton.__version__}")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, *pytest_args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-6000:] + run.stderr[-3000:]
