"""Reference number formats: the one source of truth for every quantizer in qcompile.

Every kernel, exporter and pass is checked against the functions here on the *same* integer codes.

Formats (``FormatSpec``):
  * ``int{b}``       INT-b asymmetric min-max: ``s = (max - min) / (2^b - 1)``, integer zero-point ``z``.
  * ``int{b}_sym``   INT-b symmetric: ``s = absmax / (2^(b-1) - 1)``, ``z = 2^(b-1)`` (fixed).
  * ``dint{b}``      dINT-b (AQAS paper eqs. 5-6): ``p = 2^b - 3`` uniform steps, ``s = range / p``; codes
                     ``0..p`` are the integer grid, code ``p+1`` (c1) decodes to ``+c`` and ``p+2`` (c2) to
                     ``-c`` with ``c = ratio * s`` (ratio 0.5 by default; 0.25 and 0.125 allowed).
  * ``fp4_e1m2``, ``fp4_e2m1``, ``fp4_e3m0``  FP4 with a per-block scale (``absmax -> largest value``).

Granularities (``Granularity``) say which elements share one ``(scale, zero_point)``; quantization
always reduces over the *last* dimension of a "blocked" view of the tensor:
  * ``tensor``   one pair for the whole tensor;
  * ``channel``  one per output channel of a weight ``[N, K]`` (reduce over K);
  * ``token``    one per token of an activation ``[..., T, K]`` (reduce over K) - same maths as channel;
  * ``group{g}`` one per ``g`` consecutive elements along the reduction dim K (weights and activations);
  * ``vchannel`` one per channel of an activation ``[..., T, C]``, reduced over tokens T (attention V).

Codes are unsigned integers in ``[0, 2^b - 1]`` stored as ``torch.uint8``. Scales keep the blocked
shape ``[..., G, 1]`` so they broadcast against the blocked view; see ``block_shape``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from qcompile.errors import QcompileError, shown

__all__ = [
    "DINT_RATIOS",
    "FP4_GRIDS",
    "FormatError",
    "FormatSpec",
    "Granularity",
    "GridRounder",
    "choose_qparams",
    "code_values",
    "dequantize",
    "dint_table",
    "fake_quantize",
    "pack_int4",
    "quantize",
    "quantize_with_qparams",
    "unpack_int4",
]

DINT_RATIOS = (0.5, 0.25, 0.125)
# Non-negative magnitudes of each FP4 variant (sign is the 4th bit). E1M2: bias 1 with subnormals;
# E2M1: the OCP MX FP4 grid; E3M0: bias 3, powers of two, code 0 is zero.
FP4_GRIDS = {
    "e1m2": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    "e2m1": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
    "e3m0": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
}
_EPS = 1e-8


class FormatError(QcompileError, ValueError):
    """A format or granularity was asked for that does not exist or does not fit the tensor."""


@dataclass(frozen=True)
class FormatSpec:
    """A number format.

    Args:
        kind: ``"int"``, ``"dint"`` or ``"fp4"``.
        bits: code width; 2..8 for int, 3..8 for dint, 4 for fp4.
        symmetric: symmetric range (fixed zero-point) instead of min-max asymmetric.
        dint_ratio: the dINT special value ``c`` as a fraction of the step ``s``.
        fp_variant: ``"e1m2"``, ``"e2m1"`` or ``"e3m0"`` for ``kind="fp4"``.
    """

    kind: str
    bits: int
    symmetric: bool = False
    dint_ratio: float = 0.5
    fp_variant: str = ""

    def __post_init__(self):
        if self.kind not in ("int", "dint", "fp4"):
            raise FormatError(f"format kind {self.kind!r} is unknown; allowed: 'int', 'dint', 'fp4'")
        lo = {"int": 2, "dint": 3, "fp4": 4}[self.kind]
        hi = 4 if self.kind == "fp4" else 8
        if not isinstance(self.bits, int) or not lo <= self.bits <= hi:
            raise FormatError(f"{self.kind} bits={self.bits!r} is not allowed; allowed: {lo}..{hi}")
        if self.kind == "dint" and self.dint_ratio not in DINT_RATIOS:
            raise FormatError(f"dint_ratio={self.dint_ratio!r} is not allowed; allowed: {DINT_RATIOS}")
        if self.kind == "fp4" and self.fp_variant not in FP4_GRIDS:
            raise FormatError(f"fp4 variant {self.fp_variant!r} is unknown; allowed: {sorted(FP4_GRIDS)}")

    @property
    def name(self) -> str:
        """Canonical name, the inverse of ``FormatSpec.parse``."""
        if self.kind == "fp4":
            return f"fp4_{self.fp_variant}"
        name = f"{self.kind}{self.bits}" + ("_sym" if self.symmetric else "")
        if self.kind == "dint" and self.dint_ratio != 0.5:
            name += f"_c{self.dint_ratio:g}"
        return name

    @staticmethod
    def parse(name: str) -> FormatSpec:
        """``"int4"``, ``"int8_sym"``, ``"dint4"``, ``"dint4_c0.25"``, ``"fp4_e2m1"`` -> FormatSpec."""
        if not isinstance(name, str):
            raise FormatError(f"a format name must be a string, got {type(name).__name__}")
        m = re.fullmatch(r"fp4_(e1m2|e2m1|e3m0)", name)
        if m:
            return FormatSpec("fp4", 4, True, fp_variant=m.group(1))
        # ASCII digits only, bounded: int()/float() of what matches can never fail (no "_c.", no 5000 digits)
        m = re.fullmatch(r"(int|dint)([0-9]{1,3})(_sym)?(?:_c([0-9]{1,3}(?:\.[0-9]{0,6})?|\.[0-9]{1,6}))?", name)
        if not m or (m.group(4) and m.group(1) != "dint"):
            raise FormatError(
                f"format {shown(name)} is unknown; allowed: int<b>[_sym], dint<b>[_sym][_c0.25|_c0.125], "
                "fp4_e1m2, fp4_e2m1, fp4_e3m0")
        ratio = float(m.group(4)) if m.group(4) else 0.5
        return FormatSpec(m.group(1), int(m.group(2)), bool(m.group(3)), dint_ratio=ratio)

    @property
    def n_codes(self) -> int:
        return 1 << self.bits

    @property
    def n_steps(self) -> int:
        """Number of uniform steps of the integer grid (``p`` in the paper for dINT)."""
        if self.kind == "dint":
            return (1 << self.bits) - 3
        if self.kind == "int":
            return (1 << self.bits) - 1
        return 0


@dataclass(frozen=True)
class Granularity:
    """Which elements share quantization parameters. ``kind``: tensor|channel|token|group|vchannel."""

    kind: str
    group_size: int = 0

    def __post_init__(self):
        if self.kind not in ("tensor", "channel", "token", "group", "vchannel"):
            raise FormatError(f"granularity {shown(self.kind)} is unknown; allowed: tensor, channel, token, "
                              "group<g>, vchannel")
        if self.kind == "group" and (not isinstance(self.group_size, int) or self.group_size < 2):
            raise FormatError(f"group size {self.group_size!r} is not allowed; use an integer >= 2")

    @property
    def name(self) -> str:
        return f"group{self.group_size}" if self.kind == "group" else self.kind

    @staticmethod
    def parse(name: str) -> Granularity:
        """``"channel"``, ``"token"``, ``"tensor"``, ``"vchannel"``, ``"group64"`` -> Granularity."""
        m = re.fullmatch(r"group([0-9]+)", str(name))
        if m:
            if len(m.group(1)) > 9:  # also keeps int() under Python's digit limit
                raise FormatError(f"group size {m.group(1)[:12]}... is not allowed; use an integer >= 2 that divides K")
            return Granularity("group", int(m.group(1)))
        return Granularity(str(name))


def block_shape(shape: torch.Size, gran: Granularity) -> tuple[int, ...]:
    """Shape of the blocked view whose last dim is reduced (vchannel works on the transposed view)."""
    if gran.kind == "tensor":
        return (1, max(1, int(torch.Size(shape).numel())))
    if gran.kind == "vchannel":
        if len(shape) < 2:
            raise FormatError(f"vchannel quantization needs a [..., T, C] tensor, got shape {tuple(shape)}")
        return (*shape[:-2], shape[-1], 1, shape[-2])
    k = shape[-1]
    g = gran.group_size if gran.kind == "group" else k
    if k % g:
        raise FormatError(f"group size {g} does not divide the reduction dim K={k}; choose a group size "
                          f"that divides {k} (e.g. {_divisors_hint(k)}) or per-channel quantization")
    return (*shape[:-1], k // g, g)


def _divisors_hint(k: int) -> str:
    return ", ".join(str(d) for d in (32, 64, 96, 128, 192, 256) if k % d == 0) or "none of 32..256"


def _to_blocks(x: torch.Tensor, gran: Granularity) -> torch.Tensor:
    shape = block_shape(x.shape, gran)
    if gran.kind == "vchannel":
        x = x.transpose(-1, -2)
    return x.reshape(shape)


def _from_blocks(xb: torch.Tensor, shape: torch.Size, gran: Granularity) -> torch.Tensor:
    if gran.kind == "vchannel":
        return xb.reshape(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2).contiguous()
    return xb.reshape(shape)


def choose_qparams(x: torch.Tensor, fmt: FormatSpec, gran: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max (or abs-max) scale and integer zero-point per block, float32, blocked shape ``[..., G, 1]``.

    The asymmetric range always contains 0 so that 0 is exactly representable (code ``z``).
    """
    xb = _to_blocks(x.detach().float(), gran)
    if fmt.kind == "fp4":
        amax = xb.abs().amax(-1, keepdim=True)
        scale = (amax / FP4_GRIDS[fmt.fp_variant][-1]).clamp_min(_EPS)
        return scale, torch.zeros_like(scale)
    p = fmt.n_steps
    if fmt.symmetric:
        half = p // 2  # int: 2^(b-1)-1 ; dint: (2^b-3)//2
        amax = xb.abs().amax(-1, keepdim=True)
        scale = (amax / half).clamp_min(_EPS)
        zp = torch.full_like(scale, float(half if fmt.kind == "dint" else 1 << (fmt.bits - 1)))
        return scale, zp
    lo = xb.amin(-1, keepdim=True).clamp_max(0.0)
    hi = xb.amax(-1, keepdim=True).clamp_min(0.0)
    scale = ((hi - lo) / p).clamp_min(_EPS)
    zp = torch.round(-lo / scale).clamp(0, p)
    return scale, zp


