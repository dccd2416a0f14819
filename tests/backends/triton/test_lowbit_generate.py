"""HF ``generate`` with a KV cache on a ``lowbit``-compiled quantized model: the eager model's tokens and scores.

Decode steps (one query token) put attention on the decode-attention op (the default) and the linears on the
kernel ops; the prefill stays on SDPA. On CPU the ops run their references, so this checks the graph rewrites
and their shape handling as the cache grows (dynamic cache: recompiles with symbolic lengths; static cache:
fixed shapes, a mask over the unused slots), not the Triton kernels (``test_kernels_gpu.py``).
"""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from qcompile.backends.triton import dynamo
from qcompile.backends.triton.qmodules import quantize_linears

IDS = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
GEN = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("family,cache", [("llama", None), ("llama", "static"), ("gqa", None), ("opt", None)])
def test_generate_on_lowbit_matches_eager(family, cache):
    model = tiny_model(family)
    extra = {"cache_implementation": cache} if cache else {}
    with torch.no_grad():
        want = quantize_linears(model, "w4a8-rtn-dint4").eval().generate(IDS, **GEN, **extra)
        fast = quantize_linears(model, "w4a8-rtn-dint4").eval()
        torch._dynamo.reset()
        n_before = len(dynamo.reports())
        fast.forward = torch.compile(fast.forward, backend="lowbit", options={"inductor": False})
        got = fast.generate(IDS, **GEN, **extra)
    reports = dynamo.reports()[n_before:]
    n_linears = 12 if family == "opt" else 14  # 2 layers x (q, k, v, o, fc1, fc2) or (q, k, v, o, gate, up, down)
    assert reports and all(len(r.lowered) == n_linears for r in reports)  # every graph
    assert any(r.attention and all(a.lowered for a in r.attention) for r in reports)  # a decode-step graph
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
