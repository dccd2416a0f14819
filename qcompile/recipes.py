"""Recipes: a frozen, validated description of one quantization scheme.

A recipe says *what* to quantize and how; the pipeline decides the order. Load one by preset name
(``Recipe.from_preset("w4a8v4-rtn-int4")``), from a dict, or from a YAML/JSON file
(``Recipe.load(path)``). Every bad field raises ``RecipeError`` naming the field, the bad value and
what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from qcompile.errors import QcompileError, shown
from qcompile.formats import FormatError, FormatSpec, Granularity

__all__ = ["PRESETS", "Recipe", "RecipeError", "register_preset", "resolve_recipe"]

SCALINGS = ("none", "smoothquant", "awq", "aqas")
ROUNDINGS = ("rtn", "optq")
CRITERIA = ("max", "mean")
CALIB_SOURCES = ("c4", "wiki")


class RecipeError(QcompileError, ValueError):
    """A recipe field has a value that is not allowed."""


def _check(cond: bool, name: str, value, allowed: str) -> None:
    if not cond:
        raise RecipeError(f"recipe field '{name}' = {shown(value)} is not allowed; allowed: {allowed}")


@dataclass(frozen=True)
class Recipe:
    """One quantization scheme (see DESIGN.md "Recipes").

    Formats are ``qcompile.formats`` names (``int4``, ``dint4``, ``fp4_e2m1``, ``int8``...);
    ``None`` leaves that tensor in floating point. Granularities: ``channel``/``group<g>`` for
    weights, ``token``/``group<g>`` for activations; V is always per channel (``vchannel``).

    ``sink_weight``: weight of each calibration window's first token in the Hessian ``X Xᵀ`` that OPTQ and
    the clip search minimise against (1 = an ordinary token). That token becomes the attention sink: its
    input lies in channels ordinary tokens hardly use, so an unweighted Hessian lets OPTQ push rounding
    error there, wrecking the sink's key/value that every later token reads (README "Attention sink").

    ``optq_refit_scale``: after OPTQ, re-solve each channel's scale in closed form for the codes it chose
    (``calibration/scale_refit.py``; per-channel weights). ``optq_refit_rounds`` > 1: OPTQ again on the
    refitted grid and refit again, per channel the best round kept (each round costs one OPTQ pass).

    ``search_sinks``: the token sample of the scale and clip searches always holds every calibration
    window's first token (the attention sink; otherwise it is in the sample at the rate of any token).

    ``rotate``: before anything else, rotate the residual stream and the value heads by seeded orthogonal
    matrices folded into the weights (``qcompile/rotation.py``; LLaMA family): same FP outputs, outlier
    channels spread over all channels, nothing added at run time.
    """

    name: str = "custom"
    weight_format: str | None = "int4"
    weight_granularity: str = "channel"
    act_format: str | None = "int8"
    act_granularity: str = "token"
    v_format: str | None = None
    scaling: str = "none"
    alpha: float = 0.5
    scale_criterion: str = "max"
    scale_grid: int = 20
    clip_search: bool = False
    rounding: str = "rtn"
    optq_damp: float = 0.01
    optq_block_size: int = 128
    optq_act_order: bool = False
    optq_refit_scale: bool = False
    optq_refit_rounds: int = 1
    search_sinks: bool = False
    sink_weight: float = 1.0
    calib_source: str = "c4"
    calib_samples: int = 128
    calib_seq_len: int = 2048
    calib_search_tokens: int = 4096
    fuse_layernorm: bool = False
    rotate: bool = False
    fp16_ratio: float = 0.0
    skip: tuple[str, ...] = ("lm_head",)
    seed: int = 0

    def __post_init__(self):
        _check(isinstance(self.name, str) and self.name != "", "name", self.name, "a non-empty string")
        for fname, value, gname in (("weight_format", self.weight_format, "weight_granularity"),
                                    ("act_format", self.act_format, "act_granularity"),
                                    ("v_format", self.v_format, None)):
            if value is None:
                continue
            try:
                FormatSpec.parse(value)
            except FormatError as e:
                raise RecipeError(f"recipe field '{fname}' = {shown(value)} is not allowed: {e}") from None
        self._check_granularity("weight_granularity", self.weight_granularity, ("channel", "group"))
        self._check_granularity("act_granularity", self.act_granularity, ("token", "group"))
        _check(self.scaling in SCALINGS, "scaling", self.scaling, f"one of {SCALINGS}")
        _check(self.rounding in ROUNDINGS, "rounding", self.rounding, f"one of {ROUNDINGS}")
        _check(self.scale_criterion in CRITERIA, "scale_criterion", self.scale_criterion, f"one of {CRITERIA}")
        _check(_num(self.alpha) and 0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "a number in [0, 1]")
        _check(_int(self.scale_grid) and 2 <= self.scale_grid <= 200, "scale_grid", self.scale_grid,
               "an integer in [2, 200]")
        _check(_num(self.optq_damp) and 0.0 < self.optq_damp <= 1.0, "optq_damp", self.optq_damp,
               "a number in (0, 1]")
        _check(_int(self.optq_block_size) and self.optq_block_size >= 1, "optq_block_size",
               self.optq_block_size, "an integer >= 1")
        _check(_int(self.optq_refit_rounds) and 1 <= self.optq_refit_rounds <= 10, "optq_refit_rounds",
               self.optq_refit_rounds, "an integer in [1, 10]")
        _check(_num(self.sink_weight) and 1.0 <= self.sink_weight <= 1e6, "sink_weight", self.sink_weight,
               "a number in [1, 1e6]")
        _check(self.calib_source in CALIB_SOURCES, "calib_source", self.calib_source, f"one of {CALIB_SOURCES}")
        _check(_int(self.calib_samples) and 1 <= self.calib_samples <= 100_000, "calib_samples",
               self.calib_samples, "an integer in [1, 100000]")
        _check(_int(self.calib_seq_len) and 2 <= self.calib_seq_len <= 32768, "calib_seq_len",
               self.calib_seq_len, "an integer in [2, 32768]")
        _check(_int(self.calib_search_tokens) and 16 <= self.calib_search_tokens <= 1_000_000,
               "calib_search_tokens", self.calib_search_tokens, "an integer in [16, 1000000]")
        _check(_num(self.fp16_ratio) and 0.0 <= self.fp16_ratio < 1.0, "fp16_ratio", self.fp16_ratio,
               "a number in [0, 1)")
        # torch generators take at most 64 bits and the engine seeds layer i with seed + i
        _check(_int(self.seed) and 0 <= self.seed < 2**63, "seed", self.seed, "an integer in [0, 2**63)")
        for fname in ("clip_search", "optq_act_order", "optq_refit_scale", "search_sinks", "fuse_layernorm",
                      "rotate"):
            _check(isinstance(getattr(self, fname), bool), fname, getattr(self, fname), "true or false")
        skip = self.skip
        _check(isinstance(skip, (tuple, list)) and all(isinstance(s, str) for s in skip), "skip", skip,
               "a list of module-name patterns")
        object.__setattr__(self, "skip", tuple(skip))
        if self.weight_format is None and self.act_format is None and self.v_format is None:
            raise RecipeError("recipe quantizes nothing: set at least one of weight_format, act_format, v_format")
        if self.rounding == "optq" and self.weight_format is None:
            raise RecipeError("recipe field 'rounding' = 'optq' needs a weight_format")
        if self.scaling in ("awq", "aqas") and self.weight_format is None:
            raise RecipeError(f"recipe field 'scaling' = {self.scaling!r} searches Q(W s) and needs a weight_format")
        if self.clip_search and self.weight_format is None:
            raise RecipeError("recipe field 'clip_search' = True needs a weight_format")
        if self.fp16_ratio > 0 and (self.rounding != "rtn" or self.clip_search):
            # the salient split keeps FP columns; OPTQ / clipping of the remaining columns is not built
            raise RecipeError(f"recipe field 'fp16_ratio' = {self.fp16_ratio!r} (FP16 salient channels) works "
                              "with rounding 'rtn' and clip_search false only")

    def _check_granularity(self, fname: str, value, kinds: tuple[str, ...]) -> None:
        try:
            gran = Granularity.parse(value)
        except FormatError as e:
            raise RecipeError(f"recipe field '{fname}' = {shown(value)} is not allowed: {e}") from None
        _check(gran.kind in kinds, fname, value, " or ".join(k if k != "group" else "group<g>" for k in kinds))

    # --- views -----------------------------------------------------------------------------------
    @property
    def weight_spec(self) -> FormatSpec | None:
        return FormatSpec.parse(self.weight_format) if self.weight_format else None

    @property
    def act_spec(self) -> FormatSpec | None:
        return FormatSpec.parse(self.act_format) if self.act_format else None

    @property
    def v_spec(self) -> FormatSpec | None:
        return FormatSpec.parse(self.v_format) if self.v_format else None

    @property
    def weight_gran(self) -> Granularity:
        return Granularity.parse(self.weight_granularity)

    @property
    def act_gran(self) -> Granularity:
        return Granularity.parse(self.act_granularity)

    def replace(self, **changes) -> Recipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """Build from a plain dict; unknown keys are an error. A ``preset`` key starts from that preset."""
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        base = cls.from_preset(data.pop("preset")).to_dict() if "preset" in data else {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)  # keys of a YAML file need not be strings
        if unknown:
            raise RecipeError(f"recipe has unknown field(s) {unknown}; known fields: {sorted(known)}")
        base.update(data)
        if isinstance(base.get("skip"), list):
            base["skip"] = tuple(base["skip"])
        try:
            return cls(**base)
        except TypeError as e:  # e.g. unhashable value where a scalar was expected
            raise RecipeError(f"recipe could not be built: {e}") from None

    @classmethod
    def from_preset(cls, name: str) -> Recipe:
        if not isinstance(name, str) or name not in PRESETS:
            raise RecipeError(f"unknown recipe preset {shown(name)}; presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Load a ``.json``, ``.yaml`` or ``.yml`` recipe file."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml
                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # parse errors of either library
            reason = " ".join(str(e).split())  # YAML errors span several lines
            raise RecipeError(f"recipe file {str(path)!r} is not valid {path.suffix[1:] or 'JSON'}: {reason}") from None
        data = data or {}
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
        return cls.from_dict(data)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


PRESETS: dict[str, Recipe] = {}


def register_preset(recipe: Recipe) -> Recipe:
    """Add a named preset (its ``name`` is the key)."""
    PRESETS[recipe.name] = recipe
    return recipe


def resolve_recipe(recipe: Recipe | str | dict | Path) -> Recipe:
    """Accept a Recipe, a preset name, a path to a YAML/JSON file or a dict."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    text = str(recipe)
    if text in PRESETS:
        return PRESETS[text]
    if text.endswith((".json", ".yaml", ".yml")) or Path(text).is_file():
        return Recipe.load(text)
    return Recipe.from_preset(text)