class GridRounder:
    """Rounds values onto one format's grid with fixed ``scale`` and ``zp`` (any broadcastable shape).

    The one rounding rule of every quantizer here: ``quantize_with_qparams`` uses it on blocked
    views, OPTQ on one column at a time. Per-block constants (dINT thresholds, the FP4 grid) are
    computed once, so rounding many columns with the same qparams costs only the elementwise ops.
    ``codes_and_values`` also returns the dequantized values, bit-identical to ``dequantize`` of
    the codes (same float operations), without decoding them again.
    """

    def __init__(self, fmt: FormatSpec, scale: torch.Tensor, zp: torch.Tensor):
        self.fmt, self.scale, self.zp = fmt, scale, zp
        if fmt.kind == "fp4":
            self.grid = torch.tensor(FP4_GRIDS[fmt.fp_variant], dtype=torch.float32, device=scale.device)
        elif fmt.kind == "int":
            self.top = fmt.n_codes - 1
        else:
            # AQAS eq. 5, with thresholds at the midpoints 0|c and c|s (= s/4 and 3s/4 for c = s/2).
            self.top = fmt.n_steps
            self.c = fmt.dint_ratio * scale
            self.lo, self.hi = self.c / 2, (self.c + scale) / 2
            self.neg_c, self.neg_lo, self.neg_hi = -self.c, -self.lo, -self.hi

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes as float32 (exact small integers), same shape as the broadcast of ``x`` and qparams."""
        return self.codes_and_values(x, values=False)[0]

    def codes_and_values(self, x: torch.Tensor, values: bool = True):
        fmt, scale, zp = self.fmt, self.scale, self.zp
        if fmt.kind == "fp4":
            mag = (x.abs() / scale).unsqueeze(-1)
            idx = (mag - self.grid).abs().argmin(-1)  # nearest magnitude; ties go to the smaller one
            neg = (x < 0) & (idx > 0)  # no negative zero: keeps q(dq(c)) == c
            codes = (idx + 8 * neg.long()).float()
            if not values:
                return codes, None
            g = self.grid[idx]
            return codes, torch.where(neg, -g, g) * scale
        base = torch.clamp(torch.round(x / scale) + zp, 0, self.top)
        if fmt.kind == "int":
            return base, ((base - zp) * scale if values else None)
        pos = (x > self.lo) & (x <= self.hi)
        neg = (x >= self.neg_hi) & (x < self.neg_lo)
        codes = torch.where(pos, self.top + 1.0, torch.where(neg, self.top + 2.0, base))
        if not values:
            return codes, None
        return codes, torch.where(pos, self.c, torch.where(neg, self.neg_c, (base - zp) * scale))


def quantize_with_qparams(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, fmt: FormatSpec,
                          gran: Granularity) -> torch.Tensor:
    """Values -> integer codes (uint8, same shape as ``x``) with given blocked qparams."""
    xb = _to_blocks(x.detach().float(), gran)
    codes = GridRounder(fmt, scale, zp).codes(xb)
    return _from_blocks(codes.to(torch.uint8), x.shape, gran)


def code_values(fmt: FormatSpec, zp: torch.Tensor) -> torch.Tensor:
    """Value of every code in units of the scale, per block: ``[..., G, n_codes]`` (dINT specials +-ratio)."""
    q = torch.arange(fmt.n_codes, dtype=torch.float32, device=zp.device)
    if fmt.kind == "fp4":
        mags = torch.tensor(FP4_GRIDS[fmt.fp_variant], dtype=torch.float32, device=zp.device)
        return torch.cat([mags, -mags]).expand(*zp.shape[:-1], 16)
    vals = q - zp
    if fmt.kind == "dint":
        p = fmt.n_steps
        vals = torch.where(q == p + 1, torch.full_like(vals, fmt.dint_ratio), vals)
        vals = torch.where(q == p + 2, torch.full_like(vals, -fmt.dint_ratio), vals)
    return vals


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, fmt: FormatSpec,
               gran: Granularity, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer codes -> values (AQAS eq. 6 for dINT)."""
    cb = _to_blocks(codes, gran)
    if fmt.kind == "fp4":
        table = code_values(fmt, zp).expand(*cb.shape[:-1], fmt.n_codes)  # [..., G, 16]
        units = torch.gather(table, -1, cb.long())
    else:
        # (q - z), exact in float32; dINT's two special codes decode to +-ratio (eq. 6)
        q = cb.float()
        units = q - zp
        if fmt.kind == "dint":
            p = fmt.n_steps
            units = torch.where(q == p + 1, fmt.dint_ratio, torch.where(q == p + 2, -fmt.dint_ratio, units))
    return _from_blocks(units * scale, codes.shape, gran).to(dtype)


