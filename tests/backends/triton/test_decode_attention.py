"""Decode attention: the op against fp32 SDPA, its errors, the FX lowering, and the kernel under TRITON_INTERPRET=1.

Tolerance: the kernel computes in fp32 (online softmax in base 2, split partials combined once) and rounds
the output once to the input dtype, as the reference (SDPA in fp32, then rounded) does. The fp32 results
differ by a few fp32 ulps (summation order, ``exp2``), so the rounded outputs differ by at most one ulp
of the dtype: ``eps(dtype) * max |ref|`` (fp32: 1e-5 relative to max |ref|).
"""
from __future__ import annotations

import os

import pytest
import torch

from qcompile.backends.triton import dynamo
from qcompile.backends.triton.attention_ops import _reference, decode_attention
from qcompile.backends.triton.lower_attention import lower_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _tol(dtype, ref):
    eps = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    return eps * max(1.0, ref.float().abs().max().item())


def _inputs(b, h, hkv, length, d, mask_kind, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((b, h, 1, d), (b, hkv, length, d), (b, hkv, length, d)))
    if mask_kind == "bool":
        mask = (torch.arange(length) <= length // 2)[None, None, None]
    elif mask_kind == "additive":
        mask = torch.randn(b, 1, 1, length, generator=g)
        mask[..., 1::3] = float("-inf")
        mask = mask.to(dtype)
    else:
        mask = None
    return q, k, v, mask


def test_reference_op_matches_sdpa():
    q, k, v, mask = _inputs(2, 4, 4, 33, 32, "bool")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(decode_attention(q, k, v, mask), want, rtol=1e-5, atol=1e-6)


def test_opcheck():
    q, k, v, mask = _inputs(1, 4, 2, 9, 16, "additive")
    torch.library.opcheck(torch.ops.qcompile_triton.decode_attention.default, (q, k, v, mask, 0.25))


@pytest.mark.parametrize("change,err,match", [
    (dict(q=torch.zeros(1, 4, 2, 16)), ValueError, "one query token"),
    (dict(q=torch.zeros(1, 4, 1, 24), k=torch.zeros(1, 4, 9, 24), v=torch.zeros(1, 4, 9, 24)), ValueError,
     "power of two"),
    (dict(k=torch.zeros(1, 3, 9, 16), v=torch.zeros(1, 3, 9, 16)), ValueError, "multiple"),
    (dict(v=torch.zeros(1, 4, 8, 16)), ValueError, "k and v"),
    (dict(k=torch.zeros(1, 4, 9, 16, dtype=torch.float16)), TypeError, "share"),
    (dict(mask=torch.zeros(1, 1, 1, 9, dtype=torch.int32)), TypeError, "boolean"),
    (dict(mask=torch.ones(1, 1, 1, 5, dtype=torch.bool)), ValueError, "broadcast"),
    (dict(q=torch.zeros(1, 4, 1, 32)[..., ::2]), ValueError, "contiguous"),
    (dict(q=torch.zeros(4, 16)), ValueError, "4-D"),
])
def test_bad_input_is_a_clear_error(change, err, match):
    args = dict(q=torch.zeros(1, 4, 1, 16), k=torch.zeros(1, 4, 9, 16), v=torch.zeros(1, 4, 9, 16), mask=None)
    args.update(change)
    with pytest.raises(err, match=match):
        decode_attention(args["q"], args["k"], args["v"], args["mask"])


def _tiny_llama_step(num_kv_heads=2, cache_len=24, prompt_len=6):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    cache = transformers.StaticCache(config=cfg, max_cache_len=cache_len, max_batch_size=1, device="cpu",
                                     dtype=torch.float32)
    prompt = torch.randint(0, 128, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, past_key_values=cache)
    kv_pos = torch.arange(cache_len)

    def step(ids, pos):
        mask = (kv_pos <= pos.view(-1, 1))[None, None]
        return model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                     past_key_values=cache).logits
    return step, prompt[:, -1:], torch.full((1, 1), prompt_len)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("options", [{}, {"decode_attention": True}])
