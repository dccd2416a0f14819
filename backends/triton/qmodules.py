"""Module form of a quantized model: the HF model (KV cache, ``generate``) with quantized linear modules.

The graph form (``qcompile.quantize``) is captured with ``use_cache=False``, so it cannot decode
token by token. The module form keeps the HF model and replaces each quantized ``nn.Linear`` by a
``QuantizedLinear`` that calls the *same* ``qcompile::`` ops on the *same* codes::

    y = F.linear(qcompile::qdq_activation(x, act_fmt, act_gran),
                 qcompile::dequantize_weight(codes, scale, zp, fmt, gran, K, dtype), bias)
    (V projection: y = qcompile::qdq_activation(y, v_fmt, "vchannel"))

so eager it gives the reference graph's numbers, and under ``torch.compile(..., backend="lowbit")``
dynamo sees the pattern that ``lower.py`` lowers to the Triton kernels.

* ``to_module_form(qm)``: from a ``QuantizedModel`` (any rounding: the graph's codes are reused). The
  graph may only have changed linear weights and biases; recipes whose passes rewrote other tensors
  (layernorm fusion, scales folded into norms) are refused with a clear error.
* ``quantize_linears(model, recipe)``: round-to-nearest straight from an HF model (the same codes as
  ``quantize_weights`` with RTN), for models too large to capture, e.g. the decode benchmark.

V quantization is per channel over the tokens of each call: with a KV cache a decode step quantizes
its new token's V alone, unlike the graph form, which sees the whole sequence at once.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F_nn

from qcompile import formats as F
from qcompile import ops as qops
from qcompile.errors import QcompileError

__all__ = ["ModuleFormError", "QuantizedLinear", "quantize_linears", "to_module_form"]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ModuleFormError(QcompileError):
    """The quantized model cannot be expressed as HF modules with quantized linears."""


class QuantizedLinear(torch.nn.Module):
    """A linear with 4/8-bit weight codes and optional activation / output (V) quantize-dequantize.

    Args:
        codes: weight codes as the graph holds them (two per byte for <= 4 bits: ``[N, ceil(K/2)]``).
        scale, zero_point: blocked ``[N, G, 1]`` qparams.
        fmt, granularity: weight format and granularity names.
        in_features: K. dtype: the dequantized weight's dtype name (``"float16"``...).
        bias: optional ``[N]``.
        act_fmt, act_granularity: input quantizer (None: float activations).
        v_fmt: output quantized per channel over tokens (the attention V), or None.
    """

    def __init__(self, codes, scale, zero_point, fmt: str, granularity: str, in_features: int, dtype: str,
                 bias=None, act_fmt: str | None = None, act_granularity: str = "token", v_fmt: str | None = None):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", bias)
        self.fmt, self.granularity, self.in_features, self.dtype = fmt, granularity, int(in_features), dtype
        self.out_features = codes.shape[0]
        self.act_fmt, self.act_granularity, self.v_fmt = act_fmt, act_granularity, v_fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fmt is not None:
            x = torch.ops.qcompile.qdq_activation(x, self.act_fmt, self.act_granularity)
        w = torch.ops.qcompile.dequantize_weight(self.codes, self.scale, self.zero_point, self.fmt,
                                                 self.granularity, self.in_features, self.dtype)
        y = F_nn.linear(x, w, self.bias)
        if self.v_fmt is not None:
            y = torch.ops.qcompile.qdq_activation(y, self.v_fmt, "vchannel")
        return y

    def extra_repr(self) -> str:
        act = f"{self.act_fmt} {self.act_granularity}" if self.act_fmt else "float"
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={self.fmt} "
                f"{self.granularity}, act={act}" + (f", v={self.v_fmt}" if self.v_fmt else ""))


def _set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _tensor(gm, node):
    from qcompile.passes.graph_utils import get_tensor
    return get_tensor(gm, node.target)


def _graph_sites(qm) -> tuple[dict, dict, set]:
    """``(linears, v_formats, used_attrs)`` read from the graph: per linear module its weight node, input
    node and bias node; per V module its format; every get_attr these account for."""
    from qcompile.passes.graph_utils import annotation, linear_sites

    gm = qm.graph_module
    linears, v_formats, used = {}, {}, set()
    for site in linear_sites(gm):
        info = annotation(site.node)
        if info is not None and (info.role == "salient" or info.fp16_channels):
            raise ModuleFormError(f"{site.module} keeps FP16 input channels (keep_salient_fp16): the module form "
                                  "does not support split linears; use the graph form (qm) or a recipe with "
                                  "fp16_ratio = 0")
        bias = site.node.args[2] if len(site.node.args) > 2 else None
        linears[site.module] = (site.weight, site.node.args[0], bias)
        for n in (site.weight, bias, *getattr(site.weight, "args", ())):
            if getattr(n, "op", None) == "get_attr":
                used.add(n.target)
    for node in gm.graph.nodes:
        info = annotation(node)
        if info is not None and info.role == "v":
            v_formats[info.module] = node.args[1]
    return linears, v_formats, used


def _check_other_attrs(qm, used: set) -> None:
    """Refuse graphs whose passes replaced tensors other than linear weights and biases."""
    gm = qm.graph_module
    foreign = sorted(n.target for n in gm.graph.nodes
                     if n.op == "get_attr" and not n.target.startswith("hf.") and n.target not in used)
    if qm.recipe.fuse_layernorm or foreign:
        what = "layernorm fusion" if qm.recipe.fuse_layernorm else f"rewritten tensors {foreign[:3]}"
        raise ModuleFormError(f"recipe {qm.recipe.name!r} changed more than linear weights ({what}, e.g. scales "
                              "folded into norms): the module form supports recipes whose passes only "
                              "quantize linears; use the graph form (qm) for this one")


def _graph_attr(gm, name: str):
    try:
        return gm.get_submodule("hf").get_parameter(name)
    except AttributeError:
        pass
    try:
        return gm.get_submodule("hf").get_buffer(name)
    except AttributeError:
        return None


def _build_hf_model(qm):
    """The HF model of ``qm.config`` holding the graph's ``hf.*`` tensors (parameters and buffers).

    Tied tensors (embedding = lm_head) are stored once in the graph, under one of their names: every
    name of a tied group gets the tensor found under any of them."""
    import transformers

    gm = qm.graph_module
    model = transformers.AutoModelForCausalLM.from_config(qm.config)
    groups: dict[int, list[tuple[str, bool]]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(t), []).append((name, True))
    for name, t in model.named_buffers(remove_duplicate=False):
        groups.setdefault(id(t), []).append((name, False))
    for names in groups.values():
        found = next((t for t in (_graph_attr(gm, n) for n, _ in names) if t is not None), None)
        if found is None:
            continue  # a linear weight the graph replaced by codes (checked by the caller's sites)
        for name, is_param in names:
            owner_path, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            if is_param:
                owner._parameters[leaf] = torch.nn.Parameter(found.detach(), requires_grad=False)
            else:
                owner._buffers[leaf] = found
    return model.eval()


def to_module_form(qm, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The HF model of ``qm`` with each quantized linear replaced by a ``QuantizedLinear`` on the same codes.

    Args:
        qm: a ``QuantizedModel``.
        model: the HF model ``qm`` was made from (copied, not modified); default: rebuilt from
            ``qm.config`` with the graph's own tensors.

    Returns:
        An HF causal LM (KV cache and ``generate`` work) giving the reference graph's logits.
    """
    linears, v_formats, used = _graph_sites(qm)
    _check_other_attrs(qm, used)
    gm = qm.graph_module
    hf = copy.deepcopy(model).eval() if model is not None else _build_hf_model(qm)
    for name, (w, x, bias) in linears.items():
        b = _tensor(gm, bias) if getattr(bias, "op", None) == "get_attr" else None
        if w.op == "get_attr":  # a float linear: keep it, with the graph's weight
            lin = hf.get_submodule(name)
            lin.weight = torch.nn.Parameter(_tensor(gm, w).detach(), requires_grad=False)
            lin.bias = torch.nn.Parameter(b.detach(), requires_grad=False) if b is not None else None
            continue
        codes, scale, zp = (_tensor(gm, a) for a in w.args[:3])
        is_qdq = getattr(x, "target", None) is torch.ops.qcompile.qdq_activation.default
        act = x.args[1:3] if is_qdq else (None, "token")
        _set_submodule(hf, name, QuantizedLinear(codes, scale, zp, *w.args[3:7], bias=b, act_fmt=act[0],
                                                 act_granularity=act[1], v_fmt=v_formats.get(name)))
    return hf


