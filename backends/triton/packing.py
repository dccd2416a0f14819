"""Offline weight pre-packing for the W4A8 / W4A4 Triton kernels (no triton import here).

A 4-bit weight ``[N, K]`` (dINT4 or INT4 codes from ``qcompile.formats.quantize``, per output channel
or per group ``g`` along K) becomes a ``PackedWeight``: the codes re-ordered so that one program's
weight tile is a single contiguous, 16-byte-vectorisable block, plus three small per-(group, n) tables.

Packed code layout ``qweight: uint8 [C, N, PACK_K // 2]`` (C = ceil(K / PACK_K) chunks of K)::

      chunk c covers k in [c*PACK_K, (c+1)*PACK_K)          HALF = PACK_K // 2
      ┌──────────── qweight[c] : N rows x HALF bytes, contiguous ────────────┐
      │ row n: byte j = (code k=c*PACK_K+HALF+j) << 4 | (code k=c*PACK_K+j)  │
      │        ^^^^^^^^^^ high nibble: 2nd half       ^^^ low nibble: 1st half│
      └──────────────────────────────────────────────────────────────────────┘
      qweight[c+1] follows: a kernel tile (BLOCK_N rows of one chunk) is BLOCK_N*HALF contiguous bytes.

Splitting a chunk into halves (rather than even/odd pairs as ``formats.pack_int4`` does) lets the
kernel unpack both nibble planes of a byte tile with pure bitwise ops and feed each plane to its own
``tl.dot`` against a *contiguous* half of the activation tile: no interleave/reshape in registers.
PACK_K is 128 (per-channel, or groups that are multiples of 128) or 64 (other multiples of 64).
Bytes past K in the last chunk hold code 0; the kernels zero the activations there, so their value
never matters.

Tables, each ``[G, N]`` (G = K // g groups; G = 1 per channel), n fastest:

* ``unit_scale`` fp32: the weight's integer unit, ``s`` (INT) or ``ratio * s`` (dINT, = s/2 by default).
* ``code_sum`` int32: ``T[g, n] = sum_k t[n, k]`` over the group, for the activation zero-point
  correction ``sum_k (x_k - z_x) t_k = sum_k x_k t_k - z_x T``.
* ``zero_byte`` uint8: ``128 - R*z`` with R = 1/ratio (dINT) or 1 (INT): the biased zero the
  unpacker adds. The integer weight value in units of ``unit_scale`` is
  ``t = q - z`` (INT) or ``t = R*(q - z)`` for grid codes ``q <= 13`` and ``+1 / -1`` for the dINT
  specials ``q = 14 / 15`` (AQAS eq. 6; ``formats.dint_table``). |t| <= 104 fits int8.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qcompile import formats as F

__all__ = ["PackedWeight", "pack_k_for", "prepack", "unpack_values", "weight_values"]

DINT_SPECIAL_FIRST = 14  # codes 14 (+c) and 15 (-c) of dINT4 (p = 13 uniform steps)


@functools.lru_cache(maxsize=64)
def _parse_format(name: str) -> F.FormatSpec:
    return F.FormatSpec.parse(name)  # cached: the ops read it on every call (host overhead)


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A pre-packed 4-bit weight, consumed by ``w4a8_linear`` / ``w4a4_linear``.

    Attributes:
        qweight: ``uint8 [C, N, pack_k // 2]`` codes in the chunk-halves layout (module docstring).
        unit_scale: ``float32 [G, N]`` scale of one integer step ``t``.
        code_sum: ``int32 [G, N]`` sum of ``t`` over each group.
        zero_byte: ``uint8 [G, N]`` ``128 - R*z`` (the unpacker's biased zero-point).
        fmt: weight format name (``"dint4"``, ``"int4"``, ``"int4_sym"``, ``"dint4_c0.25"``...).
        group_size: ``g`` along K, or 0 for per-output-channel.
        in_features: K.
        out_features: N.
        pack_k: codes per chunk (64 or 128).
    """

    qweight: torch.Tensor
    unit_scale: torch.Tensor
    code_sum: torch.Tensor
    zero_byte: torch.Tensor
    fmt: str
    group_size: int
    in_features: int
    out_features: int
    pack_k: int

    @property
    def spec(self) -> F.FormatSpec:
        return _parse_format(self.fmt)

    @property
    def dint_r(self) -> int:
        """Integer multiplier R of the grid codes: 1/ratio for dINT, 1 for INT."""
        spec = self.spec
        return round(1 / spec.dint_ratio) if spec.kind == "dint" else 1

    @property
    def n_groups(self) -> int:
        return self.unit_scale.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device) -> PackedWeight:
        """A copy on ``device``."""
        move = {k: getattr(self, k).to(device) for k in ("qweight", "unit_scale", "code_sum", "zero_byte")}
        return PackedWeight(**move, fmt=self.fmt, group_size=self.group_size, in_features=self.in_features,
                            out_features=self.out_features, pack_k=self.pack_k)

    def nbytes(self) -> int:
        """Bytes of all tensors (codes and tables)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.unit_scale, self.code_sum, self.zero_byte))


def pack_k_for(group_size: int) -> int:
    """Codes per chunk: 128 (per-channel, g % 128 == 0) or 64 (other multiples of 64)."""
    if group_size == 0 or group_size % 128 == 0:
        return 128
    if group_size % 64 == 0:
        return 64
    raise ValueError(f"the Triton W4 kernels take per-channel weights or group sizes that are multiples of "
                     f"64 (64, 128, 192, 256...); got group size {group_size}. Use a supported group "
                     "size or leave this linear to the reference backend.")


def _as_spec(fmt) -> F.FormatSpec:
    spec = F.FormatSpec.parse(fmt) if isinstance(fmt, str) else fmt
    if not isinstance(spec, F.FormatSpec) or spec.kind not in ("int", "dint") or spec.bits != 4:
        name = getattr(spec, "name", spec)
        raise ValueError(f"the Triton W4 kernels take 4-bit INT or dINT weights (int4, int4_sym, dint4, "
                         f"dint4_sym, dint4_c0.25, ...); got {name!r}")
    return spec


def _group_size_of(gran, k: int) -> int:
    gran = F.Granularity.parse(gran) if isinstance(gran, str) else gran
    if gran.kind in ("channel", "tensor"):
        return 0
    if gran.kind == "group":
        if k % gran.group_size:
            raise ValueError(f"group size {gran.group_size} does not divide K={k}")
        return 0 if gran.group_size == k else gran.group_size
    raise ValueError(f"weight granularity must be 'channel', 'tensor' or 'group<g>'; got {gran.name!r}")


def _qparam_table(p: torch.Tensor, n: int, g_count: int, what: str) -> torch.Tensor:
    """Blocked ``[N, G, 1]`` (or ``[N, G]``, ``[N]``, ``[1, 1]`` per-tensor) -> float32 ``[N, G]``."""
    p = p.detach().float()
    if p.numel() == 1:
        return p.reshape(1, 1).expand(n, g_count).contiguous()
    if p.numel() != n * g_count:
        raise ValueError(f"{what} has {p.numel()} elements; expected N*G = {n}*{g_count} (blocked shape "
                         f"[N, G, 1] as qcompile.formats.quantize returns)")
    return p.reshape(n, g_count)


def prepack(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, fmt, gran,
            in_features: int | None = None) -> PackedWeight:
    """Pack a quantized weight for the Triton kernels.

    Args:
        codes: ``uint8 [N, K]`` codes (``formats.quantize``), or ``[N, ceil(K/2)]`` bytes from
            ``formats.pack_int4`` / ``qcompile.ops.pack_weight_codes`` when ``in_features`` is given.
        scale: weight scale, blocked ``[N, G, 1]``.
        zp: integer-valued zero-points, blocked ``[N, G, 1]``.
        fmt: ``FormatSpec`` or name; 4-bit INT or dINT.
        gran: ``Granularity`` or name: ``"channel"``, ``"tensor"`` or ``"group<g>"`` with g % 64 == 0.
        in_features: K, when ``codes`` are packed two per byte.

    Returns:
        A ``PackedWeight`` on the device of ``codes``.
    """
    spec = _as_spec(fmt)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"codes must be a uint8 [N, K] tensor; got {getattr(codes, 'dtype', type(codes))} "
                        f"of shape {tuple(getattr(codes, 'shape', ()))}")
    if in_features is not None and codes.shape[1] != in_features:
        codes = F.unpack_int4(codes, in_features)
    n, k = codes.shape
    group_size = _group_size_of(gran, k)
    g_count = k // group_size if group_size else 1
    pack_k = pack_k_for(group_size)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("codes hold a value above 15: these are not 4-bit codes")
    zp_t = _qparam_table(zp, n, g_count, "zero-point")
    if not torch.equal(zp_t, torch.round(zp_t)) or zp_t.min() < 0 or zp_t.max() > spec.n_steps:
        raise ValueError(f"zero-points must be integers in [0, {spec.n_steps}] for {spec.name}")
    scale_t = _qparam_table(scale, n, g_count, "scale")

    t = weight_values(codes, zp_t, spec)  # [N, K] int32
    unit = spec.dint_ratio if spec.kind == "dint" else 1.0
    r = round(1 / unit)
    code_sum = t.reshape(n, g_count, -1).sum(-1, dtype=torch.int32)  # [N, G]
    zero_byte = (128 - r * zp_t).to(torch.uint8)  # in [24, 128]

    c = -(-k // pack_k)
    padded = torch.nn.functional.pad(codes, (0, c * pack_k - k)).reshape(n, c, 2, pack_k // 2)
    qweight = (padded[:, :, 0] | (padded[:, :, 1] << 4)).permute(1, 0, 2).contiguous()  # [C, N, HALF]
    return PackedWeight(
        qweight=qweight, unit_scale=(scale_t * unit).t().contiguous(), code_sum=code_sum.t().contiguous(),
        zero_byte=zero_byte.t().contiguous(), fmt=spec.name, group_size=group_size, in_features=k,
        out_features=n, pack_k=pack_k)


def weight_values(codes: torch.Tensor, zp: torch.Tensor, spec: F.FormatSpec) -> torch.Tensor:
    """Reference ``t`` (int32 ``[N, K]``): each code's value in units of the unit scale, read from
    ``formats.code_values`` with the zero-points ``zp`` (``[N, G]``, G groups along K)."""
    n, k = codes.shape
    g_count = zp.shape[1]
    table = F.code_values(spec, zp.reshape(n, g_count, 1).float())  # [N, G, 16] in units of s
    vals = torch.gather(table, -1, codes.reshape(n, g_count, k // g_count).long())
    unit = spec.dint_ratio if spec.kind == "dint" else 1.0
    return torch.round(vals / unit).to(torch.int32).reshape(n, k)


def unpack_values(pw: PackedWeight) -> torch.Tensor:
    """Inverse of the layout: int32 ``t [N, K]`` from ``qweight`` and ``zero_byte`` (kernel maths, in torch).

    ``t = q + (zero_byte - 128)`` for INT; for dINT ``R*q + (zero_byte - 128)`` when ``q < 14``, else
    ``29 - 2q`` (= +1 for code 14, -1 for code 15).
    """
    c, n, half = pw.qweight.shape
    b = pw.qweight.to(torch.int32)
    q = torch.stack([b & 15, b >> 4], dim=2).permute(1, 0, 2, 3).reshape(n, c * 2 * half)[:, :pw.in_features]
    g = pw.group_size or pw.in_features
    zoff = (pw.zero_byte.t().to(torch.int32) - 128).repeat_interleave(g, dim=1)  # [N, K]
    if pw.spec.kind == "dint":
        return torch.where(q < DINT_SPECIAL_FIRST, pw.dint_r * q + zoff, 29 - 2 * q)
    return q + zoff
