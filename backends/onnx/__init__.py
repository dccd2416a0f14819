"""ONNX lowering: a quantized graph as an ONNX file for stock onnxruntime (CPU), with a parity check.

    qcompile.export_onnx(qm, "model.onnx")                 # exact: QDQ graph, the reference numerics
    qcompile.export_onnx(qm, "fast.onnx", form="fast")     # MatMulIntegerToFloat / MatMulNBits kernels
    qcompile.onnx_parity(qm, "model.onnx", token_batches)  # logit error and perplexity vs the reference

Modules: ``markers`` (torch.onnx trace with the qcompile:: ops kept as markers), ``weights`` and
``activations`` (formats as exact ONNX), ``lower`` (the exact and fast forms), ``export`` (checks,
atomic write), ``parity``. Importing this package loads nothing heavy; onnx/onnxruntime load on use.
"""
__all__ = ["export_onnx", "export_onnx_forms", "onnx_parity"]


def __getattr__(name: str):
    if name in ("export_onnx", "export_onnx_forms"):
        from qcompile.backends.onnx import export
        return getattr(export, name)
    if name == "onnx_parity":
        from qcompile.backends.onnx.parity import onnx_parity
        return onnx_parity
    raise AttributeError(f"module 'qcompile.backends.onnx' has no attribute {name!r}")
