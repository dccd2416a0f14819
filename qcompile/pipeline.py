"""quantize(): capture -> calibrate -> passes, one short function per stage.

    qm = qcompile.quantize(model, "w4a8v4-rtn-int4")
    logits = qm(input_ids)          # reference numerics (PyTorch QDQ ops)
"""
from __future__ import annotations

import time

import torch

from qcompile.architectures import architecture_of
from qcompile.errors import CalibrationError, ModelError
from qcompile.recipes import Recipe, RecipeError, resolve_recipe

__all__ = ["QuantizedModel", "check_model", "prepare_model", "quantize", "run_pipeline_passes"]


class QuantizedModel(torch.nn.Module):
    """A quantized causal LM: ``input_ids [B, T] -> logits [B, T, V]`` through the rewritten graph.

    Attributes:
        graph_module: the FX GraphModule holding codes, qparams and ``qcompile::`` QDQ ops.
        recipe: the Recipe used; ``pass_log``: per-pass log entries; ``calibration``: the
        CalibrationResult (or None); ``seconds``: wall time per stage; ``config``: the HF config.
    """

    def __init__(self, graph_module, recipe: Recipe, config, pass_log, calibration=None, seconds=None):
        super().__init__()
        self.graph_module = graph_module
        self.recipe = recipe
        self.config = config
        self.pass_log = pass_log
        self.calibration = calibration
        self.seconds = dict(seconds or {})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.graph_module(input_ids)

    def quantized_sites(self) -> list:
        """``SiteInfo`` of every quantized linear / V site, in graph order."""
        from qcompile.passes.graph_utils import QMETA
        infos = (n.meta.get(QMETA) for n in self.graph_module.graph.nodes)
        return [i for i in infos if i is not None and (i.weight_format or i.act_format)]


def check_model(model, recipe: Recipe | None = None) -> None:
    """Refuse, before any slow work, what would fail later: an unsupported model, NaN/Inf weights and,
    given a recipe, a group size that does not divide the input size K of a linear it quantizes."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ModelError(f"qcompile.quantize needs a Hugging Face causal LM, got {type(model).__name__}")
    architecture_of(cfg)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ModelError(f"model parameter {name} contains NaN or Inf values; the checkpoint is corrupt")
    if recipe is not None:
        _check_group_sizes(model, recipe)


def _check_group_sizes(model, recipe: Recipe) -> None:
    from qcompile.formats import _divisors_hint
    from qcompile.passes.keep_salient_fp16 import salient_channels
    from qcompile.passes.runner import in_scope

    grids = (("weight_granularity", recipe.weight_gran, recipe.weight_format),
             ("act_granularity", recipe.act_gran, recipe.act_format))
    groups = [(f, gran.group_size) for f, gran, fmt in grids if fmt is not None and gran.kind == "group"]
    for name, module in model.named_modules() if groups else ():
        if not isinstance(module, torch.nn.Linear) or not in_scope(name, recipe):
            continue
        k = module.in_features  # minus the FP16-kept channels, which are cut out before quantization
        k = salient_channels(torch.zeros(k), recipe.fp16_ratio)[1].numel() if recipe.fp16_ratio > 0 else k
        for field, g in groups:
            if k % g:
                raise RecipeError(f"recipe field '{field}' = 'group{g}' does not fit {name}: {g} does not divide "
                                  f"its quantized input size K={k}; use a group size that divides it "
                                  f"(e.g. {_divisors_hint(k)}) or per-{'channel' if field[0] == 'w' else 'token'}")


def prepare_model(model, recipe):
    """The model the recipe quantizes: a rotated copy when ``recipe.rotate`` (``qcompile.rotation``), else
    ``model`` itself. Deterministic (seeded by ``recipe.seed``): calling it twice gives equal weights."""
    recipe = resolve_recipe(recipe)
    if not recipe.rotate:
        return model
    from qcompile.rotation import rotate_model
    return rotate_model(model, recipe.seed)


def _context(recipe, config, calibration=None):
    from qcompile.passes.runner import PassContext
    return PassContext(recipe=recipe, arch=architecture_of(config), config=config, calibration=calibration)


def run_pipeline_passes(gm, recipe, config, calibration=None, dump_dir=None, log=None):
    """Run the recipe's ordered pass list over a captured graph (see ``qcompile.passes.runner``)."""
    from qcompile.passes.runner import run_passes
    return run_passes(gm, _context(recipe, config, calibration), dump_dir=dump_dir, log=log)


def quantize(model, recipe="w4a8v4-rtn-int4", calibration=None, tokenizer=None, *, progress: bool = True,
             dump_dir=None, log=None, device=None, captured=None, placement=None) -> QuantizedModel:
    """Quantize an HF OPT/LLaMA causal LM with a recipe.

    Args:
        model: HF ``*ForCausalLM`` (not modified).
        recipe: a Recipe, preset name, dict, or path to a YAML/JSON recipe.
        calibration: text (str or list of str) or token ids ``[n, T]``; needed by recipes with scaling,
            OPTQ, clipping or FP16 protection. Windows: ``recipe.calib_samples x recipe.calib_seq_len``.
        tokenizer: tokenizes text calibration data.
        dump_dir: write the graph after every pass and a diff per pass there.
        captured: a fresh ``capture(prepare_model(model, recipe))`` graph to rewrite instead of capturing
            again (it is modified).
        placement: calibration placement (``qcompile.calibration.offload.Offload``, or
            ``qcompile.calibration.distributed.init_from_env()`` under torchrun); None: in memory.
    """
    from qcompile.calibration.engine import calibrate, calibration_batches, needs_calibration
    from qcompile.capture import capture

    recipe = resolve_recipe(recipe)
    check_model(model, recipe)
    seconds, result = {}, None
    if recipe.rotate:
        t = time.perf_counter()
        model = prepare_model(model, recipe)
        seconds["rotate"] = time.perf_counter() - t
    if needs_calibration(recipe):
        if calibration is None:
            raise CalibrationError(f"recipe {recipe.name!r} (scaling={recipe.scaling}, rounding={recipe.rounding}, "
                                   f"fp16_ratio={recipe.fp16_ratio}) needs calibration data: pass calibration=")
        t = time.perf_counter()
        batches = calibration_batches(calibration, tokenizer, recipe.calib_samples, recipe.calib_seq_len, recipe.seed)
        result = calibrate(model, recipe, batches, progress=progress, device=device, placement=placement)
        seconds["calibrate"] = time.perf_counter() - t
    t = time.perf_counter()
    gm = capture(model) if captured is None else captured
    seconds["capture"] = time.perf_counter() - t
    t = time.perf_counter()
    log_entries = run_pipeline_passes(gm, recipe, model.config, result, dump_dir=dump_dir, log=log)
    seconds["passes"] = time.perf_counter() - t
    return QuantizedModel(gm, recipe, model.config, log_entries, result, seconds)
