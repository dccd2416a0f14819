"""The ``lowbit`` torch.compile backend: Triton W4A8 / W4A4 kernels for the quantized linears, Inductor for the rest.

    fast = torch.compile(qm, backend="lowbit")                 # qm from qcompile.quantize (or its module form)
    fast = torch.compile(hf_model, backend="lowbit", options={"recipe": "w4a8-rtn-dint4"})  # RTN on the fly

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so the name works
without importing qcompile first. For each graph dynamo hands over:

1. with ``options["recipe"]``: float linears whose weight is a parameter are quantized round-to-nearest
   (``rtn_graph.quantize_float_linears``; no calibration), to the kernel op where one applies;
2. ``lower.lower_linears`` rewrites the QDQ linears into ``qcompile_triton::`` ops on prepacked weights
   and records a ``LoweringReport`` (``last_report()``; printed with ``options["print_report"]``);
3. with ``options["decode_attention"]`` (on), ``lower_attention.lower_attention`` puts decode-step attention
   on the split-key kernel (``decode_attention_kernel.py``; also for a float model);
   ``share_quant.share_activation_quantization`` lets sibling linears (q/k/v, gate/up) quantize their
   input once; with ``options["swiglu_quant"]`` (off), ``swiglu_quant.fuse_swiglu_quant`` computes
   ``silu(gate) * up`` inside the down projection's activation quantization; with ``options["norm_quant"]``
   (off), ``norm_quant.fuse_norm_quant`` fuses the residual add and RMSNorm into the next quantization; with
   ``options["inductor_quant"]`` (off by default), on CUDA,
   ``inductor_quant.quantize_in_inductor`` writes that quantization as torch ops Inductor fuses into
   the kernel producing the activation; with ``options["l2_prefetch"]`` (off), ``l2_chain.chain_l2_prefetch``
   tells each lowered linear the next one's weights (the decode GEMV prefetches them into L2 as
   ``w4_linear.DISPATCH.l2_prefetch`` says);
4. Inductor compiles the graph (``options["inductor"] = False`` runs it as is, e.g. to debug). ``mode``
   is Inductor's (``"reduce-overhead"`` turns on its CUDA graphs); ``options["inductor_pdl"]`` (on by
   default) turns on its programmatic dependent launches (Hopper).

Without CUDA the kernel ops run their pure-torch integer reference, so the backend also works on CPU.
"""
from __future__ import annotations

import torch

from .inductor_quant import quantize_in_inductor
from .l2_chain import chain_l2_prefetch
from .lower import LoweringReport, lower_linears
from .lower_attention import lower_attention
from .norm_quant import fuse_norm_quant
from .share_quant import share_activation_quantization
from .swiglu_quant import fuse_swiglu_quant

__all__ = ["OPTIONS", "last_report", "lowbit_backend", "reports"]

OPTIONS = {"recipe": None, "inductor": True, "print_report": False, "share_quant": True, "inductor_quant": False,
           "inductor_pdl": True, "decode_attention": True, "l2_prefetch": False, "swiglu_quant": False,
           "norm_quant": False}
_REPORTS: list[LoweringReport] = []


def reports() -> list[LoweringReport]:
    """The lowering reports of every graph compiled by this backend in this process, oldest first."""
    return list(_REPORTS)


def last_report() -> LoweringReport | None:
    """The report of the most recent graph compiled by ``lowbit`` (None before any)."""
    return _REPORTS[-1] if _REPORTS else None


def _check_options(options) -> dict:
    from qcompile.errors import QcompileError

    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise QcompileError(f"lowbit backend: unknown option(s) {unknown}; known options: {sorted(OPTIONS)}")
    return {**OPTIONS, **options}


