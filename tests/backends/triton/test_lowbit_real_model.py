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
    with torch.no_grad():
        ref_logits, fast_logits = qm(window), fast(window)
    report = dynamo.last_report()
    assert len(report.lowered) == len(report.sites) == 210, report.table()
    rel = ((fast_logits - ref_logits).norm() / ref_logits.norm()).item()
    top1 = (fast_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    ppl_ref = qcompile.perplexity(qm, ids, window=2048, max_windows=WINDOWS, progress=False)["ppl"]
    ppl_fast = qcompile.perplexity(fast, ids, window=2048, max_windows=WINDOWS, progress=False)["ppl"]
    ppl_fp = qcompile.perplexity(model, ids, window=2048, max_windows=WINDOWS, progress=False)["ppl"]
    ppl_f64 = qcompile.perplexity(_float64_linears(qm), ids, window=2048, max_windows=WINDOWS, progress=False)["ppl"]
    ppl4 = [qcompile.perplexity(m, ids, window=2048, max_windows=4, progress=False)["ppl"] for m in (qm, fast)]
    print(f"\nSmolLM2-135M {RECIPE} on {torch.cuda.get_device_name()}, {WINDOWS} windows x 2048: perplexity FP32 "
          f"{ppl_fp:.3f}, reference backend {ppl_ref:.4f}, lowbit {ppl_fast:.4f} (ratio {ppl_fast / ppl_ref:.6f}); "
          f"reference with float64 GEMMs {ppl_f64:.4f} (ratio {ppl_f64 / ppl_ref:.6f}: rounding noise alone); "
          f"first 4 windows: reference {ppl4[0]:.4f}, lowbit {ppl4[1]:.4f}; logits (window 1) rel. err {rel:.2e}, "
          f"top-1 agreement {top1:.4f}; {report.summary()}")
    # Each lowered linear is exact in int32 + fp32 scaling (~2e-7 relative from the reference's fp32 GEMM);
    # upstream float differences (Inductor's fused norms, that rounding) flip an int8 activation code now
    # and then, and this W4A8 model amplifies flips: on CPU, 2 windows x 256, float64 instead of float32
    # GEMMs in the reference itself moved logits by 6 % and perplexity by 2 % (27.57 -> 27.01). So the
    # logits bound is loose by nature; the perplexity target is the issue's.
    assert rel < 0.1
    assert top1 > 0.95
    assert abs(ppl_fast / ppl_ref - 1) < 1e-3  # the target: perplexity equal within 0.1 %
