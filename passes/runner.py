"""The ordered pass list and the runner that logs (and optionally dumps) every pass.

Each pass is ``fn(gm, ctx) -> PassResult``. The runner records per pass: matches, nodes added and
removed, seconds; with ``dump_dir`` it writes the readable graph after each pass
(``NN_<pass>.txt``) and a unified diff against the previous one (``NN_<pass>.diff``).
"""
from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import fx

__all__ = [
    "PASSES",
    "PassContext",
    "PassLogEntry",
    "PassResult",
    "in_scope",
    "pass_pipeline",
    "run_passes",
]


@dataclass
class PassContext:
    """What passes may read: the recipe, the architecture row, calibration results, model config."""

    recipe: object
    arch: object
    config: object
    calibration: object | None = None   # qcompile.calibration.engine.CalibrationResult


@dataclass
class PassResult:
    matches: int
    notes: list[str] = field(default_factory=list)


@dataclass
class PassLogEntry:
    name: str
    matches: int
    nodes_added: int
    nodes_removed: int
    seconds: float
    notes: list[str]

    def line(self) -> str:
        return (f"{self.name:<20} matches={self.matches:<4} +{self.nodes_added:<4} -{self.nodes_removed:<4} "
                f"{self.seconds * 1000:8.1f} ms")


def in_scope(module: str, recipe) -> bool:
    """A linear is quantized unless a ``recipe.skip`` pattern names it (exact, suffix or fnmatch)."""
    import fnmatch

    for pat in recipe.skip:
        if module == pat or module.endswith("." + pat) or fnmatch.fnmatch(module, pat):
            return False
    return True


def pass_pipeline(recipe) -> list[tuple[str, Callable]]:
    """The ordered pass list for a recipe (each entry ``(name, fn)``)."""
    from qcompile.passes.cleanup import cleanup
    from qcompile.passes.fold_scales import fold_scales
    from qcompile.passes.fuse_layernorm import fuse_layernorm
    from qcompile.passes.insert_act_qdq import insert_act_qdq
    from qcompile.passes.keep_salient_fp16 import keep_salient_fp16
    from qcompile.passes.quantize_weights import quantize_weights

    passes = []
    if recipe.fuse_layernorm:
        passes.append(("fuse_layernorm", fuse_layernorm))
    passes.append(("fold_scales", fold_scales))
    if recipe.fp16_ratio > 0:
        passes.append(("keep_salient_fp16", keep_salient_fp16))
    passes += [("quantize_weights", quantize_weights), ("insert_act_qdq", insert_act_qdq), ("cleanup", cleanup)]
    return passes


PASSES = ("fuse_layernorm", "fold_scales", "keep_salient_fp16", "quantize_weights", "insert_act_qdq", "cleanup")


def _graph_text(gm: fx.GraphModule) -> str:
    return str(gm.graph)


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes=None, dump_dir: str | Path | None = None,
               log: Callable[[str], None] | None = None) -> list[PassLogEntry]:
    """Run ``passes`` (default ``pass_pipeline(ctx.recipe)``) in order over ``gm``; returns the log."""
    passes = pass_pipeline(ctx.recipe) if passes is None else passes
    entries: list[PassLogEntry] = []
    dump = Path(dump_dir) if dump_dir is not None else None
    prev_text = _graph_text(gm) if dump else ""
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "00_captured.txt").write_text(prev_text)
    for i, (name, fn) in enumerate(passes, start=1):
        before = {n.name for n in gm.graph.nodes}
        t0 = time.perf_counter()
        result = fn(gm, ctx)
        seconds = time.perf_counter() - t0
        after = {n.name for n in gm.graph.nodes}
        entry = PassLogEntry(name, result.matches, len(after - before), len(before - after), seconds, result.notes)
        entries.append(entry)
        if log:
            log(entry.line())
        if dump:
            text = _graph_text(gm)
            (dump / f"{i:02d}_{name}.txt").write_text(text)
            diff = difflib.unified_diff(prev_text.splitlines(), text.splitlines(), "before", f"after {name}",
                                        lineterm="", n=1)
            (dump / f"{i:02d}_{name}.diff").write_text("\n".join(diff) + "\n")
            prev_text = text
    return entries
