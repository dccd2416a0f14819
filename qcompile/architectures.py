"""Per-family facts as data: which norm feeds which linears, and which linear feeds which.

Adding a family is adding a row. Names are relative to one decoder layer (``<layers>.<i>.``).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ARCHITECTURES", "SUPPORTED_FAMILIES", "Architecture", "ScaleGroup", "architecture_of"]


@dataclass(frozen=True)
class ScaleGroup:
    """A producer whose output channels feed the input channels of ``consumers``.

    ``kind`` is ``"norm"`` (LayerNorm/RMSNorm weight, and bias if any), or ``"linear"`` (the producer's
    output rows; valid through element-wise ops that commute with a positive per-channel scale:
    ReLU, attention's probability-weighted sum of V, the SwiGLU product gate*up).
    """

    producer: str
    consumers: tuple[str, ...]
    kind: str


@dataclass(frozen=True)
class Architecture:
    family: str
    layers: str                      # attribute path of the decoder-layer list
    groups: tuple[ScaleGroup, ...]   # in execution order within a layer
    v_proj: str                      # the attention Value projection (V quantization site)

    @property
    def linears(self) -> tuple[str, ...]:
        out: list[str] = []
        for g in self.groups:
            out += [c for c in g.consumers if c not in out]
        return tuple(out)


ARCHITECTURES: dict[str, Architecture] = {
    "opt": Architecture(
        family="opt", layers="model.decoder.layers", v_proj="self_attn.v_proj",
        groups=(
            ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "linear"),
            ScaleGroup("final_layer_norm", ("fc1",), "norm"),
            ScaleGroup("fc1", ("fc2",), "linear"),
        )),
    "llama": Architecture(
        family="llama", layers="model.layers", v_proj="self_attn.v_proj",
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm"),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
        )),
}
SUPPORTED_FAMILIES = tuple(ARCHITECTURES)


def architecture_of(config) -> Architecture:
    """The Architecture row for an HF config (``config.model_type``); a clear error otherwise."""
    from qcompile.errors import ModelError

    family = getattr(config, "model_type", None)
    if family not in ARCHITECTURES:
        raise ModelError(f"model family {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)} "
                         "(LLaMA-like configs with grouped KV heads included)")
    return ARCHITECTURES[family]
