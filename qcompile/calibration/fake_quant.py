"""Module-level fake quantization of an eager decoder layer, from the reference formats.

Used by the calibration engine so each block sees the outputs of the already-quantized blocks before
it, and by tests as an implementation independent of the graph passes (same integer codes -> the
same logits). Only ``qcompile.formats`` maths; no graph.
"""
from __future__ import annotations

import torch

from qcompile import formats as F

__all__ = ["FakeQuantLinear", "QuantizedValue", "fake_quantize_layer", "get_submodule", "set_submodule"]


class FakeQuantLinear(torch.nn.Module):
    """``y = qdq(x[..., rest]) @ dq(codes)^T + x[..., sal] @ W_sal^T + b``.

    Args:
        weight: dequantized weight of the quantized channels ``[N, K_rest]``.
        bias: optional ``[N]``.
        act: ``(FormatSpec, Granularity)`` of the input quantizer, or None.
        rest_idx, sal_idx, sal_weight: salient split (keep_salient_fp16); None when not split.
    """

    def __init__(self, weight, bias=None, act=None, rest_idx=None, sal_idx=None, sal_weight=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.act = act
        self.register_buffer("rest_idx", rest_idx)
        self.register_buffer("sal_idx", sal_idx)
        self.register_buffer("sal_weight", sal_weight)

    def forward(self, x):
        xs = None
        if self.sal_idx is not None:
            xs = x.index_select(-1, self.sal_idx)
            x = x.index_select(-1, self.rest_idx)
        if self.act is not None:
            x = F.fake_quantize(x, *self.act)
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        if xs is not None:
            y = y + torch.nn.functional.linear(xs, self.sal_weight)
        return y


class QuantizedValue(torch.nn.Module):
    """Wraps the V projection: its output is quantized per channel over tokens (W4A8V4)."""

    def __init__(self, inner: torch.nn.Module, fmt: F.FormatSpec):
        super().__init__()
        self.inner = inner
        self.fmt = fmt

    def forward(self, x):
        return F.fake_quantize(self.inner(x), self.fmt, F.Granularity("vchannel"))


def get_submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path)


def set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fake_quantize_layer(layer: torch.nn.Module, arch, recipe, weights: dict, salient: dict | None = None,
                        prefix: str = "") -> None:
    """Replace the in-scope linears of ``layer`` (in place) by ``FakeQuantLinear`` over ``weights``.

    Args:
        weights: relative linear name -> ``(codes, scale, zp)`` on the recipe's weight grid (only the
            non-salient columns when split), or absent to quantize the current weight with RTN.
        salient: relative linear name -> ``(sal_idx, rest_idx)`` for keep_salient_fp16.
        prefix: the layer's module path, so ``recipe.skip`` patterns apply to full names.
    """
    from qcompile.passes.runner import in_scope

    act = (recipe.act_spec, recipe.act_gran) if recipe.act_spec is not None else None
    for name in arch.linears:
        if not in_scope(f"{prefix}.{name}" if prefix else name, recipe):
            continue
        lin = layer.get_submodule(name)
        w = lin.weight.detach()
        sal_idx = rest_idx = sal_w = None
        if salient and name in salient:
            sal_idx, rest_idx = salient[name]
            sal_w, w = w[:, sal_idx], w[:, rest_idx]
        if recipe.weight_spec is not None:
            codes, scale, zp = weights.get(name) or F.quantize(w, recipe.weight_spec, recipe.weight_gran)
            w = F.dequantize(codes, scale, zp, recipe.weight_spec, recipe.weight_gran, dtype=w.dtype)
        bias = None if lin.bias is None else lin.bias.detach()
        set_submodule(layer, name, FakeQuantLinear(w, bias, act, rest_idx, sal_idx, sal_w))
    if recipe.v_spec is not None:
        set_submodule(layer, arch.v_proj, QuantizedValue(layer.get_submodule(arch.v_proj), recipe.v_spec))
