"""backends/onnx/activations.py: in-graph dynamic activation quantization == qcompile.formats, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx_graphs import run_graph

from qcompile import formats as F
from qcompile import ops  # noqa: F401  (registers qcompile::qdq_activation)
from qcompile.backends.onnx.activations import check_activation_format, emit_qdq, emit_quantize_per_token
from qcompile.errors import ExportError

CASES = [("int8", "token"), ("int8_sym", "token"), ("int4", "token"), ("int4", "group16"), ("int8", "group32"),
         ("int4", "vchannel"), ("int8", "vchannel"), ("int6", "token"), ("int3_sym", "group16")]


def activations(b: int = 2, t: int = 9, k: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows of very different ranges, plus the awkward ones: all zero, all positive, all negative, one outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, k, generator=g) * torch.logspace(-3, 2, t)[None, :, None]
    if b * t == 1:
        return x
    x[0, 0] = 0.0
    x[0, 1] = x[0, 1].abs() + 0.1
    x[0, 2] = -x[0, 2].abs()
    x[1, 3, 5] = 1e4
    return x


@pytest.mark.parametrize("fmt,gran", CASES)
@pytest.mark.parametrize("shape", [(2, 9, 64), (1, 1, 64)])
def test_qdq_is_bit_exact(fmt, gran, shape):
    x = activations(*shape)
    ref = torch.ops.qcompile.qdq_activation(x, fmt, gran)
    (out,) = run_graph(lambda ed, v: [emit_qdq(ed, v, x.shape[-1], fmt, gran)], {"x": x.numpy()})
    assert torch.equal(torch.from_numpy(out), ref)


@pytest.mark.parametrize("fmt", ["int8", "int8_sym"])
def test_per_token_codes_are_the_reference_codes(fmt):
    x = activations()
    codes, scale, zp = F.quantize(x, F.FormatSpec.parse(fmt), F.Granularity.parse("token"))
    xq, sx, zx = run_graph(lambda ed, v: list(emit_quantize_per_token(ed, v, 64, fmt)), {"x": x.numpy()})
    assert np.array_equal(xq, codes.numpy())
    assert np.array_equal(sx, scale.reshape(sx.shape).numpy())
    assert np.array_equal(zx, zp.reshape(zx.shape).numpy().astype(np.int32))


@pytest.mark.parametrize("fmt,gran", [("fp4_e2m1", "token"), ("dint8", "token"), ("int8", "channel")])
def test_inexpressible_activation_formats(fmt, gran):
    with pytest.raises(ExportError, match="cannot be exported"):
        check_activation_format(fmt, gran)