def lowbit_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """Dynamo backend: quantize (optional) -> lower the quantized linears -> Inductor.

    Args:
        gm: the graph dynamo captured.
        example_inputs: its real inputs (parameters and buffers included).
        mode: Inductor mode (``"reduce-overhead"``, ``"max-autotune"``...), from ``torch.compile(mode=)``.
        options: ``{"recipe": <RTN recipe name / Recipe>, "inductor": bool, "print_report": bool,
            "share_quant": bool, "inductor_quant": bool}`` (``share_quant``: sibling linears of one input
            quantize it once, ``share_quant.py``; on by default, same numbers. ``inductor_quant``: on CUDA,
            the int8 per-token activation quantization becomes torch ops Inductor fuses into the
            producing kernel, ``inductor_quant.py``; off by default: +1 % decode tokens/s on the H200,
            and the codes then follow Inductor's float rounding of the producer, not the reference's).
            ``inductor_pdl`` (on by default): Inductor's ``triton.enable_pdl`` (Hopper): its kernels launch as
            programmatic dependents, so each one's launch overlaps the tail of the kernel before it (the
            decode GEMV lets them go once its weights are read); same outputs. H100, LLaMA-2-7B decode batch
            1: 392.6 -> 411.4 tok/s (FP16 with the same Inductor setting: 168.9 -> 170.0).
            ``decode_attention`` (on by default): decode-step ``scaled_dot_product_attention`` calls (one
            query token over a KV cache) run the split-key Triton kernel of ``decode_attention_kernel.py``
            (``lower_attention.py``; the report lists them). H100, LLaMA-2-7B decode batch 1: 409.7 -> 431.3
            tok/s (2026-12-06); the attention output is within fp32-SDPA rounding, not bitwise SDPA's.
            ``swiglu_quant`` (off by default): a SwiGLU MLP's ``silu(gate) * up`` is computed in the down
            projection's activation quantization kernel (``swiglu_quant.py``): one launch less per layer, but
            slower on the H100 (LLaMA-2-7B decode batch 1: 432.7 -> 404.5 tok/s, 2026-12-06).
            ``norm_quant`` (off by default): at decode, the residual add, LLaMA's RMSNorm and the q/k/v (gate/up)
            activation quantization run as one kernel (``norm_quant.py``): one launch less per norm, but slower
            on the H100 (432.7 -> 424.7 tok/s).
            ``l2_prefetch`` (off by default): each lowered linear gets the next one's weight codes
            (``l2_chain.py``), for the decode GEMV's L2 prefetch (``DISPATCH.l2_prefetch``, also off); same
            outputs; on the H100 it slowed decode (409.7 -> 382.2 tok/s, ``examples/bench_gemv_pieces.py --l2``).

    Returns:
        The compiled callable.
    """
    opts = _check_options(options)
    rtn_sites = []
    if opts["recipe"] is not None:
        from .rtn_graph import quantize_float_linears

        rtn_sites = quantize_float_linears(gm, example_inputs, opts["recipe"])
    report = lower_linears(gm, example_inputs)
    report.sites[:0] = rtn_sites
    report.float_linears -= sum(not s.lowered for s in rtn_sites)  # their fake-quantized weights look float
    if opts["decode_attention"]:
        report.attention = lower_attention(gm)
    if opts["share_quant"]:
        report.shared_groups = share_activation_quantization(gm)
    if opts["swiglu_quant"]:
        report.swiglu_fused = fuse_swiglu_quant(gm)
    if opts["norm_quant"]:
        report.norm_fused = fuse_norm_quant(gm)
    if opts["inductor_quant"] and opts["inductor"]:
        report.inductor_quant = quantize_in_inductor(gm)
    if opts["l2_prefetch"]:
        report.l2_chained = chain_l2_prefetch(gm)
    _REPORTS.append(report)
    if opts["print_report"]:
        print(report.table())
    if not opts["inductor"]:
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode else {}
    if opts["inductor_pdl"] and hasattr(torch._inductor.config.triton, "enable_pdl"):  # older torch: no such setting
        patches["triton.enable_pdl"] = True
    return compile_fx(gm, example_inputs, config_patches=patches)
