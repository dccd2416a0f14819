"""examples/gemv_occupancy.py: offline sm_90 compiles of the decode GEMV (no GPU needed)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
    pytest.skip("this Triton has no NVIDIA backend tools (cuobjdump)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import gemv_occupancy as O  # noqa: E402

from qcompile.backends.triton.w4_gemv_kernel import _cfg  # noqa: E402


def test_pipelined_stream_goes_through_shared_memory():
    """PIPELINE = 4 compiles to cp.async copies through shared memory with fewer registers than the
    register double buffer (which has no cp.async): what the pipelined configs exist for. If a change to
    the loop stops the compiler from pipelining it, this fails."""
    hand, piped = _cfg(16, 128, 4), _cfg(16, 128, 4, pipeline=4)
    r_hand, r_piped = O.resources(O.compile_gemv(hand)), O.resources(O.compile_gemv(piped))
    assert r_hand["cp_async"] == 0 and r_piped["cp_async"] > 0
    assert r_piped["smem"] >= 2 * 16 * 128 * 4  # at least two 8 KB weight tiles staged
    assert r_piped["regs"] < r_hand["regs"]
    assert O.in_flight(piped, r_piped, 11008, 132)[1] > 2 * O.in_flight(hand, r_hand, 11008, 132)[1]


def test_pdl_waits_after_the_weight_prologue():
    """As a programmatic dependent launch, the GEMV issues weight loads before ``griddepcontrol.wait``
    (that is what overlaps the previous kernel) and has no wait otherwise."""
    cfg = _cfg(8, 64, 2)
    ptx = O.compile_gemv(cfg, pdl=True).asm["ptx"].splitlines()
    waits = [i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line]
    loads = [i for i, line in enumerate(ptx) if "ld.global" in line]
    assert len(waits) == 1 and loads and loads[0] < waits[0]
    assert "griddepcontrol" not in O.compile_gemv(cfg).asm["ptx"]


def test_batch1_loop_has_no_layout_change():
    """At M = 1 the activation words are read into the accumulator's layout, so the K loop keeps the
    unpacked weights in registers: no shared memory, no barrier, two dp4a per weight word and thread.
    (Broadcasting ``[1, 1, BLOCK_W]`` words instead moved the weights through shared memory with 2-8
    barriers per step.) At M = 16 the broadcast is kept: it costs fewer instructions there."""
    for cfg in (_cfg(8, 64, 2), _cfg(4, 256, 4), _cfg(16, 32, 4)):
        mix = O.loop_mix(O.compile_gemv(cfg), cfg)
        assert mix["barriers"] == 0 and mix["shared"] == 0, (cfg, mix)
        words = cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_W"] // (32 * cfg.num_warps)
        assert mix["dp4a"] == 2 * words, (cfg, mix)
    wide = O.loop_mix(O.compile_gemv(_cfg(16, 32, 4), block_m=16), _cfg(16, 32, 4))
    assert wide["shared"] > 0 and wide["dp4a"] == 2 * 16 * 4


def test_per_row_accumulators_keep_the_loop_in_registers():
    """M = 2-4 with ``rows`` (``DISPATCH.gemv_direct_rows``): each row's accumulator in the weight tile's layout,
    so the K loop has no shared memory and no barrier (the broadcast ``[4, BLOCK_N, BLOCK_W]`` accumulator
    converts the weight tile through shared memory every step), two dp4a per weight word, row and thread,
    and fewer instructions per weight word than that broadcast."""
    for cfg in (_cfg(8, 64, 2), _cfg(4, 256, 4), _cfg(16, 64, 4)):
        words = cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_W"] // (32 * cfg.num_warps)
        for bm in (2, 4):
            mix = O.loop_mix(O.compile_gemv(cfg, block_m=bm, rows=True), cfg)
            assert mix["barriers"] == 0 and mix["shared"] == 0, (cfg, bm, mix)
            assert mix["dp4a"] == 2 * bm * words, (cfg, bm, mix)
        broadcast = O.loop_mix(O.compile_gemv(cfg, block_m=4), cfg)
        assert broadcast["barriers"] > 0 and mix["per_word"] < broadcast["per_word"], (cfg, mix, broadcast)


def test_channel_tables_load_before_the_loop():
    """The per-channel tables (weight sums, scales, bias) and the k-split's activation qparams load before the K
    loop (``w4_gemv_kernel.channel_tables``): no global load is left after a loop's back branch (GEMV: plain, PDL,
    grouped, per-row M = 4; k-split: PDL on and off, with bias). Read in the epilogue, the cold tables were one
    (GEMV) or two (k-split, between barriers) memory round trips in every program's tail; moving them made the
    k-split kernel 1-7 % faster on the H100 (``channel_tables_ab_h100.txt``)."""
    from qcompile.backends.triton.w4_ksplit_kernel import KSPLIT_CONFIGS

    for cfg in (_cfg(8, 64, 2), _cfg(16, 64, 4, prefetch=2)):
        for pdl in (False, True):
            assert O.loads_after_loop(O.compile_gemv(cfg, pdl=pdl)) == 0, (cfg, pdl)
        assert O.loads_after_loop(O.compile_gemv(cfg, group=3)) == 0, cfg
        assert O.loads_after_loop(O.compile_gemv(cfg, block_m=4, rows=True)) == 0, cfg
    for cfg in KSPLIT_CONFIGS[:2]:
        for pdl in (False, True):
            assert O.loads_after_loop(O.compile_ksplit(cfg, pdl=pdl, has_bias=True)) == 0, (cfg, pdl)