def quantize(x: torch.Tensor, fmt: FormatSpec, gran: Granularity):
    """Returns ``(codes, scale, zero_point)``; ``dequantize(*those, fmt, gran)`` reconstructs ``x``."""
    scale, zp = choose_qparams(x, fmt, gran)
    return quantize_with_qparams(x, scale, zp, fmt, gran), scale, zp


def fake_quantize(x: torch.Tensor, fmt: FormatSpec, gran: Granularity) -> torch.Tensor:
    """Quantize then dequantize, returned in ``x``'s dtype."""
    codes, scale, zp = quantize(x, fmt, gran)
    return dequantize(codes, scale, zp, fmt, gran, dtype=x.dtype)


def dint_table(fmt: FormatSpec, zp: int) -> list[int]:
    """For kernels: each code's value in units of ``s * ratio`` as integers (e.g. ``2(q - z)`` or ``+-1``)."""
    if fmt.kind != "dint":
        raise FormatError(f"dint_table needs a dINT format, got {fmt.name}")
    unit = fmt.dint_ratio
    vals = code_values(fmt, torch.tensor([[float(zp)]]))[0]
    return [int(round(v / unit)) for v in vals.tolist()]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit (or 3-bit) codes two per byte along the last dim: even index in the low nibble.

    An odd last dim is padded with code 0; pass the original size to ``unpack_int4``.
    """
    if codes.dtype != torch.uint8:
        raise FormatError(f"pack_int4 takes uint8 codes, got {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise FormatError("pack_int4 got a code above 15: these are not 4-bit codes")
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: ``[..., ceil(k/2)]`` bytes -> ``[..., k]`` codes."""
    if packed.dtype != torch.uint8:
        raise FormatError(f"unpack_int4 takes uint8 packed codes, got {packed.dtype}")
    if packed.shape[-1] != (k + 1) // 2:
        raise FormatError(f"packed last dim {packed.shape[-1]} does not hold k={k} 4-bit codes")
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :k]
