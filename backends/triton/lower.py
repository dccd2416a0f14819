"""lower_linears: rewrite the reference QDQ linears of an FX graph into the ``qcompile_triton::`` kernel ops.

Pattern (the graph of ``qcompile.quantize``, dynamo's trace of it, or of the module form in
``qmodules.py``; ``linear`` is ``aten.linear`` or ``torch._C._nn.linear``)::

    y = linear(qcompile::qdq_activation(x, act_fmt, act_gran),
               qcompile::dequantize_weight(codes, scale, zp, fmt, gran, K, dtype), bias?)

    -> y = qcompile_triton::w4_linear_codes(x, codes, scale, zp, fmt, gran, K, act_fmt, bias)

which runs ``w4a8_linear`` for int8[_sym] per-token activations, ``w4a4_linear`` for int4[_sym] per
group of the weight's group size (per token with per-channel weights), on the prepacked form of the
*same* codes (``codes_ops.py``: packed on first use, cached per codes tensor, never baked into the
graph, so a compiled graph reused for another module instance reads that instance's weights).

The kernels quantize ``x`` themselves with the same maths as ``qdq_activation`` (bit-exact codes, see
``quantize_kernel.py``) and accumulate exactly in int32, so a lowered site differs from the reference
only by float rounding of the final scaling. Whatever does not match (W4A16, 8-bit or FP4 weights,
group sizes that are not multiples of 64, 4-bit activations per token with group-wise weights, V
quantization...) stays as it is and goes to Inductor; the ``LoweringReport`` says for every quantized
linear which kernel it got or why it fell back.

The codes must be constants: ``get_attr`` tensors, or placeholders whose example input is a module
parameter / buffer (dynamo passes those as static inputs); lowering packs them once (checking them,
and warming the cache). An in-place change of the codes bumps their version: they are packed again.

Invariants: only matched linears (and their dequantize / qdq nodes once dead) are removed; the new
node copies the linear's ``meta`` (``val`` / ``example_value``); the graph is linted and recompiled.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from qcompile import formats as F
from qcompile import ops as _qops  # noqa: F401  (registers the qcompile:: ops)

from .codes_ops import packed_for_codes

__all__ = [
    "LINEAR_TARGETS",
    "LoweringReport",
    "SiteReport",
    "act_plan",
    "erase_if_unused",
    "lower_linears",
    "module_path",
    "site_name",
]

LINEAR_TARGETS = (torch.ops.aten.linear.default, torch._C._nn.linear, torch.nn.functional.linear)
_DEQUANT = torch.ops.qcompile.dequantize_weight.default
_QDQ = torch.ops.qcompile.qdq_activation.default
_KERNEL = torch.ops.qcompile_triton.w4_linear_codes.default
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# ------------------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class SiteReport:
    """One quantized linear: what the lowering did with it."""

    name: str              # module path (or the codes buffer's name)
    kernel: str | None     # "w4a8" | "w4a4" | None (fell back to the reference ops + Inductor)
    reason: str            # why it fell back, or the kernel's configuration
    weight: str            # "dint4 channel"
    act: str               # "int8 token" | "float"
    out_features: int
    in_features: int

    @property
    def lowered(self) -> bool:
        return self.kernel is not None


@dataclass
class LoweringReport:
    """All quantized linears of one graph, in graph order, plus the count of plain float linears."""

    sites: list[SiteReport] = field(default_factory=list)
    float_linears: int = 0
    shared_groups: int = 0  # groups of sibling linears quantizing their common input once (share_quant.py)
    inductor_quant: int = 0  # kernel calls whose activation quantization Inductor computes (inductor_quant.py)
    attention: list = field(default_factory=list)  # lower_attention.AttentionSite per SDPA call, if it ran
    l2_chained: int = 0  # sites told the next site's weights, for the GEMV's L2 prefetch (l2_chain.py)
    swiglu_fused: int = 0  # down projections quantizing silu(gate) * up themselves (swiglu_quant.py)
    norm_fused: int = 0  # RMSNorms (with their residual add) fused into the next quantization (norm_quant.py)

    @property
    def lowered(self) -> list[SiteReport]:
        return [s for s in self.sites if s.lowered]

    @property
    def fell_back(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.lowered]

    def as_dicts(self) -> list[dict]:
        return [dict(name=s.name, lowered=s.lowered, kernel=s.kernel or "", reason=s.reason, weight=s.weight,
                     act=s.act, out_features=s.out_features, in_features=s.in_features) for s in self.sites]

    def summary(self) -> str:
        return (f"{len(self.lowered)} of {len(self.sites)} quantized linears lowered to Triton kernels, "
                f"{len(self.fell_back)} fell back; {self.float_linears} float linears left to Inductor"
                + (f"; {self.shared_groups} groups of sibling linears share one activation quantization"
                   if self.shared_groups else "")
                + (f"; {self.inductor_quant} kernel calls take activation codes quantized by Inductor-fused torch ops"
                   if self.inductor_quant else "")
                + (f"; {sum(a.lowered for a in self.attention)} of {len(self.attention)} attention calls on the "
                   "decode-attention kernel" if self.attention else "")
                + (f"; {self.l2_chained} sites know the next site's weights (L2 prefetch)" if self.l2_chained else "")
                + (f"; {self.swiglu_fused} down projections compute silu(gate) * up in their quantization"
                   if self.swiglu_fused else "")
                + (f"; {self.norm_fused} RMSNorms run inside the next quantization" if self.norm_fused else ""))

    def table(self) -> str:
        """A printable table: site, lowered or fell back, kernel / reason."""
        rows = [("site", "N x K", "weight", "activation", "result")]
        rows += [(s.name, f"{s.out_features}x{s.in_features}", s.weight, s.act,
                  f"lowered: {s.kernel}" if s.lowered else f"fell back: {s.reason}") for s in self.sites]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines += [f"attention {a.name}: "
                  + ("lowered: decode_attention" if a.lowered else f"left to Inductor: {a.reason}")
                  for a in self.attention]
        return "\n".join(lines + [self.summary()])


# ------------------------------------------------------------------------------------------------ matching
def module_path(dynamo_name: str) -> str:
    """``L_self_modules_model_modules_layers_modules_0_modules_q_proj`` (dynamo's placeholder prefix,
    ``L_self_`` or ``L_args_0_``) -> ``model.layers.0.q_proj``."""
    name = re.sub(r"^L_(self|args_\d+|[a-z_]+?)_(modules_)?", "", dynamo_name, count=1)
    return ".".join(name.split("_modules_"))


def _is_op(node, op) -> bool:
    """``node`` calls ``op`` (dynamo records ``torch.ops.ns.op(...)`` as the overload packet)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (op, op.overloadpacket)


