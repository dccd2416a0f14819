"""Determinism: the same model, recipe, calibration data and seed give bit-identical codes and scales.

``run_all`` quantizes a tiny GQA-LLaMA with an RTN, a calibrated (AQAS) and a calibrated + OPTQ recipe
and hashes every tensor the quantized graph reads (packed codes, scales, zero-points, FP weights) and
the calibration's folded scales; it also saves the AQAS+OPTQ model and hashes the artifact's files. The
test runs it here and in a fresh Python process with another hash seed, another global torch RNG
state and the recipes in reverse order: every hash must match. Saved artifacts reload to the same
hash, and the seed is really used (another seed, other calibration windows, other codes).

Scope (see examples/results/promises.md): one machine, one torch version, one device type and thread
count. CPU and CUDA calibrations may differ by an ulp in scales (torch divides by a scalar through
the reciprocal on CUDA), hence in codes.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, word_text, word_tokenizer

import qcompile
from qcompile.recipes import resolve_recipe

_CALIB = {"calib_samples": 4, "calib_seq_len": 32}
RECIPES = {
    "rtn": {"preset": "w4a8v4-rtn-dint4"},
    "aqas": {"preset": "w4a8v4-rtn-dint4", "scaling": "aqas", **_CALIB},
    "aqas-optq": {"preset": "w4a8v4-rtn-dint4", "scaling": "aqas", "rounding": "optq", **_CALIB},
}
SAVED = "aqas-optq"


def tensor_digest(qm) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor the graph reads and every folded scale."""
    from qcompile.passes.graph_utils import get_tensor

    gm = qm.graph_module
    tensors = {n.target: get_tensor(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    assert any(k.endswith("_codes") for k in tensors) and any(k.endswith("_scale") for k in tensors)
    scales = getattr(qm.calibration, "scales", None) or {}
    h = hashlib.sha256()
    for prefix, group in (("graph", tensors), ("scales", scales)):
        for name in sorted(group):
            t = group[name].detach().contiguous().cpu()
            h.update(f"{prefix}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _quantize(name: str, **changes):
    recipe = resolve_recipe({**RECIPES[name], "name": name, **changes})
    return qcompile.quantize(tiny_model("gqa"), recipe, calibration=word_text(2000, seed=11),
                             tokenizer=word_tokenizer(), progress=False)


def run_all(out_dir: str, order=tuple(RECIPES)) -> dict[str, str]:
    """Hashes of each recipe's quantized tensors, and of the saved artifact's files (``SAVED`` recipe)."""
    from qcompile.artifacts import save

    hashes = {}
    for name in order:
        qm = _quantize(name)
        hashes[name] = tensor_digest(qm)
        if name == SAVED:
            path = save(qm, Path(out_dir) / "artifact")
            for f in ("config.json", "recipe.json", "tensors.safetensors"):   # structure.json holds timings
                hashes[f"file:{f}"] = hashlib.sha256((path / f).read_bytes()).hexdigest()
    return hashes


_CHILD = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(987654321)          # another global RNG state than the parent's
import test_determinism as t
print("HASHES " + json.dumps(t.run_all(sys.argv[2], order=tuple(reversed(t.RECIPES)))))
"""


@pytest.fixture(scope="module")
def here_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("det-here")


@pytest.fixture(scope="module")
def here(here_dir):
    torch.manual_seed(0)
    return run_all(str(here_dir))


def test_bit_identical_in_a_fresh_process(here, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = json.loads(proc.stdout.split("HASHES ", 1)[1])
    assert set(there) == set(here) and len(here) == len(RECIPES) + 3
    assert there == here


def test_repeat_in_process_after_other_work(here):
    """Same process, after other quantizations and with a disturbed global RNG: same codes."""
    torch.manual_seed(4242)
    torch.rand(1000)
    assert tensor_digest(_quantize("aqas")) == here["aqas"]


def test_seed_is_used_by_calibration_only(here):
    # another seed picks other calibration windows: other scales and codes (the hash can fail)
    assert tensor_digest(_quantize("aqas-optq", seed=1)) != here["aqas-optq"]
    # RTN reads no calibration data: the seed changes nothing
    assert tensor_digest(_quantize("rtn", seed=1)) == here["rtn"]


def test_reloaded_artifact_has_the_same_codes(here, here_dir):
    from qcompile.artifacts import load

    assert tensor_digest(load(here_dir / "artifact")) == here[SAVED]
