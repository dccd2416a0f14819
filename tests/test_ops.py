"""qcompile:: custom ops: opcheck, and they equal the reference formats."""
import torch

from qcompile import formats as F
from qcompile import ops


def test_qdq_activation_opcheck_and_reference():
    x = torch.randn(2, 5, 64)
    torch.library.opcheck(torch.ops.qcompile.qdq_activation.default, (x, "int8", "token"))
    y = torch.ops.qcompile.qdq_activation(x, "int4", "group16")
    assert torch.equal(y, F.fake_quantize(x, F.FormatSpec.parse("int4"), F.Granularity.parse("group16")))


def test_dequantize_weight_opcheck_and_reference():
    w = torch.randn(24, 64)
    fmt, gran = F.FormatSpec.parse("dint4"), F.Granularity.parse("group32")
    codes, s, z = F.quantize(w, fmt, gran)
    packed = ops.pack_weight_codes(codes, fmt)
    args = (packed, s, z, "dint4", "group32", 64, "float32")
    torch.library.opcheck(torch.ops.qcompile.dequantize_weight.default, args)
    assert torch.equal(torch.ops.qcompile.dequantize_weight(*args), F.dequantize(codes, s, z, fmt, gran))


def test_ops_survive_export():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.qcompile.qdq_activation(x, "int8", "token") * 2

    ep = torch.export.export(M(), (torch.randn(3, 8),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.qcompile.qdq_activation.default in targets
