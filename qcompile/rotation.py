"""Rotate a LLaMA-family model's residual stream and value heads by orthogonal matrices, outputs unchanged.

Per-channel 4-bit weights lose most where a few input channels carry most of the magnitude: the
scale of every output row is set by its largest columns. An orthogonal change of basis Q of the
residual stream spreads each such channel over all of them (QuaRot, SpinQuant), and because RMSNorm
only divides by ||x|| it commutes with Q once its gain γ has been folded into the linears it feeds:

    residual  x' = x Q           embedding       E' = E Q
    readers   W' = W diag(γ) Q   (q, k, v, gate, up; lm_head with the final norm's γ), norm gain -> 1
    writers   W' = Qᵀ W          (o_proj, down_proj: their outputs land in the rotated residual)
    values    W_v' = Rᵀ W_v per KV head, W_o' = W_o R per query head (R: head_dim x head_dim)

All of it is folded into the weights offline (no op is added to the graph), so every backend runs the
rotated model unchanged; the calibration, the graph passes and the exporters see an ordinary model.
Q is ``H_{2^a} ⊗ O_m`` with random signs for d = 2^a m: a Walsh-Hadamard matrix times a seeded random
orthogonal matrix for the odd factor (pure randomised Hadamard when d is a power of two, the case of
the 7B shapes). The tied ``lm_head`` of the input model is untied in the copy.

OPT is refused: its LayerNorm subtracts the mean, which a rotation does not commute with.
"""
from __future__ import annotations

import copy

import torch

from qcompile.architectures import architecture_of
from qcompile.errors import ModelError

__all__ = ["random_rotation", "rotate_model"]


def _hadamard(n: int) -> torch.Tensor:
    """Sylvester's Walsh-Hadamard matrix of order n (a power of two), entries ±1, float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_rotation(d: int, seed: int = 0) -> torch.Tensor:
    """A seeded orthogonal ``[d, d]`` float64 matrix: diag(±1) (H_{2^a} ⊗ O_m) / sqrt(2^a), d = 2^a m."""
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"rotation size must be a positive integer, got {d!r}")
    g = torch.Generator().manual_seed(seed)
    pow2 = d & -d  # largest power of two dividing d
    m = d // pow2
    if m > 1:  # QR of a Gaussian matrix, signs fixed so the draw is Haar-distributed
        q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        odd = (q * torch.sign(torch.diagonal(r))).contiguous()
    else:
        odd = torch.ones(1, 1, dtype=torch.float64)
    signs = torch.randint(0, 2, (d,), generator=g, dtype=torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(_hadamard(pow2) / pow2 ** 0.5, odd)


def _set(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight = torch.nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.to(linear.bias.dtype), requires_grad=False)


def _read(linear, gamma, q):   # W' = W diag(γ) Q
    _set(linear, (linear.weight.double() * gamma[None, :]) @ q)


def _write(linear, q):         # W' = Qᵀ W, b' = b Q
    b = linear.bias.double() @ q if linear.bias is not None else None
    _set(linear, q.T @ linear.weight.double(), b)


def _unit_gain(norm) -> torch.Tensor:
    gamma = norm.weight.detach().double().clone()
    norm.weight = torch.nn.Parameter(torch.ones_like(norm.weight), requires_grad=False)
    return gamma


def rotate_model(model, seed: int = 0):
    """A rotated copy of an HF LLaMA-family causal LM (the input is not modified); same logits up to
    float rounding. Raises ModelError for families whose norm does not commute with a rotation."""
    arch = architecture_of(model.config)
    if arch.family != "llama":
        raise ModelError(f"recipe field 'rotate' needs RMSNorm (LLaMA family); {arch.family!r} models use "
                         "LayerNorm, whose mean subtraction does not commute with a rotation")
    cfg = model.config
    rotated = copy.deepcopy(model)
    rotated.config.tie_word_embeddings = False
    d = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    q = random_rotation(d, seed)
    r = random_rotation(head_dim, seed + 1)
    with torch.no_grad():
        emb = rotated.get_input_embeddings()
        emb.weight = torch.nn.Parameter((emb.weight.double() @ q).to(emb.weight.dtype), requires_grad=False)
        for layer in rotated.get_submodule(arch.layers):
            attn, mlp = layer.self_attn, layer.mlp
            gamma = _unit_gain(layer.input_layernorm)
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                _read(lin, gamma, q)
            w_v = attn.v_proj.weight.double().reshape(n_kv, head_dim, d)
            b_v = attn.v_proj.bias
            _set(attn.v_proj, torch.einsum("ij,hjd->hid", r.T, w_v).reshape(n_kv * head_dim, d),
                 (b_v.double().reshape(n_kv, head_dim) @ r).reshape(-1) if b_v is not None else None)
            w_o = attn.o_proj.weight.double().reshape(d, n_heads, head_dim)
            _set(attn.o_proj, torch.einsum("dhi,ij->dhj", w_o, r).reshape(d, n_heads * head_dim))
            _write(attn.o_proj, q)
            gamma = _unit_gain(layer.post_attention_layernorm)
            for lin in (mlp.gate_proj, mlp.up_proj):
                _read(lin, gamma, q)
            _write(mlp.down_proj, q)
        head = rotated.get_output_embeddings()
        gamma = _unit_gain(rotated.model.norm)
        w = head.weight.double() * gamma[None, :] @ q
        head.weight = torch.nn.Parameter(w.to(head.weight.dtype), requires_grad=False)
    return rotated
