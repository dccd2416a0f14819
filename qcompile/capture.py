"""capture: an HF causal LM -> an FX GraphModule via ``torch.export`` (dynamic batch and sequence).

The model is wrapped so the graph takes ``input_ids [B, T]`` and returns ``logits [B, T, V]`` with
``use_cache=False``. Parameters keep their HF names under the ``hf.`` prefix, and every node keeps its
``nn_module_stack``, so passes and recipes address layers by HF module names.
"""
from __future__ import annotations

import contextlib
import time

import torch

from qcompile.architectures import architecture_of
from qcompile.errors import ModelError

__all__ = ["LogitsOnly", "capture"]


class LogitsOnly(torch.nn.Module):
    """``input_ids -> logits`` view of an HF causal LM (no cache, no pytree output)."""

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


def capture(model: torch.nn.Module, example_inputs: torch.Tensor | None = None,
            max_seq_len: int | None = None) -> torch.fx.GraphModule:
    """Export ``model`` (OPT or LLaMA family) to a GraphModule equal to eager.

    Args:
        model: an HF ``*ForCausalLM`` in eval mode.
        example_inputs: ``input_ids`` to trace with; default a ``[2, 16]`` tensor of token ids.
        max_seq_len: upper bound of the dynamic sequence dim (default: the config's max positions).

    Returns:
        The unlifted GraphModule; ``gm.meta["qcompile"]`` holds the family, config and capture time.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"capture needs a Hugging Face causal LM with a .config, got {type(model).__name__}")
    arch = architecture_of(config)
    if example_inputs is None:
        example_inputs = torch.randint(0, min(100, config.vocab_size), (2, 16), device=_device_of(model))
    max_pos = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    max_seq = max(16, min(max_seq_len or max_pos, max_pos))
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    batch = torch.export.Dim("batch", min=1, max=65536)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            try:
                ep = _export(model, example_inputs, batch, seq)
            except Exception:
                # Fused SDPA kernels (CUDA's memory-efficient attention, GQA head broadcasting on
                # torch 2.11) add shape guards that a dynamic sequence length violates; the eager
                # attention (matmul + softmax) traces for every length and gives the same logits.
                if getattr(config, "_attn_implementation", "eager") == "eager":
                    raise
                with _attention(model, "eager"):
                    try:
                        ep = _export(model, example_inputs, batch, seq)
                    except Exception:
                        # torch 2.11's solver also fails to prove some always-true guards of the GQA
                        # reshapes (e.g. min(64*seq, 192*seq) == 64*seq): let export infer the range
                        ep = _export(model, example_inputs, batch, torch.export.Dim.DYNAMIC)
    except Exception as e:
        raise ModelError(f"torch.export could not capture this {arch.family} model: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        model.train(was_training)
    gm = ep.module()
    _annotate_linears(gm)
    gm.meta["qcompile"] = {"family": arch.family, "config": config, "capture_seconds": time.perf_counter() - t0,
                           "max_seq_len": max_seq}
    return gm


def _export(model, example_inputs, batch, seq):
    return torch.export.export(LogitsOnly(model), (example_inputs,), dynamic_shapes=({0: batch, 1: seq},),
                               strict=False)


@contextlib.contextmanager
def _attention(model, implementation: str):
    """Trace ``model`` with another attention implementation, then put the user's back."""
    before = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _annotate_linears(gm) -> None:
    """Name every linear by its HF module once, so passes can swap weights and still find it."""
    from qcompile.passes.graph_utils import SiteInfo, annotate, linear_sites

    for site in linear_sites(gm):
        annotate(site.node, SiteInfo(site.module))


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
