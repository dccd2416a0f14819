#!/usr/bin/env bash
# The test command (README): all tests on CPU, one torch thread each, deterministic.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
python -m ruff check --quiet .  # style gate: pycodestyle, pyflakes, import order, pyupgrade (pyproject.toml)
python -m pytest -q -p no:cacheprovider "$@"
