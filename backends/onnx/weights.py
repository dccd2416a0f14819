"""Weight codes of a ``qcompile.DequantizeWeight`` marker -> ONNX initializers, exactly.

Every weight value is ``v(code) * s`` (``qcompile.formats.code_values``). Each form below stores
integers whose value times an ONNX scale is that same product, so ``DequantizeLinear`` reproduces the
reference bit for bit (a float32 multiply of the same exact operands):

* INT-b (asymmetric or symmetric): the codes themselves, ``uint4`` (b <= 4) or ``uint8``, with the
  integer zero-point ``z`` of the same type: ``(q - z) * s``;
* dINT-b: ``v / ratio`` as int8 (``2(q - z)`` or ``+-1`` for ratio 0.5, see ``formats.dint_table``) with
  the scale ``s * ratio``; int16 when the values do not fit int8 (wide dINT);
* FP4: the grid times 2 (E2M1: 0, 1, 2, 3, 4, 6, 8, 12) or 4 (E1M2, E3M0) as int8, scale ``s/2`` or
  ``s/4``. FLOAT4E2M1 (opset 23) is not used: onnxruntime 1.32's CPU provider has no kernel for
  ``DequantizeLinear`` or ``Cast`` on it (measured), and the int8 form is as exact and runs.

Multiplying the scale by a power of two is exact in float32 (scales are >= 1e-8, far from subnormal).
Per-channel qparams become per-axis (``axis=0``, scale ``[N]``); group g becomes blocked
quantization (``axis=1, block_size=g``, scale ``[N, K/g]``, opset >= 21).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qcompile import formats as F

__all__ = [
    "WeightCodes",
    "dequantize_linear_form",
    "integer_matrix",
    "integer_values",
    "nbits_blocks",
    "weight_codes",
]

_UNITS = (1.0, 0.5, 0.25, 0.125)


@dataclass(frozen=True)
class WeightCodes:
    """One quantized weight ``[N, K]``: codes, blocked qparams ``[N, G]`` and its format."""

    codes: np.ndarray   # [N, K] uint8, unpacked
    scale: np.ndarray   # [N, G] float32
    zp: np.ndarray      # [N, G] float32, integer-valued
    fmt: F.FormatSpec
    gran: F.Granularity

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def group_size(self) -> int:
        return self.gran.group_size if self.gran.kind == "group" else self.codes.shape[1]


def weight_codes(codes_packed: np.ndarray, scale: np.ndarray, zp: np.ndarray, fmt: str, granularity: str,
                 in_features: int) -> WeightCodes:
    """Read a ``DequantizeWeight`` marker's constant inputs (packed codes, ``[N, G, 1]`` qparams)."""
    spec, gran = F.FormatSpec.parse(fmt), F.Granularity.parse(granularity)
    packed = torch.from_numpy(np.array(codes_packed, dtype=np.uint8))  # a writable copy
    codes = F.unpack_int4(packed, in_features) if spec.bits <= 4 else packed
    n = codes.shape[0]
    return WeightCodes(codes.numpy(), scale.reshape(n, -1).astype(np.float32), zp.reshape(n, -1).astype(np.float32),
                       spec, gran)


def integer_values(w: WeightCodes) -> tuple[np.ndarray, float]:
    """``(values [N, K] int32, unit)`` with ``values * unit * scale`` = the reference weight, exactly."""
    table = F.code_values(w.fmt, torch.from_numpy(w.zp).unsqueeze(-1)).numpy()  # [N, G, n_codes]
    unit = next(u for u in _UNITS if np.all(np.mod(table / u, 1.0) == 0.0))  # FP4 grids: 0.5 or 0.25
    n, k = w.shape
    blocks = w.codes.reshape(n, -1, w.group_size).astype(np.int64)  # [N, G, g]
    vals = np.take_along_axis(table, blocks, axis=-1) / unit
    return vals.reshape(n, k).astype(np.int32), unit


@dataclass(frozen=True)
class DequantizeLinearForm:
    """Initializers and attributes of one ``DequantizeLinear`` that yields the ``[N, K]`` weight."""

    values: np.ndarray            # integer codes, numpy dtype of the ONNX type (uint4 via ml_dtypes)
    scale: np.ndarray             # [N] (per-axis) or [N, G] (blocked), float32
    zero_point: np.ndarray | None
    attributes: dict