def site_name(codes_node: fx.Node) -> str:
    """Readable name of a site from its codes node.

    Graph form (``quantize_weights`` buffers ``_q_<module>_codes``): ``model_layers_0_self_attn_q_proj``;
    module form (dynamo: ``L_self_modules_model_modules_layers_modules_0_..._buffers_codes_``):
    ``model.layers.0.self_attn.q_proj``.
    """
    target = str(codes_node.target)
    if "_buffers_" in target:
        mods, buf = target.rsplit("_buffers_", 1)
        hint = re.sub(r"^_?q_", "", buf.strip("_")).removesuffix("codes").strip("_")
        if hint:
            return hint
        return module_path(mods)
    return re.sub(r"^_?q_", "", target).removesuffix("_codes")


def _linear_args(node: fx.Node):
    """``(x, weight, bias)`` of a linear call in any of its spellings."""
    args = list(node.args) + [None] * (3 - len(node.args))
    x, w, b = args[:3]
    return node.kwargs.get("input", x), node.kwargs.get("weight", w), node.kwargs.get("bias", b)


class _Constants:
    """Real tensors of ``get_attr`` nodes and of static (parameter / buffer) placeholders."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = list(example_inputs) if example_inputs is not None else []
        self.by_node = {n: t for n, t in zip(placeholders, inputs) if isinstance(t, torch.Tensor)}

    def get(self, node) -> torch.Tensor | None:
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            obj = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part, None)
            return obj if isinstance(obj, torch.Tensor) else None
        t = self.by_node.get(node)
        static = isinstance(t, torch.nn.Parameter) or hasattr(t, "_dynamo_static_input_type") or \
            re.search(r"_(buffers|parameters)_", str(node.target)) is not None
        return t if t is not None and static else None


def act_plan(act_fmt: str | None, act_gran: str, w_gran: F.Granularity) -> tuple[str | None, str, str]:
    """``(kernel or None, activation description, reason)`` for the activation side of a site."""
    if act_fmt is None:
        return None, "float", "float activations (W4A16): there is no W4A16 kernel"
    desc = f"{act_fmt} {act_gran}"
    if act_fmt in ("int8", "int8_sym") and act_gran == "token":
        return "w4a8", desc, ""
    same_grid = act_gran == w_gran.name or (act_gran == "token" and w_gran.kind == "channel")
    if act_fmt in ("int4", "int4_sym") and same_grid:
        return "w4a4", desc, ""  # per token = one group of all of K, like a per-channel weight
    return None, desc, (f"activations {desc}: the kernels take int8 per token, or int4 per group of the "
                        f"weight's group size ({w_gran.name})")


def _plan_site(node: fx.Node, consts: _Constants):
    """``(SiteReport, (x, kernel, packed, act_fmt, bias) or None)`` for a linear with a dequantized weight."""
    x, w, bias = _linear_args(node)
    codes_n, scale_n, zp_n, fmt, gran, k, dtype = w.args
    qdq = x if _is_op(x, _QDQ) else None
    w_gran = F.Granularity.parse(gran)
    kernel, act, reason = act_plan(*((str(qdq.args[1]), str(qdq.args[2])) if qdq is not None else (None, "")),
                                   w_gran)
    report = dict(name=site_name(codes_n), weight=f"{fmt} {gran}", act=act, in_features=int(k),
                  out_features=int(getattr(codes_n.meta.get("val", codes_n.meta.get("example_value")), "shape",
                                           [0])[0]))
    tensors = [consts.get(n) for n in (codes_n, scale_n, zp_n)]
    if kernel is not None and any(t is None for t in tensors):
        kernel, reason = None, "weight codes are not constants of the graph (not a parameter or buffer)"
    x_val = qdq.args[0].meta.get("val", qdq.args[0].meta.get("example_value")) if qdq is not None else None
    if kernel is not None and x_val is not None and x_val.dtype != _DTYPES.get(str(dtype)):
        kernel, reason = None, f"activation dtype {x_val.dtype} differs from the weight dtype {dtype}"
    pw = None
    if kernel is not None:
        try:
            pw = packed_for_codes(*tensors, str(fmt), str(gran), int(k))  # validates, and warms the cache
        except (ValueError, TypeError) as e:
            kernel, reason = None, str(e).split(". ")[0]
    if kernel is not None and bias is not None and not isinstance(bias, fx.Node):
        kernel, reason = None, "bias is not a tensor"
    if pw is not None and kernel is not None:
        report["out_features"] = pw.out_features
        reason = f"{pw.fmt}, {'per channel' if pw.group_size == 0 else f'g{pw.group_size}'}, pack_k {pw.pack_k}"
        return SiteReport(kernel=kernel, reason=reason, **report), (qdq.args[0], str(qdq.args[1]), bias)
    return SiteReport(kernel=None, reason=reason, **report), None


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def _rewrite(gm: fx.GraphModule, node: fx.Node, plan) -> None:
    x, act_fmt, bias = plan
    w = _linear_args(node)[1]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(_KERNEL, (x, *w.args[:5], int(w.args[5]), act_fmt, bias))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    erase_if_unused(gm, w)


def erase_if_unused(gm: fx.GraphModule, *nodes) -> None:
    """Erase the given nodes once nothing reads them. (Not ``eliminate_dead_code``: dynamo graphs hold
    in-place method calls, e.g. a KV cache's ``index_copy_``, that FX would wrongly drop as dead.)"""
    for n in nodes:
        if isinstance(n, fx.Node) and n.op == "call_function" and not n.users:
            gm.graph.erase_node(n)


def lower_linears(gm: fx.GraphModule, example_inputs=None) -> LoweringReport:
    """Rewrite every matching quantized linear of ``gm`` in place (see the module docstring).

    Args:
        gm: a GraphModule (``torch.export`` graph or a dynamo graph).
        example_inputs: the real inputs of a dynamo graph, so parameter / buffer placeholders can be read.

    Returns:
        The ``LoweringReport`` of all quantized linears (lowered or not).
    """
    consts = _Constants(gm, example_inputs)
    report = LoweringReport()
    for node in list(gm.graph.nodes):
        if not _is_linear(node):
            continue
        w = _linear_args(node)[1]
        if not _is_op(w, _DEQUANT):
            report.float_linears += 1
            continue
        site, plan = _plan_site(node, consts)
        report.sites.append(site)
        if plan is not None:
            qdq = _linear_args(node)[0]
            _rewrite(gm, node, plan)
            erase_if_unused(gm, qdq)
    gm.graph.lint()
    gm.recompile()
    return report
