"""The lowbit backend on the real default model (SmolLM2-135M) on a GPU: logits and perplexity vs the reference.

Needs CUDA and the model: the asset cache (``qcompile assets fetch``), or ``QCOMPILE_TEST_MODEL`` = a
``.gguf`` / HF folder; Wikipedia token ids from the cache, or ``QCOMPILE_TEST_WIKI_IDS`` = a ``torch.save``d
1-D tensor (the device machine has no tokenizer assets). Skipped otherwise. Prints its figures (run with -s).
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

RECIPE = "w4a8-rtn-dint4"  # per-channel dINT4 weights (not SmolLM2's own g32 grid), int8 per-token activations
WINDOWS = 8                # first 8 windows of 2048 tokens of the Wikipedia sample (DESIGN.md's 4, doubled:
                           # less rounding noise, see below)


def _model_and_ids():
    import qcompile
    from qcompile.errors import QcompileError

    source = os.environ.get("QCOMPILE_TEST_MODEL", "default")
    try:
        model = qcompile.load_model(source)
    except QcompileError as e:
        pytest.skip(f"model not available: {e}")
    ids_path = os.environ.get("QCOMPILE_TEST_WIKI_IDS")
    if ids_path:
        ids = torch.load(ids_path).long()
    else:
        from qcompile.evaluate import encode
        ids = torch.tensor(encode(qcompile.load_tokenizer(source), qcompile.assets.read_text("wiki")))
    return model, ids[: WINDOWS * 2048]


def _float64_linears(qm):
    """The module form of ``qm`` with every quantized linear's GEMM in float64 (same codes, same QDQ): the
    reference with a more exact float rounding, to measure how much rounding alone moves the perplexity."""
    import types

    from qcompile.backends.triton.qmodules import QuantizedLinear, to_module_form

    def forward(self, x):
        xq = torch.ops.qcompile.qdq_activation(x, self.act_fmt, self.act_granularity)
        w = torch.ops.qcompile.dequantize_weight(self.codes, self.scale, self.zero_point, self.fmt, self.granularity,
                                                 self.in_features, "float32")
        return torch.nn.functional.linear(xq.double(), w.double()).to(x.dtype)

    mf = to_module_form(qm).cuda()
    for mod in mf.modules():
        if isinstance(mod, QuantizedLinear):
            mod.forward = types.MethodType(forward, mod)
    return mf


def test_smollm2_w4a8_lowbit_matches_reference():
    import qcompile
    from qcompile.backends.triton import dynamo

    model, ids = _model_and_ids()
    model = model.cuda()
    qm = qcompile.quantize(model, RECIPE, progress=False)
    fast = torch.compile(qm, backend="lowbit")
    window = ids[:2048].view(1, -1).cuda()
    f64 = _float64_linears(qm)
    with torch.no_grad():
        ref_logits, fast_logits, f64_logits = qm(window), fast(window), f64(window)
    report = dynamo.last_report()
    assert len(report.lowered) == len(report.sites) == 210, report.table()

    def vs_ref(logits):  # (relative error, top-1 agreement) against the reference's window-1 logits
        logits = getattr(logits, "logits", logits)
        ref = getattr(ref_logits, "logits", ref_logits)
        return ((logits - ref).norm() / ref.norm()).item(), (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()

    (rel, top1), (rel64, top1_64) = vs_ref(fast_logits), vs_ref(f64_logits)
    ppl_ref = qcompile.perplexity(qm, ids, window=2048, max_windows=WINDOWS, progress=False)["ppl"]
    ppl_fast = qcompile.perplexity(fast, ids, window=2048, max_windows=WINDOWS, progress=False)["ppl"]
    ppl_fp = qcompile.perplexity(model, ids, window=2048, max_windows=WINDOWS, progress=False)["ppl"]
    ppl_f64 = qcompile.perplexity(f64, ids, window=2048, max_windows=WINDOWS, progress=False)["ppl"]
    ppl4 = [qcompile.perplexity(m, ids, window=2048, max_windows=4, progress=False)["ppl"] for m in (qm, fast)]
    print(f"\nSmolLM2-135M {RECIPE} on {torch.cuda.get_device_name()}, {WINDOWS} windows x 2048: perplexity FP32 "
          f"{ppl_fp:.3f}, reference backend {ppl_ref:.4f}, lowbit {ppl_fast:.4f} (ratio {ppl_fast / ppl_ref:.6f}); "
          f"reference with float64 GEMMs {ppl_f64:.4f} (ratio {ppl_f64 / ppl_ref:.6f}: rounding noise alone); "
          f"first 4 windows: reference {ppl4[0]:.4f}, lowbit {ppl4[1]:.4f}; window 1 vs the reference: lowbit "
          f"logits rel. err {rel:.2e}, top-1 agreement {top1:.4f}; float64 GEMMs {rel64:.2e}, {top1_64:.4f}; "
          f"{report.summary()}")
    # Each lowered linear is exact in int32 + fp32 scaling (~2e-7 relative from the reference's fp32 GEMM);
    # upstream float differences (Inductor's fused norms, that rounding) flip an int8 activation code now
    # and then, and this W4A8 model amplifies flips: the reference with float64 GEMMs (same codes, only a
    # finer rounding) is itself 6.78e-02 from the fp32 reference in logits and agrees on 0.9229 of the
    # top-1 tokens (H100, window 1, as this test prints). So the logits are bounded by that noise floor,
    # measured in the same run (the first GPU run, with a fixed top-1 > 0.95 guessed before the floor was
    # measured, failed at 0.924 on the H200: the floor's level, not a kernel error); the perplexity target
    # is the issue's.
    assert rel < 1.5 * rel64 and top1 > top1_64 - 0.03, (rel, rel64, top1, top1_64)
    assert abs(ppl_fast / ppl_ref - 1) < 1e-3  # the target: perplexity equal within 0.1 %
