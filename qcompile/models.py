"""Load the models qcompile supports: ``"default"``, a local HF folder, or a ``.gguf`` file.

Supported families are data (``SUPPORTED``, keyed by ``config.model_type``); the per-layer norm →
linears table other stages use is ``ARCHITECTURES`` (defined in ``qcompile.architectures``,
re-exported here so there is one table). Anything else is a ``ModelError`` that lists what is
supported. Models come back in eval mode with ``use_cache`` off (capture and calibration want plain
logits, not KV caches).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qcompile.architectures import ARCHITECTURES, Architecture, ScaleGroup, architecture_of
from qcompile.errors import ModelError

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED",
    "Architecture",
    "Family",
    "ScaleGroup",
    "architecture_of",
    "check_supported",
    "decoder_layers",
    "load_model",
    "load_tokenizer",
    "resolve_source",
]


@dataclass(frozen=True)
class Family:
    """A supported model family: how to describe it and which config values it needs.

    ``requires`` lists ``(config attribute, required value, why)``: configs of the family that the
    ``ARCHITECTURES`` table does not describe (e.g. OPT-350m's post-LayerNorm) are refused clearly.
    """

    model_type: str
    description: str
    requires: tuple[tuple[str, object, str], ...] = ()


SUPPORTED: dict[str, Family] = {
    "opt": Family("opt", "OPT (OPTForCausalLM, pre-LayerNorm)",
                  requires=(("do_layer_norm_before", True,
                             "post-LayerNorm OPT (e.g. opt-350m) has no norm -> linears order to fold"),)),
    "llama": Family("llama", "LLaMA (LlamaForCausalLM, grouped KV heads included)"),
}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _supported_list() -> str:
    return "; ".join(f"{k}: {f.description}" for k, f in SUPPORTED.items())


def check_supported(config) -> Family:
    """The ``Family`` of an HF config; ``ModelError`` listing the supported families otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ModelError(f"model type {model_type!r} is not supported; supported families: {_supported_list()}")
    family = SUPPORTED[model_type]
    for attr, value, why in family.requires:
        if getattr(config, attr, value) != value:
            raise ModelError(f"{model_type} config with {attr}={getattr(config, attr)!r} is not supported "
                             f"({why}); need {attr}={value!r}")
    return family


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder-layer list of a supported model (``ARCHITECTURES[...].layers``)."""
    module = model
    for attr in architecture_of(model.config).layers.split("."):
        module = getattr(module, attr)
    return module


def resolve_source(source: str | Path) -> tuple[Path, str | None]:
    """``(folder, gguf file name or None)`` for ``"default"``, an HF folder or a ``.gguf`` path."""
    if str(source) == "default":
        from qcompile.assets import default_model_dir

        return default_model_dir(), None
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; expected a Hugging Face model folder "
                             "(config.json + weights), a .gguf file, or 'default'")
        return path, None
    raise ModelError(f"model {str(source)!r} not found; expected 'default', a local Hugging Face model folder "
                     "or a path to a .gguf file")


def _check_gguf_deps() -> None:
    for needed in ("gguf", "accelerate"):
        try:
            __import__(needed)
        except ImportError as e:
            raise ModelError(f"loading a .gguf model needs the '{needed}' package: "
                             "`pip install gguf accelerate` (the qcompile[gguf] extra)") from e


def _weight_files(folder: Path) -> list[Path]:
    """The weight files a folder's loader will read; ``ModelError`` naming what is missing or corrupt."""
    present = [folder / n for n in _WEIGHT_FILES if (folder / n).is_file()]
    if not present:
        raise ModelError(f"no weights in {folder}: expected {' or '.join(_WEIGHT_FILES[:3])}; "
                         "for the default model run `qcompile assets fetch`")
    index = present[0]
    if not index.name.endswith(".index.json"):
        files = [index]
    else:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"weight index {index} is unreadable ({e}); re-save or re-fetch the model") from e
        files = [folder / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"weight shard(s) {', '.join(missing)} listed in {index.name} are missing from {folder}")
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
    return files


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                f.get_slice(key)
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ModelError(f"weight file {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                         "re-save it, or for the default model run `qcompile assets fetch`") from e


def load_model(source: str | Path = "default", dtype: torch.dtype = torch.float32, use_cache: bool = False):
    """Load a supported causal LM in eval mode.

    Args:
        source: ``"default"`` (SmolLM2-135M-Instruct from the asset cache), a local HF folder, or a path
            to a ``.gguf`` file (dequantized on load; needs ``gguf`` and ``accelerate``).
        dtype: parameter dtype (float32 by default: the reference everything is compared with).
        use_cache: keep the KV cache on (off by default: capture/calibration/perplexity want logits).

    Raises:
        ModelError: unknown or unsupported model, or missing/corrupt weights (the file is named).
    """
    folder, gguf_file = resolve_source(source)
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file:
        _check_gguf_deps()
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read the model config in {folder / (gguf_file or 'config.json')}: {e}") from e
    check_supported(config)
    if not gguf_file:
        _weight_files(folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load the model weights from {folder}: {e}") from e
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ModelError(f"the weights in {folder} lack {len(missing)} tensor(s) ({shown}); "
                         "the checkpoint is incomplete or for another architecture")
    if gguf_file:  # the dequantized weights are plain tensors; drop the GGUF quantizer bookkeeping
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.config.use_cache = use_cache
    return model.eval()


def load_tokenizer(source: str | Path = "default"):
    """The tokenizer stored with a model (``"default"``, an HF folder, or a ``.gguf`` file)."""
    folder, gguf_file = resolve_source(source)
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file:
        _check_gguf_deps()
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot load a tokenizer from {folder}: {e}") from e
