"""qcompile: a low-bit LLM quantization compiler for PyTorch 2.

    import qcompile
    qm = qcompile.quantize(model, recipe="w4a8v4-rtn-int4", calibration=texts, tokenizer=tok)

``import qcompile`` stays light: transformers, triton, onnx and onnxruntime load only inside the
functions that need them (names below resolve lazily).
"""
from __future__ import annotations

import importlib

from qcompile.formats import FormatSpec, Granularity
from qcompile.recipes import PRESETS, Recipe, RecipeError

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use)
_LAZY = {
    "load_model": "qcompile.models",
    "load_tokenizer": "qcompile.models",
    "perplexity": "qcompile.evaluate",
    "evaluate_tasks": "qcompile.evaluate",
    "capture": "qcompile.capture",
    "quantize": "qcompile.pipeline",
    "save": "qcompile.artifacts",
    "load": "qcompile.artifacts",
    "export_onnx": "qcompile.backends.onnx.export",
    "onnx_parity": "qcompile.backends.onnx.parity",
}

__all__ = ["FormatSpec", "Granularity", "Recipe", "RecipeError", "PRESETS", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