def quantize_linears(model: torch.nn.Module, recipe, copy_model: bool = True) -> torch.nn.Module:
    """Round-to-nearest module form of an HF model: every in-scope ``nn.Linear`` -> ``QuantizedLinear``.

    Same codes as ``qcompile.quantize`` with an RTN recipe (``formats.quantize`` of each weight), no
    calibration. Recipes with scaling, OPTQ, FP16 protection or layernorm fusion need the graph pipeline.
    """
    from qcompile.architectures import architecture_of
    from qcompile.passes.runner import in_scope
    from qcompile.recipes import resolve_recipe

    recipe = resolve_recipe(recipe)
    if recipe.scaling != "none" or recipe.rounding != "rtn" or recipe.fp16_ratio or recipe.fuse_layernorm:
        raise ModuleFormError(f"quantize_linears does round-to-nearest only; recipe {recipe.name!r} needs "
                              "calibration or graph passes: use qcompile.quantize, then to_module_form")
    fmt, gran = recipe.weight_spec, recipe.weight_gran
    if fmt is None:
        raise ModuleFormError(f"recipe {recipe.name!r} keeps weights in floating point: nothing to quantize")
    v_suffix = "." + architecture_of(model.config).v_proj
    out = copy.deepcopy(model) if copy_model else model
    for name, mod in list(out.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or not in_scope(name, recipe):
            continue
        w = mod.weight.detach()
        codes, scale, zp = F.quantize(w, fmt, gran)
        v_fmt = recipe.v_format if name.endswith(v_suffix) else None
        _set_submodule(out, name, QuantizedLinear(
            qops.pack_weight_codes(codes, fmt), scale, zp, fmt.name, gran.name, w.shape[1], _DTYPE_NAMES[w.dtype],
            bias=None if mod.bias is None else mod.bias.detach(), act_fmt=recipe.act_format,
            act_granularity=recipe.act_granularity, v_fmt=v_fmt))
        del mod.weight
    return out