def test_lowbit_lowers_decode_attention_by_default_and_keeps_the_logits(options):
    step, ids, pos = _tiny_llama_step()
    with torch.no_grad():
        want = step(ids, pos)
        torch._dynamo.reset()
        got = torch.compile(step, backend="lowbit", options={**options, "inductor": False})(ids, pos)
    report = dynamo.last_report()
    assert len(report.attention) == 2 and all(a.lowered for a in report.attention)
    assert "2 of 2 attention calls" in report.summary() and "lowered: decode_attention" in report.table()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lowbit_decode_attention_can_be_turned_off():
    step, ids, pos = _tiny_llama_step()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(step, backend="lowbit", options={"decode_attention": False, "inductor": False})(ids, pos)
    assert dynamo.last_report().attention == [] and "attention" not in dynamo.last_report().summary()


def test_prefill_and_causal_calls_stay_as_they_are():
    def f(q, k, v):
        return (torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                + torch.nn.functional.scaled_dot_product_attention(q[:, :, :1], k, v, is_causal=True).sum()
                + torch.nn.functional.scaled_dot_product_attention(q[:, :, :1], k, v, dropout_p=0.0))
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(f, backend=capture)(q, k, v)
    sites = lower_attention(graphs[0])
    assert [s.reason is None for s in sites] == [False, False, True]
    assert "query tokens" in sites[0].reason and "is_causal" in sites[1].reason
    torch.testing.assert_close(graphs[0](q, k, v)[0], f(q, k, v))


@pytest.mark.skipif(INTERPRET, reason="this is the parent's driver")
def test_interpreter_suite():
    from triton_cases import run_interpreted

    run_interpreted(__file__, "-k", "interpreted", timeout=600)


@pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child process")
@pytest.mark.parametrize("b,h,hkv,length,d,mask_kind,dtype", [
    (1, 4, 4, 200, 64, "bool", torch.float16), (2, 4, 2, 37, 32, "additive", torch.float32),
    (1, 8, 8, 300, 128, None, torch.bfloat16), (3, 2, 1, 5, 16, "bool", torch.float16),
    (1, 2, 2, 1, 16, None, torch.float32),
])
def test_kernel_interpreted_matches_the_reference(b, h, hkv, length, d, mask_kind, dtype):
    from qcompile.backends.triton.decode_attention_kernel import decode_attention as kernel

    q, k, v, mask = _inputs(b, h, hkv, length, d, mask_kind, dtype)
    ref = _reference(q, k, v, mask, d ** -0.5)
    for config in (None, dict(BLOCK_L=16, SPLITS=1, num_warps=4), dict(BLOCK_L=16, SPLITS=4, num_warps=4)):
        for _ in range(2):  # the split tickets are back at zero after a call
            out = kernel(q, k, v, mask, d ** -0.5, config=config)
            assert out.dtype == dtype and out.shape == q.shape
            assert (out.float() - ref.float()).abs().max().item() <= _tol(dtype, ref), config


@pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child process")
def test_kernel_interpreted_through_the_op_and_strided_inputs():
    q, k, v, mask = _inputs(2, 4, 4, 40, 32, "bool", torch.float16)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, 1, H, D] memory, as HF's projections give
    big_k = torch.zeros(2, 4, 64, 32, dtype=torch.float16)
    big_k[:, :, :40] = k  # a slice of a longer cache
    out = decode_attention(qt, big_k[:, :, :40], v, mask)
    ref = _reference(q, k, v, mask, 32 ** -0.5)
    assert (out.float() - ref.float()).abs().max().item() <= _tol(torch.float16, ref)


def test_split_workspaces_are_kept_per_device_and_stream():
    """The split partial sums and tickets are allocated once per (device, stream) and size and reused (a
    captured graph points at them); on CPU the stream is 0. Two CUDA streams: ``test_kernels_gpu.py``."""
    from qcompile.backends.triton._common import stream_key
    from qcompile.backends.triton.decode_attention_kernel import _workspace
    from qcompile.backends.triton.w4_linear import splitk_workspace

    cpu = torch.device("cpu")
    assert stream_key(cpu) == ("cpu", 0) and stream_key("cpu") == ("cpu", 0)
    ws, tickets = _workspace(cpu, 6, 4, 8)
    assert ws.shape == (6 * 4 * 10,) and tickets.shape == (6,) and not tickets.any()
    assert _workspace(cpu, 6, 4, 8)[0] is ws and _workspace(cpu, 6, 8, 8)[0] is not ws
    assert splitk_workspace("cpu", 96)[0] is splitk_workspace(cpu, 96)[0]
