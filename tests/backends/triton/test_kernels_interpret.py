"""Triton kernels under TRITON_INTERPRET=1 on CPU, small shapes, against the reference on the same codes.

Triton decides interpreter vs compiled when a kernel is decorated, so these tests must run in a process
where TRITON_INTERPRET=1 was set before the kernels were imported. In a normal pytest run the single
``test_interpreter_suite`` re-runs this file in such a child process (keeping the variable out of the
parent, where GPU tests and other engineers' code run); in the child the real tests run.
"""
from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
    # 3.6's interpreter passes runtime ints as 1-element arrays that range() cannot take (numpy 2).
    pytest.skip(f"the interpreter tests need triton >= 3.7 (3.9 tested); found {triton.__version__}",
                allow_module_level=True)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
child_only = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.skipif(INTERPRET, reason="this is the parent's driver")
def test_interpreter_suite():
    from triton_cases import run_interpreted

    run_interpreted(__file__, timeout=900)


if INTERPRET:
    import torch
    from triton_cases import (
        check_div_rn_shared,
        check_gemm,
        check_linear,
        check_quantize,
        division_cases,
        ksplit_launcher,
        ksplit_unpackers,
        make_weight,
        make_x,
    )

    from qcompile.backends.triton import w4a4_linear, w4a8_linear
    from qcompile.backends.triton.quantize_kernel import quantize_rows
    from qcompile.backends.triton.w4_linear import expand_weight, launch_gemm, launch_gemv

    torch.manual_seed(0)

    @child_only
    @pytest.mark.parametrize("m,k,bits,sym,group,dtype", [
        (1, 7, 8, False, 0, torch.float16), (5, 300, 8, False, 0, torch.float16),
        (4, 300, 8, True, 0, torch.bfloat16), (2, 20000, 8, False, 0, torch.float32),  # two-pass path
        (70, 5000, 8, False, 0, torch.float16),  # many rows longer than 4096: two passes (1024 columns), ragged end
        (6, 256, 4, False, 64, torch.float16), (3, 384, 4, True, 128, torch.float16),
    ])
    def test_quantize_bit_exact(m, k, bits, sym, group, dtype):
        check_quantize(make_x(m, k, "cpu", dtype, seed=k), bits, sym, group, quantize_rows)

    @child_only
    def test_div_rn_shared_is_ieee_division():
        """The quantizers' division (one reciprocal per row, two FMA corrections) is IEEE division bitwise."""
        check_div_rn_shared(*division_cases(64, 1000))

    @child_only
    @pytest.mark.parametrize("m,k,config", [
        (3, 300, dict(ROWS=1, BLOCK=512, num_warps=4)),  # one pass
        (70, 5000, dict(ROWS=1, BLOCK=1024, num_warps=8)),  # two passes
        (2, 3000, dict(ROWS=1, BLOCK=4096, num_warps=8, SLICE=1024)),  # a row over three programs
    ])
    def test_quantize_divisions_agree(m, k, config):
        """Both divisions (``DIV_RCP``) give the reference's codes on each path of the kernel."""
        x = make_x(m, k, "cpu", torch.float16, seed=m)
        for div_rcp in (False, True):
            cfg = dict(config, DIV_RCP=div_rcp)
            check_quantize(x, 8, False, 0, lambda *a, cfg=cfg, **kw: quantize_rows(*a, **kw, config=cfg))

    @child_only
    def test_quantize_prefill_rows_one_pass_up_to_16384():
        """Many rows: one pass with the row in registers up to 16384 columns (4 warps, 8 up to 1024 rows); longer
        rows, or the SwiGLU / RMSNorm kernels (``prefill_one_pass=False``) past 4096, two passes over the block that
        leaves the fewest masked columns (ties: 2048)."""
        from qcompile.backends.triton.quantize_kernel import launch_config

        for k, block in [(5000, 8192), (11008, 16384), (14336, 16384), (16384, 16384), (4096, 4096)]:
            for rows, warps in [(4096, 4), (1024, 8), (65, 8)]:
                cfg = launch_config(rows, k)
                want = (block, True, 1, 4 if k == 4096 else warps)
                assert (cfg["BLOCK"], cfg["ONE_PASS"], cfg["SPLIT"], cfg["num_warps"]) == want, (k, rows, cfg)
        for k, block in [(20000, 2048), (16400, 1024), (28672, 2048)]:
            cfg = launch_config(4096, k)
            assert (cfg["BLOCK"], cfg["ONE_PASS"], cfg["SPLIT"], cfg["num_warps"]) == (block, False, 1, 8), (k, cfg)
        for k, block in [(5000, 1024), (11008, 1024), (14336, 2048), (6144, 2048), (10240, 2048), (9000, 1024)]:
            cfg = launch_config(4096, k, prefill_one_pass=False)
            assert (cfg["BLOCK"], cfg["ONE_PASS"], cfg["SPLIT"]) == (block, False, 1), (k, cfg)

    @child_only
    @pytest.mark.parametrize("m,k", [(70, 11008), (66, 5000), (65, 20000)])
    def test_quantize_prefill_default_bit_exact(m, k):
        """The prefill default on long rows (one pass up to 16384 columns, two passes beyond) = the reference."""
        x = make_x(m, k, "cpu", seed=k)
        for sym in (False, True):
            check_quantize(x, 8, sym, 0, quantize_rows)

    @child_only
    @pytest.mark.parametrize("m,k,config", [
        (1, 4100, None),  # the decode default for rows over SPLIT_SLICE: 5 programs, one pass
        (3, 1100, dict(ROWS=1, BLOCK=2048, num_warps=4, SLICE=256)),  # 5 programs a row, the last one short
        (5, 700, dict(ROWS=2, BLOCK=256, num_warps=4, SLICE=128)),  # two rows a program, two-pass statistics
    ])
    def test_quantize_split_rows_bit_exact(m, k, config):
        """Rows coded by several programs (each reduces the whole row, codes its slice) = the reference."""
        from qcompile.backends.triton.quantize_kernel import launch_config

        assert config is not None or launch_config(m, k)["SPLIT"] == 5
        x = make_x(m, k, "cpu", seed=k)
        for sym in (False, True):
            check_quantize(x, 8, sym, 0, lambda *a: quantize_rows(*a, config=config))

    @child_only
    @pytest.mark.parametrize("m,k,dtype,config", [
        (3, 300, torch.float16, None), (2, 5000, torch.float16, None),  # one program a row; split rows
        (2, 700, torch.float16, dict(ROWS=2, BLOCK=256, num_warps=4, SLICE=128)),  # two-pass statistics
        (2, 20000, torch.float32, None),  # two passes over a long row
    ])
    def test_quantize_swiglu_prologue(m, k, dtype, config):
        """``quantize_rows(gate, up=up)`` = the reference quantization of ``silu(gate) * up`` computed by torch.
        float16: bit-exact (silu and the product are rounded to float16, which absorbs the interpreter's numpy
        exp against torch's). float32: nothing absorbs it, so a value one ulp off may move a code one step:
        at most 0.1 % of codes, by one. (bfloat16 is left to the GPU test: the interpreter's bfloat16
        conversion does not round to nearest.)"""
        from qcompile.backends.triton.reference import quantize_rows_reference

        gate, up = make_x(m, k, "cpu", dtype, seed=k) * 2, make_x(m, k, "cpu", dtype, seed=k + 1)
        for sym in (False, True):
            got = quantize_rows(gate, 8, sym, config=config, up=up)
            want = quantize_rows_reference(torch.nn.functional.silu(gate) * up, 8, sym, 0)
            if dtype == torch.float16:
                assert all(torch.equal(a, b) for a, b in zip(got, want))
            else:
                steps = (got[0].int() - want[0].int()).abs()
                assert steps.max() <= 1 and (steps > 0).float().mean() <= 1e-3
                torch.testing.assert_close(got[1], want[1], rtol=2e-7, atol=0)

    @child_only
    @pytest.mark.parametrize("m,k,dtype,residual", [
        (1, 4096, torch.float16, True), (3, 300, torch.float16, False),  # 4 programs a row; one program a row
        (2, 5000, torch.float32, True), (70, 256, torch.float16, True),  # many rows: one program each
    ])
    def test_rmsnorm_quantize_kernel(m, k, dtype, residual):
        """The fused kernel against the op's torch reference: ``h`` exact; codes and scales equal but where the
        variance's summation order (the kernel's vs torch's) moves a value by an ulp: at most one step, on at
        most 1 % of the codes, scales within 1e-6."""
        from qcompile.backends.triton.reference import quantize_rows_reference
        from qcompile.backends.triton.rmsnorm_quant_kernel import rmsnorm_quantize_rows

        x = make_x(m, k, "cpu", dtype, seed=k)
        r = make_x(m, k, "cpu", dtype, seed=k + 1) if residual else None
        w = (torch.rand(k, generator=torch.Generator().manual_seed(k)) + 0.5).to(dtype)
        h = x + r if residual else x
        h32 = h.float()
        v = w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)  # LlamaRMSNorm
        for sym in (False, True):
            got = rmsnorm_quantize_rows(x, r, w, 1e-5, 8, sym)
            want = quantize_rows_reference(v, 8, sym, 0)
            assert torch.equal(got[0], h) if residual else got[0].numel() == 0
            steps = (got[1].int() - want[0].int()).abs()
            assert steps.max() <= 1 and (steps > 0).float().mean() <= 1e-2
            torch.testing.assert_close(got[2], want[1], rtol=1e-6, atol=0)

    @child_only
    def test_quantize_edge_rows():
        x = torch.zeros(4, 256)
        x[1] = 3.0                                      # constant row: range [0, 3]
        x[2] = torch.arange(256.0) - 100.0 + 0.5        # scale 1: every x/s is a .5 tie (round half even)
        x[2, 0], x[2, -1] = -100.0, 155.0
        x[3] = 1e-9                                      # scale clamps to 1e-8
        check_quantize(x, 8, False, 0, quantize_rows)
        check_quantize(x, 8, True, 0, quantize_rows)

    GEMM_CASES = [  # fmt, granularity, M, N, K
        ("dint4", "channel", 1, 16, 128), ("dint4", "channel", 17, 40, 300), ("int4", "channel", 5, 33, 200),
        ("int4_sym", "group64", 3, 24, 192), ("dint4_c0.25", "group128", 20, 16, 256),
        ("dint4_sym", "group192", 2, 20, 384), ("int4", "group64", 33, 17, 128), ("dint4_c0.125", "channel", 4, 8, 72),
    ]

    @child_only
    @pytest.mark.parametrize("fmt,gran,m,n,k", GEMM_CASES)
    def test_w4a8_gemm_exact(fmt, gran, m, n, k):
        pw = make_weight(n, k, fmt, gran, "cpu", seed=m + n + k)
        x = make_x(m, k, "cpu", seed=m)
        check_gemm(x, pw, launch_gemm)
        if pw.group_size == 0:
            check_gemm(x, pw, launch_gemm, fuse_quant=True)

    @child_only
    def test_w4a8_gemm_variants():
        pw = make_weight(40, 256, "dint4", "group128", "cpu")
        x = make_x(9, 256, "cpu")
        check_gemm(x, pw, launch_gemm, out_dtype=torch.bfloat16, act_sym=True)
        check_gemm(x, pw, launch_gemm, w_expanded=expand_weight(pw), bias=torch.randn(40))
        pw_c = make_weight(24, 160, "int4", "channel", "cpu")
        check_gemm(make_x(3, 160, "cpu", torch.bfloat16), pw_c, launch_gemm, out_dtype=torch.bfloat16,
                   fuse_quant=True, act_sym=True)
        check_gemm(x[:, :160].contiguous(), pw_c, launch_gemm, w_expanded=expand_weight(pw_c),
                   out_dtype=torch.float32)

    @child_only
    @pytest.mark.parametrize("fmt,m,n,k", [("dint4", 37, 40, 300), ("int4_sym", 16, 16, 128),
                                           ("dint4_c0.25", 5, 33, 640)])
    def test_w4a8_gemm_swapped_operands_exact(fmt, m, n, k):
        """SWAP_AB (y^T = W x^T, the weight tile as the dot's A): exact int32 sums at ragged M, N, K edges,
        from packed and from expanded weights."""
        swap = dict(BLOCK_M=16, BLOCK_N=32, UNITS_PER_ITER=2, GROUP_M=2, num_warps=4, num_stages=1, SWAP_AB=True)
        pw = make_weight(n, k, fmt, "channel", "cpu", seed=m + n)
        x = make_x(m, k, "cpu", seed=m)
        check_gemm(x, pw, launch_gemm, config=swap)
        check_gemm(x, pw, launch_gemm, config=swap, w_expanded=expand_weight(pw), bias=torch.randn(n),
                   out_dtype=torch.bfloat16)

    @child_only
    @pytest.mark.parametrize("fmt,m,n,k", [("dint4", 1, 40, 700), ("int4", 16, 33, 300), ("dint4_c0.25", 3, 24, 130)])
    def test_w4a8_gemm_swapped_split_k_exact(fmt, m, n, k):
        """The decode tiles: SWAP_AB with split-K (3 slices; some one unit, some empty): exact int32 sums,
        bitwise the unsplit swapped launch on every output form, the workspace and counters left zero."""
        from qcompile.backends.triton.w4_linear import splitk_workspace

        swap = dict(BLOCK_M=16, BLOCK_N=32, UNITS_PER_ITER=1, GROUP_M=1, num_warps=4, num_stages=1, SWAP_AB=True)
        pw = make_weight(n, k, fmt, "channel", "cpu", seed=m + n)
        x = make_x(m, k, "cpu", seed=m)
        check_gemm(x, pw, launch_gemm, config={**swap, "SPLIT_K": 3})
        xq, xs, xz = quantize_rows(x, 8, False, 0)
        for int_out, bias in ((True, None), (False, torch.randn(n))):
            dtype = torch.int32 if int_out else torch.float32
            ys = [launch_gemm(xq, xs, xz, pw, torch.empty(m, n, dtype=dtype), int_out=int_out, bias=bias,
                              config={**swap, "SPLIT_K": sk}) for sk in (1, 3)]
            assert torch.equal(ys[0], ys[1]), int_out
        ws, locks = splitk_workspace("cpu", n)
        assert not ws.any() and not locks.any()

    @child_only
    def test_w4a8_gemm_deep_decode_tiles_exact():
        """The sweep's deep-pipeline decode tiles (``DEEP_DECODE_CONFIGS``; the stages themselves are the
        compiler's, so here: their tile shapes and split-K) give the reference on ragged N and K."""
        from qcompile.backends.triton.w4_gemm_kernel import DEEP_DECODE_CONFIGS

        pw = make_weight(40, 1100, "dint4", "channel", "cpu", seed=7)
        x = make_x(5, 1100, "cpu", seed=5)
        for c in DEEP_DECODE_CONFIGS:
            check_gemm(x, pw, launch_gemm, config=dict(c.kwargs, num_warps=c.num_warps, num_stages=1))

    @child_only
    @pytest.mark.parametrize("fmt,m,n,k", [("dint4", 1, 16, 128), ("int4", 16, 33, 300), ("int4_sym", 3, 24, 1000),
                                           ("dint4_c0.25", 5, 40, 384), ("dint4", 2, 24, 256)])
    def test_w4a8_gemm_splitk_exact(fmt, m, n, k):
        """Split-K (3 slices here; some empty, some one unit): exact int32 sums, and the workspace and
        arrival counters are left zero for the next launch."""
        from qcompile.backends.triton.w4_linear import splitk_workspace

        pw = make_weight(n, k, fmt, "channel", "cpu", seed=m + n)
        x = make_x(m, k, "cpu", seed=m)
        check_gemm(x, pw, launch_gemm, split_k=True)
        check_gemm(x, pw, launch_gemm, split_k=True, bias=torch.randn(n), out_dtype=torch.bfloat16)
        ws, locks = splitk_workspace("cpu", n)
        assert not ws.any() and not locks.any()

    @child_only
    @pytest.mark.parametrize("fmt,m,n,k", [("dint4", 1, 16, 128), ("int4", 16, 33, 300), ("int4_sym", 3, 24, 1000),
                                           ("dint4_c0.25", 5, 40, 384), ("dint4", 7, 20, 1100),
                                           ("dint4_c0.125", 2, 64, 512), ("dint4", 17, 24, 300), ("int4", 33, 40, 256),
                                           ("dint4_c0.25", 64, 16, 384), ("int4_sym", 20, 33, 200)])
    def test_w4a8_ksplit_exact(fmt, m, n, k):
        """K split across warps (``w4_ksplit_kernel``): exact int32 sums for 1-16 slices per step (some past the
        last chunk, ragged N and K), with both unpackers for dINT (R = 2, 4, 8), fp output within the bound and
        bitwise the tiled GEMM's on the same codes; from M = 17 in 32- and 64-row tiles with one accumulator."""
        from qcompile.backends.triton.w4_ksplit_kernel import ksplit_block_m
        from qcompile.backends.triton.w4_linear import launch_ksplit

        assert ksplit_block_m(m) == (16 if m <= 16 else 32 if m <= 32 else 64)
        pw = make_weight(n, k, fmt, "channel", "cpu", seed=m + n + k)
        x = make_x(m, k, "cpu", seed=m)
        shapes = [(16, 1, 1), (32, 2, 2), (64, 4, 4), (32, 8, 8), (16, 16, 16)] if m <= 16 else [(32, 2, 2)]
        configs = [None] + [dict(BLOCK_N=bn, S=s, num_warps=w, num_stages=1) for bn, s, w in shapes]
        unpackers = ksplit_unpackers(pw)
        for cfg in configs:
            for lut in unpackers:
                check_gemm(x, pw, ksplit_launcher(cfg, lut=lut))
        check_gemm(x, pw, ksplit_launcher(), bias=torch.randn(n), out_dtype=torch.bfloat16, act_sym=True)
        xq, xs, xz = quantize_rows(x, 8, False)
        y_tiled = launch_gemm(xq, xs, xz, pw, torch.empty(m, n, dtype=torch.float16))
        for lut in unpackers:
            y = launch_ksplit(xq, xs, xz, pw, torch.empty(m, n, dtype=torch.float16), lut=lut)
            assert torch.equal(y, y_tiled)

    @child_only
    def test_ksplit_is_a_prefill_path_up_to_64_rows():
        """From M = 17 to 64 the dispatch offers the k-split GEMM beside the tiled one while its switch is on ("ksplit"
        as a prefill path, for one weight and for siblings on shared codes), with the same output; above 64 rows it is
        no candidate."""
        from qcompile.backends.triton.w4_linear import DISPATCH, w4_linear_2d, w4_linear_2d_shared

        pws = [make_weight(n, 256, "dint4", "channel", "cpu", seed=n) for n in (24, 40)]
        x = make_x(40, 256, "cpu", seed=3).to(torch.float16)

        def run(path, rows=x):
            DISPATCH.prefill_path, default = path, DISPATCH.ksplit_wide_candidate
            DISPATCH.ksplit_wide_candidate = True
            try:
                return [w4_linear_2d(rows, pws[0], 8, False, 0, None),
                        *w4_linear_2d_shared(rows, pws, 8, False, [None, None])]
            finally:
                DISPATCH.prefill_path, DISPATCH.ksplit_wide_candidate = "auto", default

        ksplit, tiled = run("ksplit"), run("inloop")
        assert all(torch.equal(a, b) for a, b in zip(ksplit, tiled))
        with pytest.raises(ValueError, match="ksplit"):
            run("ksplit", make_x(65, 256, "cpu", seed=4).to(torch.float16))

    @child_only
    def test_w4a8_ksplit_rejects_bad_input():
        from qcompile.backends.triton.w4_linear import launch_ksplit

        pw = make_weight(16, 128, "dint4", "channel", "cpu")
        xq, xs, xz = quantize_rows(make_x(2, 128, "cpu"), 8, False)
        y = torch.empty(2, 16, dtype=torch.float16)
        with pytest.raises(ValueError, match="per-channel weights"):
            launch_ksplit(xq, xs, xz, make_weight(16, 128, "int4", "group64", "cpu"), y)
        with pytest.raises(ValueError, match="M <= 64"):
            launch_ksplit(torch.zeros(65, 128, dtype=torch.int8), torch.ones(65), torch.zeros(65, dtype=torch.int32),
                          pw, torch.empty(65, 16))
        with pytest.raises(ValueError, match="int8"):
            launch_ksplit(xq.float(), xs, xz, pw, y)
        with pytest.raises(ValueError, match="K = 128"):
            launch_ksplit(xq[:, :64], xs, xz, pw, y)
        with pytest.raises(ValueError, match="takes dINT weights"):  # INT's arithmetic unpacker is shorter
            launch_ksplit(xq, xs, xz, make_weight(16, 128, "int4", "channel", "cpu"), y, lut=True)

    @child_only
    @pytest.mark.parametrize("fmt,m,n,k", [("dint4", 1, 16, 128), ("dint4", 3, 20, 300), ("int4", 5, 33, 200),
                                           ("int4_sym", 16, 8, 256), ("dint4_c0.25", 2, 9, 72),
                                           ("dint4_c0.125", 4, 12, 130)])
    def test_w4a8_gemv_exact(fmt, m, n, k):
        """The dp4a GEMV (plain-tl dp4a / prmt / unpackers): exact int32 sums with pre-quantized and with
        fused-quantized activations, both dINT unpackers, K % 4 != 0 (byte-wise activations) included. The fused
        quantization writes ``quantize_rows``'s codes: its int32 sums and its output are bitwise the two-launch
        GEMV's (split-K slices and a symmetric format too)."""
        pw = make_weight(n, k, fmt, "channel", "cpu", seed=m + n + k)
        x = make_x(m, k, "cpu", seed=m)
        luts = (False, True) if fmt in ("dint4", "dint4_c0.25") else (False,)
        for lut in luts:
            check_gemm(x, pw, lambda *a, **kw: launch_gemv(*a, lut=lut, **kw))
        check_gemm(x, pw, launch_gemv, fuse_quant=True)
        for sym, split in ((False, 1), (True, 2)):
            q = quantize_rows(x, 8, sym)
            cfg = dict(BLOCK_N=4, BLOCK_W=32, num_warps=2, SPLIT_K=split)
            for dtype, int_out in ((torch.int32, True), (torch.float16, False)):
                fused = launch_gemv(x, None, None, pw, torch.empty(m, n, dtype=dtype), fuse_quant=True, act_sym=sym,
                                    int_out=int_out, config=cfg)
                two = launch_gemv(*q, pw, torch.empty(m, n, dtype=dtype), act_sym=sym, int_out=int_out, config=cfg)
                assert torch.equal(fused, two), (sym, split, int_out)
        check_gemm(x, pw, launch_gemv, bias=torch.randn(n), out_dtype=torch.bfloat16, act_sym=True,
                   config=dict(BLOCK_N=4, BLOCK_W=64, num_warps=2))

    @child_only
    @pytest.mark.parametrize("fmt,m,n,k,split", [("dint4", 1, 16, 300, 2), ("dint4", 3, 20, 700, 3),
                                                 ("int4", 16, 12, 520, 5), ("dint4_c0.25", 2, 8, 130, 4)])
    def test_w4a8_gemv_split_k_is_exact(fmt, m, n, k, split):
        """Split-K GEMV: K in slices summed in the int32 workspace = the one-program-per-tile GEMV, bitwise,
        on every output form; slices past K (``split`` > steps) add nothing; the workspace ends zeroed."""
        from qcompile.backends.triton.w4_linear import launch_gemv, launch_gemv_group, splitk_workspace

        pw = make_weight(n, k, fmt, "channel", "cpu", seed=m + n + k)
        x = make_x(m, k, "cpu", seed=m)
        xq, xs, xz = quantize_rows(x, 8, False, 0)
        one = dict(BLOCK_N=4, BLOCK_W=32, num_warps=2)
        for fuse, int_out, bias in ((False, False, None), (True, False, torch.randn(n)), (False, True, None)):
            dtype = torch.int32 if int_out else torch.float32
            args = (x, None, None) if fuse else (xq, xs, xz)
            ys = [launch_gemv(*args, pw, torch.empty(m, n, dtype=dtype), fuse_quant=fuse, int_out=int_out,
                              bias=bias, config={**one, "SPLIT_K": sk}) for sk in (1, split)]
            assert torch.equal(ys[0], ys[1]), (fuse, int_out)
        check_gemm(x, pw, launch_gemv, config={**one, "SPLIT_K": split})
        pws = [pw, make_weight(2 * n, k, fmt, "channel", "cpu", seed=7)]
        outs = [launch_gemv_group(xq, xs, xz, pws, [torch.empty(m, q.out_features) for q in pws],
                                  config={**one, "SPLIT_K": sk}) for sk in (1, split)]
        assert all(torch.equal(a, b) for a, b in zip(*outs))
        for total in (n, 3 * n):
            ws, tickets = splitk_workspace("cpu", total)
            assert not ws.any() and not tickets.any()

    @child_only
    @pytest.mark.parametrize("fmt,m,n,k", [("dint4", 1, 16, 300), ("int4", 3, 20, 700), ("dint4_c0.25", 16, 8, 130)])
    def test_w4a8_gemv_pipelined_stream_is_exact(fmt, m, n, k):
        """``PIPELINE`` > 1 (each step loads its own tile; on a GPU the compiler's pipeliner keeps
        PIPELINE - 1 tiles in flight through shared memory) and ``PREFETCH = 2`` (two tiles ahead in
        registers) = the hand-made register double buffer, bitwise: one weight, split-K, and the group
        launch; K past the last step, odd N and M."""
        from qcompile.backends.triton.w4_linear import launch_gemv, launch_gemv_group

        pw = make_weight(n, k, fmt, "channel", "cpu", seed=m + n + k)
        x = make_x(m, k, "cpu", seed=m)
        xq, xs, xz = quantize_rows(x, 8, False, 0)
        one = dict(BLOCK_N=4, BLOCK_W=32, num_warps=2)
        bias = torch.randn(n)
        for fuse, split in ((False, 1), (True, 1), (False, 3)):
            args = (x, None, None) if fuse else (xq, xs, xz)
            ys = [launch_gemv(*args, pw, torch.empty(m, n), fuse_quant=fuse, bias=bias,
                              config={**one, "SPLIT_K": split, "PIPELINE": p, "PREFETCH": f})
                  for p, f in ((0, 1), (3, 1), (0, 2))]
            assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2]), (fuse, split)
        check_gemm(x, pw, launch_gemv, config={**one, "PIPELINE": 4})
        pws = [pw, make_weight(2 * n + 1, k, fmt, "channel", "cpu", seed=7)]
        outs = [launch_gemv_group(xq, xs, xz, pws, [torch.empty(m, q.out_features) for q in pws],
                                  config={**one, "PIPELINE": p, "PREFETCH": f}) for p, f in ((0, 1), (3, 1), (0, 2))]
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*outs))

    @child_only
    @pytest.mark.parametrize("m", [1, 5, 20])
    def test_shared_quantization_op_matches_the_single_ops(m):
        """``w4_linear_codes_shared`` (one quantize_rows, then each GEMM on the codes) = the per-site op, bitwise."""
        from qcompile import formats as F
        from qcompile.backends.triton import codes_ops  # noqa: F401  (registers the ops)

        sites = [F.quantize(torch.randn(n, 200, generator=torch.Generator().manual_seed(n)),
                            F.FormatSpec.parse("dint4"), F.Granularity.parse("channel")) for n in (16, 24, 40)]
        x, biases = make_x(m, 200, "cpu"), [None, torch.randn(24), None]
        ys = torch.ops.qcompile_triton.w4_linear_codes_shared(x, *[[s[i] for s in sites] for i in range(3)], "dint4",
                                                              "channel", 200, "int8", biases)
        for (codes, scale, zp), bias, y in zip(sites, biases, ys):
            single = torch.ops.qcompile_triton.w4_linear_codes(x, codes, scale, zp, "dint4", "channel", 200, "int8",
                                                               bias)
            assert torch.equal(y, single)

    @child_only
    @pytest.mark.parametrize("fmt,m,ns,k,fuse,bias", [("dint4", 1, (16, 24, 40), 200, False, False),
                                                      ("dint4", 3, (40, 8), 256, True, True),
                                                      ("int4", 5, (9, 33, 17), 130, True, False),
                                                      ("int4_sym", 16, (24, 24), 256, False, True)])
    def test_w4a8_gemv_group_equals_one_launch_per_weight(fmt, m, ns, k, fuse, bias):
        """One ``w4_gemv_group_kernel`` launch for 2-3 weights = ``launch_gemv`` per weight, bitwise (the
        programs of each weight are the same code on the same tile config); fp and int32 outputs."""
        from qcompile.backends.triton.w4_linear import launch_gemv_group

        pws = [make_weight(n, k, fmt, "channel", "cpu", seed=n + i) for i, n in enumerate(ns)]
        x = make_x(m, k, "cpu", seed=m)
        biases = [torch.randn(n) for n in ns] if bias else None
        xq, xs, xz = (x, None, None) if fuse else quantize_rows(x, 8, False, 0)
        for int_out in (False, True):
            dtype = torch.int32 if int_out else torch.float32
            ys = launch_gemv_group(xq, xs, xz, pws, [torch.empty(m, n, dtype=dtype) for n in ns], biases=biases,
                                   fuse_quant=fuse, int_out=int_out)
            for i, (pw, y) in enumerate(zip(pws, ys)):
                one = launch_gemv(xq, xs, xz, pw, torch.empty(m, pw.out_features, dtype=dtype), fuse_quant=fuse,
                                  bias=None if biases is None else biases[i], int_out=int_out)
                assert torch.equal(y, one), (i, int_out)
        check_gemm(x, pws[0], launch_gemv, fuse_quant=fuse)  # and the per-weight launch is the reference's

    @child_only
    @pytest.mark.parametrize("path", ["gemv_group", "gemv_group_fused"])
    def test_shared_op_group_paths_match_the_single_ops(path):
        """``w4_linear_codes_shared`` on its single-launch decode paths = the per-site op, bitwise."""
        from qcompile.backends.triton import codes_ops  # noqa: F401  (registers the ops)
        from qcompile.backends.triton.w4_linear import DISPATCH

        sites = _sibling_sites()
        x = make_x(2, 200, "cpu")
        DISPATCH.group_path = path
        try:
            ys = torch.ops.qcompile_triton.w4_linear_codes_shared(x, *[[s[i] for s in sites] for i in range(3)],
                                                                  "dint4", "channel", 200, "int8", [None] * 3)
        finally:
            DISPATCH.group_path = "auto"
        _assert_single_ops_equal(x, sites, ys)

    @child_only
    def test_gemv_pdl_switch_keeps_the_outputs():
        """``DISPATCH.gemv_pdl`` (a launch attribute on CUDA, off in the interpreter) leaves the shared and
        single decode GEMV paths' outputs bitwise as they are."""
        from qcompile.backends.triton import codes_ops  # noqa: F401  (registers the ops)
        from qcompile.backends.triton.w4_linear import DISPATCH

        sites = _sibling_sites()
        x = make_x(1, 200, "cpu")
        args = (x, *[[s[i] for s in sites] for i in range(3)], "dint4", "channel", 200, "int8", [None] * 3)
        DISPATCH.group_path, DISPATCH.decode_path, DISPATCH.gemv_pdl = "gemv_group", "gemv", False
        try:
            off = torch.ops.qcompile_triton.w4_linear_codes_shared(*args)
            DISPATCH.gemv_pdl = True
            on = torch.ops.qcompile_triton.w4_linear_codes_shared(*args)
            single = torch.ops.qcompile_triton.w4_linear_codes(x, *sites[0], "dint4", "channel", 200, "int8", None)
        finally:
            DISPATCH.group_path, DISPATCH.decode_path, DISPATCH.gemv_pdl = "auto", "auto", True
        assert all(torch.equal(a, b) for a, b in zip(on, off)) and torch.equal(single, off[0])

    @child_only
    @pytest.mark.parametrize("m", [1, 3])
    def test_gemv_even_shapes_exact(m):
        """``EVEN`` (N a multiple of BLOCK_N, K a whole number of steps: the K loop without masks, the last
        prefetch re-reading the last step): the reference's int32 sums, single and group GEMV, one and two
        tiles ahead, and the same outputs as a config that is not EVEN on the same shape."""
        from qcompile.backends.triton.w4_gemv_kernel import even
        from qcompile.backends.triton.w4_linear import launch_gemv_group

        n, k = 16, 512
        cfg = dict(BLOCK_N=8, BLOCK_W=32, num_warps=4)  # 2 chunks a step, 4 steps
        assert even([n], k, 128, 8, 32, 1) and not even([n], k, 128, 8, 128, 1) and not even([n + 1], k, 128, 8, 32, 1)
        pw = make_weight(n, k, "dint4", "channel", "cpu", seed=m)
        x = make_x(m, k, "cpu", seed=m)
        xq, xs, xz = quantize_rows(x, 8, False)
        for prefetch in (1, 2):
            check_gemm(x, pw, launch_gemv, config={**cfg, "PREFETCH": prefetch})
        ragged = launch_gemv(xq, xs, xz, pw, torch.empty(m, n), config=dict(BLOCK_N=8, BLOCK_W=128, num_warps=4))
        assert torch.equal(launch_gemv(xq, xs, xz, pw, torch.empty(m, n), config=cfg), ragged)
        pws = [pw, make_weight(24, k, "dint4", "channel", "cpu", seed=9)]
        outs = [launch_gemv_group(xq, xs, xz, pws, [torch.empty(m, q.out_features) for q in pws], config=c)
                for c in (cfg, {**cfg, "PREFETCH": 2}, dict(BLOCK_N=16, BLOCK_W=32, num_warps=4))]
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*outs))  # 24 % 16: not EVEN

    @child_only
    @pytest.mark.parametrize("m,n,k", [(1, 16, 512), (3, 21, 300), (2, 24, 1000)])
    def test_gemv_weight_load_hints_keep_the_outputs(m, n, k, monkeypatch):
        """Cache hints on the weight loads (``W_LOAD`` 1 ``evict_first``, 2 ``.cg``; ``_common.stream_load``) on
        EVEN (unmasked) and ragged (masked) K loops, single and group GEMV, explicit and from
        ``DISPATCH.gemv_w_load``: the reference's int32 sums and the unhinted outputs, bitwise."""
        from qcompile.backends.triton import w4_linear
        from qcompile.backends.triton.w4_linear import launch_gemv_group

        pw = make_weight(n, k, "dint4", "channel", "cpu", seed=m + n)
        x = make_x(m, k, "cpu", seed=m)
        xq, xs, xz = quantize_rows(x, 8, False)
        pws = [pw, make_weight(8, k, "dint4", "channel", "cpu", seed=3)]
        for cfg in (dict(BLOCK_N=8, BLOCK_W=32, num_warps=4), dict(BLOCK_N=8, BLOCK_W=128, num_warps=4, PREFETCH=2)):
            plain = launch_gemv(xq, xs, xz, pw, torch.empty(m, n), config={**cfg, "W_LOAD": 0})
            group = launch_gemv_group(xq, xs, xz, pws, [torch.empty(m, q.out_features) for q in pws],
                                      config={**cfg, "W_LOAD": 0})
            for hint in (1, 2):
                check_gemm(x, pw, launch_gemv, config={**cfg, "W_LOAD": hint})
                assert torch.equal(launch_gemv(xq, xs, xz, pw, torch.empty(m, n), config={**cfg, "W_LOAD": hint}),
                                   plain)
                monkeypatch.setattr(w4_linear.DISPATCH, "gemv_w_load", hint)
                assert torch.equal(launch_gemv(xq, xs, xz, pw, torch.empty(m, n), config=cfg), plain)
                hinted = launch_gemv_group(xq, xs, xz, pws, [torch.empty(m, q.out_features) for q in pws], config=cfg)
                assert all(torch.equal(a, b) for a, b in zip(hinted, group))

    @child_only
    @pytest.mark.parametrize("n,k", [(16, 128), (21, 300), (12, 1000)])
    def test_gemv_direct_activation_words_keep_the_outputs(n, k):
        """``X_DIRECT`` (M = 1: activation words read into the accumulator's layout) = the broadcast words,
        bitwise, for the single and the group GEMV, split-K included; edges in N and K (K % 128 != 0)."""
        from qcompile.backends.triton.w4_linear import DISPATCH, launch_gemv_group

        pws = [make_weight(n + i, k, "dint4", "channel", "cpu", seed=n + i) for i in range(3)]
        x = make_x(1, k, "cpu", seed=k)
        q = quantize_rows(x, 8, False)

        def run():
            ys = [torch.empty(1, pw.out_features) for pw in pws]
            single = launch_gemv(*q, pws[0], torch.empty(1, n))
            split = launch_gemv(*q, pws[1], torch.empty(1, n + 1), config=dict(BLOCK_N=4, BLOCK_W=32, SPLIT_K=3,
                                                                                 num_warps=4))
            return [single, split, *launch_gemv_group(*q, pws, ys)]

        direct = run()
        DISPATCH.gemv_direct = False
        try:
            broadcast = run()
        finally:
            DISPATCH.gemv_direct = True
        assert all(torch.equal(a, b) for a, b in zip(direct, broadcast))
        check_gemm(x, pws[0], launch_gemv)

    @child_only
    @pytest.mark.parametrize("m,n,k", [(2, 16, 256), (3, 21, 300), (4, 12, 1000), (4, 32, 512)])
    def test_gemv_direct_rows_keep_the_outputs(m, n, k):
        """``DISPATCH.gemv_direct_rows`` (M = 2-4: one accumulator per row, each row's words read into the
        weight tile's layout) = the broadcast words, bitwise, for the single, split-K and group GEMV, EVEN and
        masked steps, M = 3 in a BLOCK_M = 4 program; and the reference's int32 sums."""
        from qcompile.backends.triton.w4_linear import DISPATCH, launch_gemv_group

        pws = [make_weight(n + i, k, "dint4", "channel", "cpu", seed=n + i) for i in range(3)]
        x = make_x(m, k, "cpu", seed=k)
        q = quantize_rows(x, 8, False)

        def run():
            ys = [torch.empty(m, pw.out_features) for pw in pws]
            single = launch_gemv(*q, pws[0], torch.empty(m, n), config=dict(BLOCK_N=4, BLOCK_W=64, num_warps=4))
            split = launch_gemv(*q, pws[1], torch.empty(m, n + 1), config=dict(BLOCK_N=4, BLOCK_W=32, SPLIT_K=3,
                                                                                 num_warps=4))
            return [single, split, *launch_gemv_group(*q, pws, ys)]

        broadcast = run()
        DISPATCH.gemv_direct_rows = True
        try:
            rows = run()
            check_gemm(x, pws[0], launch_gemv)
        finally:
            DISPATCH.gemv_direct_rows = False
        assert all(torch.equal(a, b) for a, b in zip(rows, broadcast))

    @child_only
    @pytest.mark.parametrize("m", [2, 3])
    def test_gemv_rows_candidate_paths_keep_the_outputs(m, monkeypatch):
        """``DISPATCH.gemv_rows_candidate``: the per-row paths ("gemv_rows", "gemv_group_rows", and "gemv_rows"
        per weight) exist at M = 2-4 only, launch the GEMV with per-row accumulators (X_DIRECT) and give the
        broadcast paths' outputs bitwise."""
        from qcompile.backends.triton import w4_linear
        from qcompile.backends.triton.w4_linear import DISPATCH, w4_linear_2d, w4_linear_2d_shared

        direct = []  # X_DIRECT of every GEMV launch
        meta_fn = w4_linear._gemv_meta
        monkeypatch.setattr(w4_linear, "_gemv_meta", lambda *a, **kw: direct.append(meta_fn(*a, **kw)["X_DIRECT"])
                            or meta_fn(*a, **kw))

        pws = [make_weight(n, 256, "dint4", "channel", "cpu", seed=n) for n in (24, 40)]
        x = make_x(m, 256, "cpu", seed=m)

        def run(decode_path, group_path):
            DISPATCH.decode_path, DISPATCH.group_path = decode_path, group_path
            try:
                single = w4_linear_2d(x, pws[0], 8, False, 0, None)
                return [single, *w4_linear_2d_shared(x, pws, 8, False, [None, None])]
            finally:
                DISPATCH.decode_path, DISPATCH.group_path = "auto", "auto"

        broadcast = run("gemv", "gemv_group") + run("gemv", "per_weight")
        assert direct and not any(direct)
        direct.clear()
        default = DISPATCH.gemv_rows_candidate
        DISPATCH.gemv_rows_candidate = True
        try:
            rows = run("gemv_rows", "gemv_group_rows") + run("gemv_rows", "per_weight")
            assert len(direct) >= 5 and all(direct)  # single, group (2 metas), and two per weight
            with pytest.raises(ValueError, match="gemv_rows"):  # not a candidate at M = 1
                DISPATCH.decode_path = "gemv_rows"
                w4_linear_2d(x[:1], pws[0], 8, False, 0, None)
        finally:
            DISPATCH.gemv_rows_candidate, DISPATCH.decode_path = default, "auto"
        assert len(rows) == len(broadcast) == 6
        assert all(torch.equal(a, b) for a, b in zip(rows, broadcast))

    def _sibling_sites():
        """Three dINT4 per-channel weights (N = 16, 24, 40; K = 200) as ``formats.quantize`` outputs."""
        from qcompile import formats as F

        return [F.quantize(torch.randn(n, 200, generator=torch.Generator().manual_seed(n)),
                           F.FormatSpec.parse("dint4"), F.Granularity.parse("channel")) for n in (16, 24, 40)]

    def _assert_single_ops_equal(x, sites, ys):
        for (codes, scale, zp), y in zip(sites, ys):
            single = torch.ops.qcompile_triton.w4_linear_codes(x, codes, scale, zp, "dint4", "channel", 200, "int8",
                                                               None)
            assert torch.equal(y, single)

    @child_only
    @pytest.mark.parametrize("m,group_path", [(2, "gemv_group"), (2, "per_weight"), (20, "auto")])
    def test_qcodes_op_matches_the_float_ops(m, group_path):
        """``w4_linear_qcodes`` on codes from ``quantize_per_token_ops`` = the float-input ops, bitwise."""
        from qcompile.backends.triton.inductor_quant import quantize_per_token_ops
        from qcompile.backends.triton.w4_linear import DISPATCH

        sites = _sibling_sites()
        x = make_x(m, 200, "cpu")
        DISPATCH.group_path = group_path
        try:
            ys = torch.ops.qcompile_triton.w4_linear_qcodes(*quantize_per_token_ops(x, "int8"),
                                                            *[[s[i] for s in sites] for i in range(3)], "dint4", 200,
                                                            "int8", [None] * 3, x.dtype)
        finally:
            DISPATCH.group_path = "auto"
        _assert_single_ops_equal(x, sites, ys)

    @child_only
    @pytest.mark.parametrize("sym", [False, True])
    def test_quantize_ops_match_the_kernel_with_cuda_division(sym):
        """With CUDA's division by 255 (times the float32 reciprocal) the torch ops give the kernel's codes."""
        import triton as tr

        from qcompile.backends.triton.inductor_quant import quantize_per_token_ops
        from qcompile.backends.triton.quantize_kernel import _quantize_rows_kernel, launch_config

        x = make_x(7, 300, "cpu", torch.float16, seed=5)
        codes, scale, zp = (torch.empty(7, 300, dtype=torch.int8), torch.empty(7, 1),
                            torch.empty(7, 1, dtype=torch.int32))
        cfg = launch_config(7, 300)
        _quantize_rows_kernel[(tr.cdiv(7, cfg["ROWS"]),)](x, codes, scale, zp, x, 7, 300, QMAX=255, SYMMETRIC=sym,
                                                          RECIP_DIV=True, PDL=False, **cfg)
        got = quantize_per_token_ops(x, "int8_sym" if sym else "int8", recip_div=True)
        assert torch.equal(got[0], codes) and torch.equal(got[1], scale) and torch.equal(got[2], zp)
        # and the two divisions do differ somewhere on these rows (else this test would not test the switch)
        exact = quantize_per_token_ops(x, "int8_sym" if sym else "int8", recip_div=False)
        assert not torch.equal(exact[1], scale)

    @child_only
    def test_w4a8_gemv_group_rejects_mixed_weights():
        from qcompile.backends.triton.w4_linear import launch_gemv_group

        x = make_x(2, 256, "cpu")
        a, b = make_weight(16, 256, "dint4", "channel", "cpu"), make_weight(16, 256, "int4", "channel", "cpu")
        ys = [torch.empty(2, 16), torch.empty(2, 16)]
        with pytest.raises(ValueError, match="differ"):
            launch_gemv_group(x, None, None, [a, b], ys, fuse_quant=True)
        with pytest.raises(ValueError, match="for every weight or for none"):
            launch_gemv_group(x, None, None, [a, a], ys, fuse_quant=True, biases=[torch.zeros(16), None])
        with pytest.raises(ValueError, match="2..3 weights"):
            launch_gemv_group(x, None, None, [a], ys[:1], fuse_quant=True)

    @child_only
    def test_w4a8_gemv_rejects_what_it_cannot_run():
        x = make_x(2, 256, "cpu")
        y = torch.empty(2, 16)
        with pytest.raises(ValueError, match="per-channel"):
            launch_gemv(x, None, None, make_weight(16, 256, "int4", "group64", "cpu"), y, fuse_quant=True)
        with pytest.raises(ValueError, match="M <= 16"):
            launch_gemv(make_x(17, 256, "cpu"), None, None, make_weight(16, 256, "dint4", "channel", "cpu"),
                        torch.empty(17, 16), fuse_quant=True)
        with pytest.raises(ValueError, match="R <= 4"):
            launch_gemv(x, None, None, make_weight(16, 256, "dint4_c0.125", "channel", "cpu"), y, fuse_quant=True,
                        lut=True)

    @child_only
    @pytest.mark.parametrize("fmt,gran,m", [("int4", "group64", 5), ("dint4", "group128", 18)])
    def test_w4a4_gemm_exact(fmt, gran, m):
        pw = make_weight(24, 256, fmt, gran, "cpu")
        check_gemm(make_x(m, 256, "cpu"), pw, launch_gemm, act_bits=4, act_group=pw.group_size)

    @child_only
    @pytest.mark.parametrize("m", [1, 16, 21])
    def test_public_ops_match_formats(m):
        pw = make_weight(32, 256, "dint4", "channel", "cpu")
        check_linear(make_x(m, 256, "cpu"), pw, w4a8_linear, "int8")
        pw_g = make_weight(32, 256, "int4", "group64", "cpu")
        check_linear(make_x(m, 256, "cpu"), pw_g, w4a4_linear, "int4", act_group=64)
        check_linear(make_x(m, 256, "cpu"), pw, w4a4_linear, "int4")  # per-channel: int4 per token