# --- presets (only those whose algorithms exist) -------------------------------------------------
_W4A8V4 = dict(weight_format="int4", act_format="int8", v_format="int4")
for _r in (
    Recipe("w4a8v4-rtn-int4", **_W4A8V4),
    Recipe("w4a8v4-rtn-dint4", **{**_W4A8V4, "weight_format": "dint4"}),
    Recipe("w4a8-rtn-int4", weight_format="int4", act_format="int8"),
    Recipe("w4a8-rtn-dint4", weight_format="dint4", act_format="int8"),
    Recipe("w8a8-rtn", weight_format="int8", act_format="int8"),
    Recipe("w4a16-rtn-int4", weight_format="int4", act_format=None),
    Recipe("w4a16-g64-rtn-int4", weight_format="int4", weight_granularity="group64", act_format=None),
    Recipe("w4a4-g64-rtn", weight_format="int4", weight_granularity="group64", act_format="int4",
           act_granularity="group64"),
    Recipe("w4a4-rtn", weight_format="int4", act_format="int4"),
    # channel saliency (mean |x|) needs few tokens: 16 C4 windows, not the 128 of OPTQ
    Recipe("w4a4-mixed1-rtn", weight_format="int4", act_format="int4", fp16_ratio=0.01, calib_samples=16),
    Recipe("w4a4-mixed10-rtn", weight_format="int4", act_format="int4", fp16_ratio=0.10, calib_samples=16),
):
    register_preset(_r)