def dequantize_linear_form(w: WeightCodes) -> DequantizeLinearForm:
    """The exact ``DequantizeLinear`` for a weight (see the module docstring for each format)."""
    import ml_dtypes

    if w.fmt.kind == "int":
        container = ml_dtypes.uint4 if w.fmt.bits <= 4 else np.uint8
        values, zp, scale = w.codes.astype(container), w.zp.astype(container), w.scale
    else:
        ints, unit = integer_values(w)
        container = np.int8 if np.abs(ints).max(initial=0) <= 127 else np.int16
        values, zp, scale = ints.astype(container), None, (w.scale * np.float32(unit)).astype(np.float32)
    if w.gran.kind == "channel":
        attrs = {"axis": 0}
        scale, zp = scale[:, 0], (zp[:, 0] if zp is not None else None)
    else:
        attrs = {"axis": 1, "block_size": w.group_size}
    return DequantizeLinearForm(values, np.ascontiguousarray(scale), zp, attrs)


@dataclass(frozen=True)
class IntegerMatrix:
    """``W^T`` for ``MatMulInteger``: ``y = s_x * w_scale * (x_q @ (b - b_zp) - z_x * colsum)``."""

    b: np.ndarray                 # [K, N] int8
    b_zero_point: np.ndarray | None  # [N] int8
    w_scale: np.ndarray           # [N] float32
    colsum: np.ndarray            # [N] int32: sum_k (b - b_zp)


def integer_matrix(w: WeightCodes) -> IntegerMatrix | None:
    """Per-channel weights as int8 for an integer GEMM, or None when the format does not fit.

    Small integer values (INT <= 7 bits: ``q - z``; dINT; FP4) are stored as such, no zero-point: their
    magnitude stays <= 64, so MLAS's u8s8 kernels cannot saturate even without VNNI. INT8 stores
    ``q - 128`` with zero-point ``z - 128`` (full int8 range: exact with VNNI; AVX2-only CPUs may saturate
    in ``vpmaddubsw``, an MLAS property).
    """
    if w.gran.kind != "channel":
        return None
    ints, unit = integer_values(w)
    if np.abs(ints).max(initial=0) <= 64:
        b, bzp = ints.astype(np.int8), None
        colsum = ints.sum(axis=1, dtype=np.int64)
    elif w.fmt.kind == "int" and w.fmt.bits == 8:
        b = (w.codes.astype(np.int16) - 128).astype(np.int8)
        bzp = (w.zp[:, 0].astype(np.int16) - 128).astype(np.int8)
        colsum = ints.sum(axis=1, dtype=np.int64)
    else:
        return None
    scale = (w.scale[:, 0] * np.float32(unit)).astype(np.float32)
    return IntegerMatrix(np.ascontiguousarray(b.T), bzp, scale, colsum.astype(np.int32))


@dataclass(frozen=True)
class NBitsBlocks:
    """Inputs and attributes of ``com.microsoft::MatMulNBits`` (bits=4) for one weight."""

    b: np.ndarray            # [N, n_blocks, block_size/2] uint8, two codes per byte (low nibble first)
    scales: np.ndarray       # [N * n_blocks] float32
    zero_points: np.ndarray  # [N * ceil(n_blocks/2)] uint8, two per byte
    block_size: int


def nbits_blocks(w: WeightCodes) -> NBitsBlocks | None:
    """INT (<= 4 bit) weights as MatMulNBits blocks, exact; None for other formats or group sizes.

    MatMulNBits wants a power-of-two block of 16..256 codes sharing one (scale, zero-point). A group g
    maps one to one; per-channel qparams are repeated over blocks of 32..128 (the same weight values).
    """
    if w.fmt.kind != "int" or w.fmt.bits > 4:
        return None
    n, k = w.shape
    if w.gran.kind == "group":
        bs = w.group_size
        if bs not in (16, 32, 64, 128, 256):
            return None
        scale, zp = w.scale, w.zp
    else:
        bs = next((b for b in (128, 64, 32) if k % b == 0), 32)
        reps = -(-k // bs)
        scale, zp = np.repeat(w.scale, reps, axis=1), np.repeat(w.zp, reps, axis=1)
    nb = -(-k // bs)
    codes = np.zeros((n, nb * bs), np.uint8)
    codes[:, :k] = w.codes
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, nb, bs // 2)
    zpi = np.zeros((n, nb + nb % 2), np.uint8)
    zpi[:, :nb] = zp.astype(np.uint8)
    zpp = zpi[:, 0::2] | (zpi[:, 1::2] << 4)
    return NBitsBlocks(packed, scale.astype(np.float32).reshape(-1), zpp.reshape(-1), bs)
