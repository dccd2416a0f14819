"""quantize_in_inductor: the per-token int8 activation quantization of lowered linears as plain torch ops.

After ``lower_linears`` (and ``share_activation_quantization``) each W4A8 site quantizes its input
inside the kernel op: at decode, a separate ``quantize_rows`` launch of ~3 us per site (or group)
before the GEMV, reading back the activation the previous kernel (RMSNorm, SiLU * up) just wrote.
This pass writes that quantization into the graph as torch ops and hands the kernel op the codes::

    ys = w4_linear_codes_shared(x, [codes_q, codes_k, codes_v], ...)
        ->  xq, xs, xz = quantize_per_token_ops(x, "int8")          # torch ops: Inductor fuses them
            ys = w4_linear_qcodes(xq, xs, xz, [codes_q, codes_k, codes_v], ...)   # into the producer

so Inductor emits the norm (or SiLU * up) and the quantization as one kernel and one launch.

Numerics. ``quantize_per_token_ops`` is ``formats.quantize`` per token written so that compiled code
rounds every step as the reference does: divisions by a tensor in float64 then rounded to float32
(correctly rounded, as ``x / scale`` in float32 is: float64 has more than 2 * 24 + 2 bits, so the
double rounding is exact), the division of the range by ``2^b - 1`` as the reference computes it on
the device (CUDA: times the float32 reciprocal), round half to even. What the pass does change: the
producer and the quantization are one Inductor kernel, so a float16 activation is quantized from the
float32 value Inductor computed before its float16 store would round it (Inductor drops such
down/up-cast pairs inside a kernel), and the producer's own reduction order may differ. Codes then
differ from the unfused graph's by one step wherever the float16 rounding moves a value across a
rounding boundary (not rare for float16 activations); the kernels still consume exactly the codes they
are given. Alone (no producer to fuse), Inductor's code for these ops gives ``quantize_rows``'s codes
bit for bit (``test_gpu_inductor_codes_equal_the_kernel``, H200, float16 and float32).

Measured (``python examples/bench_decode.py --inductor-quant``, H200, LLaMA-2-7B shapes, batch 1):
381.7 tok/s with the pass vs 377.7 without, in one run: under a CUDA graph the ~3 us ``quantize_rows``
launches mostly overlap, so removing them buys ~1 %. For that the codes would stop being the
reference's (tiny fp16 LLaMA: logits 5e-3 relative from the unfused graph), so
``lowbit``'s ``inductor_quant`` option is off by default.
"""
from __future__ import annotations

import torch
from torch import fx

from .qcodes_sites import call_before, int8_site, node_val, replace_with_qcodes

__all__ = ["quantize_in_inductor", "quantize_per_token_ops"]

_ACT = {"int8": False, "int8_sym": True}  # activation formats this pass takes -> symmetric


def quantize_per_token_ops(x: torch.Tensor, act_fmt: str, recip_div: bool | None = None):
    """``formats.quantize(x, int8, per token)`` in plain torch ops, in the kernels' signed convention.

    Args:
        x: ``[..., K]`` float activations.
        act_fmt: ``"int8"`` (min-max, zero-point) or ``"int8_sym"`` (abs-max).
        recip_div: divide the range by 255 (127) as a multiplication by the float32 reciprocal, as torch
            does on CUDA (``_common.recip_div``); default: by ``x``'s device.

    Returns:
        ``codes int8 [..., K]`` (``q - 128``), ``scale fp32 [..., 1]``, ``zp int32 [..., 1]`` (``z - 128``).
    """
    if act_fmt not in _ACT:
        raise ValueError(f"quantize_per_token_ops takes int8 / int8_sym activations, not {act_fmt!r}")
    if recip_div is None:
        recip_div = x.device.type == "cuda"
    xf = x.float()
    lo = xf.amin(-1, keepdim=True).clamp_max(0.0)
    hi = xf.amax(-1, keepdim=True).clamp_min(0.0)
    if _ACT[act_fmt]:
        span, p = torch.maximum(-lo, hi), 127
    else:
        span, p = hi - lo, 255
    scale = (span * (1.0 / p) if recip_div else span / p).clamp_min(1e-8)
    s64 = scale.double()
    if _ACT[act_fmt]:
        zp = torch.full_like(scale, 128.0)
    else:
        zp = torch.round((-lo.double() / s64).float()).clamp(0, 255)
    q = torch.clamp(torch.round((xf.double() / s64).float()) + zp, 0, 255)
    return (q - 128).to(torch.int8), scale, (zp - 128).to(torch.int32)


def quantize_in_inductor(gm: fx.GraphModule, devices=("cuda",)) -> int:
    """Rewrite every lowered int8 per-token site on ``devices`` in place; returns how many were rewritten.

    Only CUDA by default: on CPU the kernel ops' reference quantizes in float64-exact torch anyway, so
    there is nothing to fuse (tests pass ``devices=("cpu",)`` to run the rewritten graph)."""
    count = 0
    for node in list(gm.graph.nodes):
        site = int8_site(node)
        if site is None or node_val(site.x).device.type not in devices:
            continue
        xq, xs, xz = call_before(gm, node, quantize_per_token_ops, (site.x, site.act_fmt), 3)
        replace_with_qcodes(gm, node, site, xq, xs, xz)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