# --- calibrated presets: the papers' configurations (examples/reproduce_papers.py measures them) ---------
# Calibration budget shared by all of them (C4 sample, SLAC: 2048-token windows for 2048-token
# perplexity); see README "Calibrated recipes" for what each knob bought on the default model.
_CAL = dict(calib_source="c4", calib_samples=16, calib_seq_len=2048, calib_search_tokens=4096)
_SQ = dict(scaling="smoothquant", alpha=0.5)
_AWQ = dict(scaling="awq", scale_criterion="mean")          # AWQ: mean |x|, activations not quantized
_AQAS = dict(scaling="aqas", scale_criterion="max")         # AQAS: max |x| (its Table 8), A quantized
_OPTQ = dict(rounding="optq", optq_damp=0.01, optq_act_order=True, sink_weight=128.0)  # README "Attention sink"
_W4A4G64 = dict(weight_format="int4", weight_granularity="group64", act_format="int4", act_granularity="group64")
for _r in (
    # AQAS paper Table 3 analogue (W4A8V4: INT4 weights per channel, INT8 tokens, V INT4 per channel)
    Recipe("w4a8v4-optq-int4", **_W4A8V4, **_OPTQ, **_CAL),
    Recipe("w4a8v4-sq-int4", **_W4A8V4, **_SQ, **_CAL),
    Recipe("w4a8v4-sq-optq-int4", **_W4A8V4, **_SQ, **_OPTQ, **_CAL),
    Recipe("w4a8v4-awq-int4", **_W4A8V4, **_AWQ, **_CAL),
    Recipe("w4a8v4-awq-optq-int4", **_W4A8V4, **_AWQ, **_OPTQ, **_CAL),
    Recipe("w4a8v4-aqas-int4", **_W4A8V4, **_AQAS, **_CAL),
    Recipe("w4a8v4-aqas-optq-int4", **_W4A8V4, **_AQAS, **_OPTQ, **_CAL),
    # the main recipe: + the clip search on the (sink-weighted) OPTQ Hessian (README "Attention sink"),
    # calibrated on 64 windows of 512 tokens (same 32K tokens; SLAC measured: 512 beat 2048, README)
    Recipe("w4a8v4-aqas-optq-dint4", **{**_W4A8V4, "weight_format": "dint4"}, **_AQAS, **_OPTQ,
           **{**_CAL, "calib_samples": 64, "calib_seq_len": 512}, clip_search=True),
    # the main recipe on 64-weight groups (+0.25 bits per weight of scales): 20.90 vs 23.18 per channel on
    # the default model (README "What limits the 85 % target"); K must be a multiple of 64
    Recipe("w4a8v4-g64-aqas-optq-dint4", **{**_W4A8V4, "weight_format": "dint4", "weight_granularity": "group64"},
           **_AQAS, **_OPTQ, **{**_CAL, "calib_samples": 64, "calib_seq_len": 512}, clip_search=True),
    # DESIGN.md names (W4A8 without V quantization; W8A8)
    Recipe("w4a8-smoothquant-optq", weight_format="int4", act_format="int8", **_SQ, **_OPTQ, **_CAL),
    Recipe("w4a8-awq-optq", weight_format="int4", act_format="int8", **_AWQ, **_OPTQ, **_CAL),
    Recipe("w4a8-aqas-optq-dint4", weight_format="dint4", act_format="int8", **_AQAS, **_OPTQ, **_CAL),
    Recipe("w8a8-smoothquant", weight_format="int8", act_format="int8", **_SQ, **_CAL),
    # W4A4 paper §2.1: group quantization of weights and activations + AWQ (RTN rounding, as the paper);
    # g64 and g192 divide SmolLM2's K = 576 and 1536, g128 (the paper's) only models with K % 128 == 0
    Recipe("w4a4-g64-awq", **_W4A4G64, **_AWQ, **_CAL),
    Recipe("w4a4-g128-awq", **{**_W4A4G64, "weight_granularity": "group128", "act_granularity": "group128"},
           **_AWQ, **_CAL),
    Recipe("w4a4-awq", weight_format="int4", act_format="int4", **_AWQ, **_CAL),
    # AWQ weight-only (W4A16 g64/g128 with its clipping search)
    Recipe("w4a16-g64-awq", weight_format="int4", weight_granularity="group64", act_format=None, **_AWQ,
           clip_search=True, **_CAL),
    Recipe("w4a16-g128-awq", weight_format="int4", weight_granularity="group128", act_format=None, **_AWQ,
           clip_search=True, **_CAL),
    # W4A4 paper §2.2: FP16 salient channels after SmoothQuant (RTN on the rest)
    Recipe("w4a4-sq", weight_format="int4", act_format="int4", **_SQ, **_CAL),
    Recipe("w4a4-mixed1-sq", weight_format="int4", act_format="int4", fp16_ratio=0.01, **_SQ, **_CAL),
    Recipe("w4a4-mixed10-sq", weight_format="int4", act_format="int4", fp16_ratio=0.10, **_SQ, **_CAL),
):
    register_preset(_r)
del _r
