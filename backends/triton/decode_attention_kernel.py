"""Decode attention: one query token per sequence against a KV cache, split over the keys (flash decoding).

    o[b, h] = softmax(scale * q[b, h] . K[b, hk]^T + mask[b, h]) V[b, hk]        q: [B, H, 1, D]; K, V: [B, Hkv, L, D]

At decode a sequence's query is one row, so the usual attention kernels give each (batch, head) one
program that walks all L keys: at batch 1 that is H programs (32 for LLaMA-2-7B) on 132 SMs, each a
serial loop. Here the keys of every (batch, head) are cut into ``SPLITS`` slices, one program each::

    program (bh, s): keys [s*PER, (s+1)*PER)  -> running max m, sum l, unnormalised acc [D]  (online softmax)
                     -> workspace; takes a ticket; the program that draws the last ticket of bh reads all
                        SPLITS partials and writes   o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s

(the same ticket scheme as the split-K GEMV: no second launch, the counter is re-zeroed by the last
program). Scores are kept in the base-2 domain (``scale * log2 e`` folded into q), all arithmetic in fp32,
the output rounded once to the query's dtype. ``hk = h // (H / Hkv)`` (grouped-query attention without a
repeat of K / V). On CUDA it launches as a programmatic dependent (PDL), as the quantization and GEMV
launches do: the launch overlaps the tail of the kernel before it. The mask is boolean (False: not
attended) or additive, broadcast over batch and head by stride 0. A (batch, head) whose keys are all
masked gets NaN, as the math reference does.

File order (Triton tutorial): configs -> kernel -> wrapper.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._common import pdl_launch, stream_key

__all__ = ["decode_attention", "launch_config"]

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the same, for the kernel (Triton reads only constexpr globals)


# ----------------------------------------------------------------------------------------------- configs
def launch_config(bh: int, kv_len: int, head_dim: int) -> dict:
    """Keys per step (``BLOCK_L``), slices per (batch, head) (``SPLITS``, a power of two) and warps: up to
    ~1024 programs in all, no more slices than steps of keys (rounded up to a power of two). H100, fp16,
    D = 128 (``bench_decode_attention.py``): the best of the sweep was 32 keys x 8 slices at B = 1, L = 200
    (4.97 us, SDPA 11.47), 32 x 32 at L = 4096, 32 x 2 at B = 16 (L = 200 and 1024), all with 2 warps."""
    block_l = 32 if head_dim >= 128 else 64
    splits = 1
    while bh * splits * 2 <= 1024 and splits * block_l < kv_len and splits < 64:
        splits *= 2
    return dict(BLOCK_L=block_l, SPLITS=splits, num_warps=2)


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, ws_ptr, cnt_ptr,
        H, L, qk_scale,  # qk_scale = scale * log2(e)
        s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_mb, s_mh, s_ml, s_ob, s_oh,
        GROUP: tl.constexpr,  # query heads per KV head
        MASK_KIND: tl.constexpr,  # 0: none, 1: boolean (nonzero = attend), 2: additive
        D: tl.constexpr, BLOCK_L: tl.constexpr, SPLITS: tl.constexpr,
        PDL: tl.constexpr):  # launched as a programmatic dependent: wait for the kernel before, then read
    if PDL:
        gdc_wait()
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + d).to(tl.float32) * qk_scale
    per = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_L) * BLOCK_L
    l0 = split * per
    l1 = tl.minimum(l0 + per, L)
    k_base = k_ptr + b * s_kb + hk * s_kh
    v_base = v_ptr + b * s_vb + hk * s_vh
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for start in range(l0, l1, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        ok = offs < l1
        k = tl.load(k_base + offs[:, None] * s_kl + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)  # [BLOCK_L], base-2 logits
        if MASK_KIND == 1:
            keep = tl.load(mask_ptr + b * s_mb + h * s_mh + offs * s_ml, mask=ok, other=0)
            ok = ok & (keep != 0)
        elif MASK_KIND == 2:
            bias = tl.load(mask_ptr + b * s_mb + h * s_mh + offs * s_ml, mask=ok, other=0.0).to(tl.float32)
            s += bias * _LOG2E  # the logits are base 2
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
        p = tl.exp2(s - m_use)
        alpha = tl.exp2(m_i - m_use)
        v = tl.load(v_base + offs[:, None] * s_vl + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    if PDL:  # the keys are read: the next kernel (a programmatic dependent) may launch; it waits for this one
        gdc_launch_dependents()
    o_ptrs = o_ptr + b * s_ob + h * s_oh + d
    if SPLITS == 1:
        tl.store(o_ptrs, (acc / l_i).to(o_ptr.dtype.element_ty))
    else:
        # workspace row (bh, split): acc [D], then m, l
        row = ws_ptr + (bh * SPLITS + split) * (D + 2)
        tl.store(row + d, acc)
        tl.store(row + D + tl.arange(0, 1), m_i)
        tl.store(row + D + 1 + tl.arange(0, 1), l_i)
        ticket = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")  # release: the stores above come first
        if ticket == SPLITS - 1:
            sp = tl.arange(0, SPLITS)
            rows = ws_ptr + (bh * SPLITS + sp) * (D + 2)
            ms = tl.load(rows + D, volatile=True)
            ls = tl.load(rows + D + 1, volatile=True)
            accs = tl.load(rows[:, None] + d[None, :], volatile=True)
            m_all = tl.max(ms, axis=0)
            w = tl.where(ms == float("-inf"), 0.0, tl.exp2(ms - m_all))
            out = tl.sum(accs * w[:, None], axis=0) / tl.sum(ls * w, axis=0)
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty))
            tl.atomic_xchg(cnt_ptr + bh, 0)


# ----------------------------------------------------------------------------------------------- wrapper
_WORKSPACES: dict = {}


def _workspace(device, bh: int, splits: int, head_dim: int):
    """fp32 partials ``[bh * splits, D + 2]`` and int32 tickets ``[bh]`` (kept zero between calls), one
    pair per (device, stream) and size, reused: calls on one stream run in order (CUDA graphs capture the
    pair of the capture stream); two streams get two pairs. Two graphs captured on one stream and replayed
    at once on two streams would still share one pair."""
    key = (*stream_key(device), bh, splits, head_dim)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.empty(bh * splits * (head_dim + 2), device=device, dtype=torch.float32),
                            torch.zeros(bh, device=device, dtype=torch.int32))
    return _WORKSPACES[key]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None, config: dict | None = None, pdl: bool = True) -> torch.Tensor:
    """``softmax(scale q K^T + mask) V`` for one query token: ``q [B, H, 1, D]``, ``k, v [B, Hkv, L, D]``
    (H a multiple of Hkv), ``mask`` boolean or additive, broadcastable to ``[B, H, 1, L]``. Any strides
    with a contiguous last dim. Returns ``[B, H, 1, D]`` in ``q``'s dtype. ``config``: ``BLOCK_L``,
    ``SPLITS``, ``num_warps`` instead of ``launch_config``'s (callers check shapes; ``attention_ops.py``
    does). ``pdl``: launch as a programmatic dependent of the kernel before (Hopper; it waits for that
    kernel before its first read, and lets the next one launch once its keys are read)."""
    bsz, heads, _, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    out = torch.empty((bsz, heads, 1, dim), device=q.device, dtype=q.dtype)
    cfg = config or launch_config(bsz * heads, kv_len, dim)
    ws, tickets = _workspace(q.device, bsz * heads, cfg["SPLITS"], dim)
    if mask is None:
        kind, mask_t, sm = 0, q, (0, 0, 0)
    else:
        kind = 1 if mask.dtype == torch.bool else 2
        mask_t = mask.expand(bsz, heads, 1, kv_len)
        sm = (mask_t.stride(0), mask_t.stride(1), mask_t.stride(3))
        if kind == 1:
            mask_t = mask_t.view(torch.uint8)
    grid = (bsz * heads, cfg["SPLITS"])
    pdl = pdl_launch(pdl, q.device)
    _decode_attention_kernel[grid](
        q, k, v, mask_t, out, ws, tickets, heads, kv_len, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *sm, out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, MASK_KIND=kind, D=dim, PDL=pdl, **cfg, **({"launch_pdl": True} if pdl else {}))
    return out
