"""``onnx_parity``: run an exported model under onnxruntime and the reference on the same tokens.

    report = qcompile.onnx_parity(qm, "model.onnx", batches, threads=1)
    report["max_abs_logit_error"], report["ppl_reference"], report["ppl_onnx"]

Perplexity is exp(mean next-token NLL) over every position of every batch (the same tokens for both).

The reference runs its attention with PyTorch's SDPA "math" kernel by default (``attention="math"``):
the exporter writes attention as MatMul -> Softmax -> MatMul, the math kernel's formula, while PyTorch's
default CPU kernel (flash-style, blocked online softmax) sums in another order. Both are float32 and
neither is "the" quantized reference, but with 4-bit V the last-bit differences flip activation codes and
compound over the layers (SmolLM2 W4A8V4 RTN: the two PyTorch kernels differ by 0.33 % in perplexity), so
comparing onnxruntime with the same formula isolates what the export itself changes.
``attention="default"`` compares with PyTorch's default kernel choice instead.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch

from qcompile.errors import ExportError

ATTENTION = ("math", "default")

__all__ = ["onnx_parity", "ort_session"]


def ort_session(path, threads: int = 1, qdq_accuracy_level: int | None = 1):
    """An onnxruntime CPU session with ``threads`` intra-op threads (inter-op 1, sequential).

    Args:
        qdq_accuracy_level: onnxruntime fuses ``DequantizeLinear(int4 weight) + MatMul`` of an exact-form
            graph into ``MatMulNBits`` and, by default, gives it ``accuracy_level=4`` (it re-quantizes the
            activations to int8 per block: not the reference). 1 (fp32) keeps the exact form exact;
            ``None`` leaves onnxruntime's default. Fast-form nodes carry their own level.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if qdq_accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int(qdq_accuracy_level)))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _as_batches(batches) -> list[torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        batches = [batches] if batches.dim() == 2 else list(batches)
    out = []
    for b in batches:
        b = torch.as_tensor(b)
        if b.dim() == 1:
            b = b.unsqueeze(0)
        if b.dim() != 2 or b.shape[1] < 2 or b.dtype.is_floating_point:
            raise ExportError(f"parity batches must be integer token ids [B, T] with T >= 2, got {tuple(b.shape)} "
                              f"{b.dtype}")
        out.append(b.long())
    if not out:
        raise ExportError("onnx_parity needs at least one batch of token ids")
    return out


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return float(-logp.gather(-1, ids[:, 1:, None]).sum())


def _reference_attention(attention: str):
    """The SDPA kernel context the reference runs in."""
    if attention == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def onnx_parity(qm, path, batches, threads: int = 1, qdq_accuracy_level: int | None = 1,
                attention: str = "math") -> dict:
    """Compare onnxruntime on ``path`` with ``qm`` (reference numerics) on token ``batches``.

    Args:
        qm: the QuantizedModel that was exported.
        path: the exported ``.onnx`` file.
        batches: token ids, ``[B, T]`` tensor or a list of them.
        threads: onnxruntime and torch intra-op threads.
        qdq_accuracy_level: see ``ort_session``.
        attention: the reference's SDPA kernel, "math" (the exported formula) or "default" (module docstring).

    Returns:
        ``max_abs_logit_error``, ``mean_abs_logit_error``, ``ppl_reference``, ``ppl_onnx``,
        ``ppl_rel_diff`` (onnx / reference - 1), ``tokens`` (predicted positions), ``batches``,
        ``reference_attention``.
    """
    if attention not in ATTENTION:
        raise ExportError(f"attention must be one of {ATTENTION} (the reference's SDPA kernel), not {attention!r}")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {str(path)!r} does not exist; export it first with qcompile.export_onnx")
    session = ort_session(path, threads, qdq_accuracy_level)
    batches = _as_batches(batches)
    max_err, abs_sum, n_logits, nll_ref, nll_ort, tokens = 0.0, 0.0, 0, 0.0, 0.0, 0
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        for ids in batches:
            with torch.no_grad(), _reference_attention(attention):
                ref = qm(ids).float()
            out = torch.from_numpy(session.run(None, {"input_ids": ids.numpy().astype(np.int64)})[0]).float()
            diff = (out - ref).abs()
            max_err = max(max_err, float(diff.max()))
            abs_sum += float(diff.double().sum())
            n_logits += diff.numel()
            nll_ref += _nll_sum(ref, ids)
            nll_ort += _nll_sum(out, ids)
            tokens += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        torch.set_num_threads(torch_threads)
    ppl_ref, ppl_ort = math.exp(nll_ref / tokens), math.exp(nll_ort / tokens)
    return {"max_abs_logit_error": max_err, "mean_abs_logit_error": abs_sum / n_logits,
            "ppl_reference": ppl_ref, "ppl_onnx": ppl_ort, "ppl_rel_diff": ppl_ort / ppl_ref - 1.0,
            "tokens": tokens, "batches": len(batches), "reference_attention": attention}
