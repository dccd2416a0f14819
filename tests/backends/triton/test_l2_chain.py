"""l2_chain: every lowered linear names the next one's weights (for the GEMV's L2 prefetch); outputs unchanged."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import qcompile
from qcompile.backends.triton import dynamo
from qcompile.backends.triton.codes_ops import w4_linear_codes
from qcompile.backends.triton.w4_linear import DISPATCH, _l2_args

IDS = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
_SITES = (torch.ops.qcompile_triton.w4_linear_codes.default, torch.ops.qcompile_triton.w4_linear_codes_shared.default)


def _run(qm, **options):
    """Logits, report and the rewritten graph of ``torch.compile(qm, backend="lowbit")`` (Inductor off)."""
    graphs = []

    def keep(gm, example_inputs):
        fn = dynamo.lowbit_backend(gm, example_inputs, options={"inductor": False, **options})
        graphs.append(gm)
        return fn

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(qm, backend=keep)(IDS)
    return getattr(out, "logits", out), dynamo.last_report(), graphs[0]


def _sites(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SITES]


def test_each_site_names_the_next_sites_codes():
    qm = qcompile.quantize(tiny_model("llama"), "w4a8-rtn-dint4", progress=False)
    plain, rep_plain, g_plain = _run(qm)  # off by default
    chained, rep, gm = _run(qm, l2_prefetch=True)
    sites = _sites(gm)
    assert len(sites) == 8  # 2 layers: q/k/v group, o, gate/up group, down
    assert rep.l2_chained == 7 and rep_plain.l2_chained == 0
    assert "7 sites know the next site's weights" in rep.summary() and "L2" not in rep_plain.summary()
    assert all(len(n.args) == 9 for n in _sites(g_plain))
    for site, nxt in zip(sites, sites[1:]):
        codes = nxt.args[1] if isinstance(nxt.args[1], (list, tuple)) else [nxt.args[1]]
        assert list(site.args[9:]) == list(codes)
    assert len(sites[-1].args) == 9  # nothing after the last one
    assert torch.equal(plain, chained)


def test_prefetch_hint_changes_nothing_on_cpu():
    """On CPU the ops run the reference: next_codes and every DISPATCH.l2_prefetch mode give the same output."""
    qm = qcompile.quantize(tiny_model("llama"), "w4a8-rtn-dint4", progress=False)
    off, _, _ = _run(qm, l2_prefetch=False)
    for mode in ("end", "start"):
        DISPATCH.l2_prefetch = mode
        try:
            on, _, _ = _run(qm, l2_prefetch=True)
        finally:
            DISPATCH.l2_prefetch = "off"
        assert torch.equal(off, on)


def test_op_takes_next_codes():
    from qcompile import formats as F

    g = torch.Generator().manual_seed(0)
    spec, gran = F.FormatSpec.parse("dint4"), F.Granularity.parse("channel")
    codes, scale, zp = F.quantize(torch.randn(32, 64, generator=g), spec, gran)
    nxt = F.quantize(torch.randn(16, 64, generator=g), spec, gran)[0]
    x = torch.randn(3, 64, generator=g)
    y = w4_linear_codes(x, codes, scale, zp, "dint4", "channel", 64, "int8", None)
    assert torch.equal(y, w4_linear_codes(x, codes, scale, zp, "dint4", "channel", 64, "int8", None, nxt))


def test_bad_prefetch_mode_is_a_clear_error():
    DISPATCH.l2_prefetch = "sometimes"
    try:
        with pytest.raises(ValueError, match="'off', 'end' or 'start'"):
            _l2_args([torch.zeros(64, dtype=torch.uint8)], torch.zeros(2))
    finally:
        DISPATCH.l2_prefetch = "off"
    args, meta = _l2_args([torch.zeros(64, dtype=torch.uint8)], torch.zeros(2))  # off, and CPU: nothing
    assert meta == {"L2_NEXT": 0, "L2_EARLY": False} and len(args) == 6
