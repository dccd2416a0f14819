"""examples/bench_decode.py end to end on a 2-layer model (CPU): the script runs, lowers every linear and
both fusion variants, and the compiled decode step's logits match the eager reference module form."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "bench_decode.py"


def test_bench_decode_tiny_runs_and_matches_the_reference(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--batch", "1", "--norm-quant"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (tmp_path / "bench_decode.md").read_text()
    assert "| 1 |" in table and "14/14 |" in table  # 7 linears x 2 layers, all lowered
    err = float(re.search(r"vs the eager reference QDQ module form \(same codes\): rel\. err ([0-9.]+e[+-][0-9]+)",
                          table).group(1))
    assert err < 1e-4  # CPU: the lowered ops run their reference bodies on the same codes
    # the variants really fuse (the report says so) and leave the logits where the default run has them
    assert "4 RMSNorms run inside the next quantization" in run.stdout
    assert "2 down projections compute silu(gate) * up in their quantization" in run.stdout
    diffs = re.findall(r"on vs default: rel\. diff ([0-9.]+e[+-][0-9]+)", table)
    assert len(diffs) == 2 and all(float(d) < 1e-4 for d in diffs)
