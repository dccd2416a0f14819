"""The dispatch's timed path choices (``w4_linear._choose_path``), kept on disk between processes.

With ``DISPATCH.*_path = "auto"`` the first call of each shape key runs and times every candidate launch
sequence (compiling and autotuning each path's kernels on the way) and keeps the fastest. This file keeps
those winners in ``$QCOMPILE_HOME/triton/dispatch_paths.json`` under an environment key of everything
the timing depends on: GPU name, CUDA, torch and Triton versions, and a digest of the kernel sources. A
second process on the same machine then takes the winner directly and never compiles the losing paths.
``QCOMPILE_AUTOTUNE_CACHE=0`` turns it off (as it does Triton's on-disk autotune results).

The file is rewritten whole through a temporary file and ``os.replace``: a reader sees the old or the
new file, never half of one; an unwritable cache folder costs a warning, not the call.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

__all__ = ["enabled", "environment", "lookup", "store"]

_KERNEL_SOURCES = (
    "_common.py", "path_clock.py", "quantize_kernel.py", "w4_gemm_kernel.py", "w4_gemv_kernel.py",
    "w4_ksplit_kernel.py", "w4_linear.py")
_FILE_NAME = "dispatch_paths.json"
_memory: dict = {}  # environment -> {key text: path}, as last read or written by this process
_warned = False


def enabled() -> bool:
    return os.environ.get("QCOMPILE_AUTOTUNE_CACHE", "1") != "0"


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _KERNEL_SOURCES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def environment(device: torch.device) -> str:
    """What a timing on ``device`` depends on, as one string."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return "|".join([name, f"cuda {torch.version.cuda}", f"torch {torch.__version__}", f"triton {triton.__version__}",
                     f"kernels {_source_digest()}"])


def _path() -> Path:
    from qcompile.assets import cache_home

    return cache_home() / "triton" / _FILE_NAME


def _read() -> dict:
    try:
        data = json.loads(_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lookup(env: str, key: tuple) -> str | None:
    """The stored winner for ``key`` in ``env``, or None."""
    if not enabled():
        return None
    if env not in _memory:
        _memory[env] = dict(_read().get(env, {}))
    return _memory[env].get(repr(key))


def store(env: str, key: tuple, path: str) -> None:
    """Keep ``path`` as the winner for ``key`` in ``env`` (merged into what other processes stored)."""
    global _warned
    if not enabled():
        return
    data = _read()
    entries = data.setdefault(env, {})
    entries[repr(key)] = path
    _memory[env] = dict(entries)
    target = _path()
    tmp = target.with_name(f".{_FILE_NAME}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not _warned:
            _warned = True
            warnings.warn(f"qcompile: cannot keep the timed dispatch paths in {target} ({e}); they will be timed "
                          "again in the next process", RuntimeWarning, stacklevel=3)
