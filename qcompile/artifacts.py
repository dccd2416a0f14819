"""Save and load quantized models as safe, checksummed, atomically written artifact folders.

Layout of an artifact folder (format version 1)::

    manifest.json        format name + version, qcompile version, sha256 and size of every other file
    config.json          the HF model config
    recipe.json          the Recipe
    structure.json       what the graph's shape depends on: scaled producers (+ sizes), tensor aliases,
                         calibration summary
    tensors.safetensors  every tensor the graph reads: packed codes, scales, zero-points, FP weights

The graph itself is *rebuilt*, not serialized: ``load`` makes an empty model from the config, captures
it, runs the same deterministic pass list (attribute names are deterministic) and then replaces every
tensor the graph reads with the saved one, checking names, shapes and dtypes. Nothing is unpickled:
JSON and safetensors only. Writes go to a temporary sibling folder renamed into place, so an
interrupted save leaves the previous artifact intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qcompile.errors import QcompileError

__all__ = ["FORMAT_VERSION", "ArtifactError", "load", "save"]

FORMAT_NAME = "qcompile-artifact"
FORMAT_VERSION = 1
_FILES = ("config.json", "recipe.json", "structure.json", "tensors.safetensors")
_SCALES = "calibration.scales."  # tensors.safetensors keys of the folded scales (the debugger's FP twin needs them)


class ArtifactError(QcompileError):
    """An artifact folder is missing, corrupt, tampered with, or cannot be written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _graph_tensors(gm) -> dict[str, torch.Tensor]:
    from qcompile.passes.graph_utils import get_tensor
    return {n.target: get_tensor(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"
            and isinstance(get_tensor(gm, n.target), torch.Tensor)}


def _unique(tensors: dict[str, torch.Tensor]):
    """Store tied tensors (e.g. embedding = lm_head) once; return (unique tensors, alias -> stored name)."""
    seen, unique, aliases = {}, {}, {}
    for name, t in sorted(tensors.items()):
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def save(qm, path: str | Path) -> Path:
    """Write ``qm`` (a QuantizedModel) to the folder ``path`` atomically; returns the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ArtifactError(f"cannot save to {str(path)!r}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ArtifactError(f"cannot save to {str(path)!r}: the folder {str(parent)!r} is not writable")
    if path.exists() and not (path / "manifest.json").is_file():
        raise ArtifactError(f"{str(path)!r} exists and is not a qcompile artifact; choose another folder")
    unique, aliases = _unique(_graph_tensors(qm.graph_module))
    cal = qm.calibration
    scales = getattr(cal, "scales", None) or {}
    unique.update({_SCALES + k: v.detach().float().contiguous().cpu() for k, v in scales.items()})
    structure = {
        "scales": {k: int(v.numel()) for k, v in (getattr(cal, "scales", None) or {}).items()},
        "aliases": aliases,
        "calibration": None if cal is None else {"n_samples": cal.n_samples, "seq_len": cal.seq_len,
                                                  "seconds": dict(cal.seconds), "notes": list(cal.notes)},
        "seconds": qm.seconds,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        (tmp / "config.json").write_text(json.dumps(qm.config.to_dict(), indent=1, default=str))
        (tmp / "recipe.json").write_text(json.dumps(qm.recipe.to_dict(), indent=1))
        (tmp / "structure.json").write_text(json.dumps(structure, indent=1))
        save_file(unique, str(tmp / "tensors.safetensors"), metadata={"format": FORMAT_NAME})
        import qcompile
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "qcompile": qcompile.__version__,
                    "files": {f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in _FILES}}
        manifest["checksum"] = _manifest_checksum(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _finish_files(tmp)
        old = None
        if path.exists():
            old = parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _finish_files(folder: Path) -> None:
    """Usual permissions (mkdtemp and safetensors create owner-only ones) and data on disk before the
    rename, so after a power loss the new name never points at files whose data was not yet written."""
    umask = os.umask(0o022)
    os.umask(umask)
    for f in [*folder.iterdir(), folder]:
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _manifest_checksum(manifest: dict) -> str:
    """Checksum of every manifest field but itself, so a changed manifest is told apart from a changed file."""
    rest = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _files_checksum(files: dict) -> str:
    """The checksum of the first version-1 artifacts: the file table only (still accepted when loading)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _read_manifest(path: Path) -> dict:
    mf = path / "manifest.json"
    if not path.is_dir():
        raise ArtifactError(f"{str(path)!r} is not a folder; expected a qcompile artifact saved by qcompile.save")
    if not mf.is_file():
        raise ArtifactError(f"{str(path)!r} has no manifest.json: not a qcompile artifact (or a partial copy)")
    try:
        text = mf.read_text(encoding="utf-8")
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"manifest.json in {str(path)!r} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"manifest.json in {str(path)!r} is not a qcompile manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {manifest.get('version')!r} is not supported "
                            f"(this qcompile reads version {FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(_FILES):
        raise ArtifactError(f"manifest.json in {str(path)!r} does not list the expected files {list(_FILES)}")
    if manifest.get("checksum") not in (_manifest_checksum(manifest), _files_checksum(files)):
        raise ArtifactError(f"manifest.json in {str(path)!r} is corrupt or was modified (checksum mismatch)")
    if text != json.dumps(manifest, indent=1):  # save writes exactly this: a changed space or newline is caught too
        raise ArtifactError(f"manifest.json in {str(path)!r} is corrupt or was modified (not as saved)")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"artifact file {name} is missing from {str(path)!r}")
        if not isinstance(meta, dict) or f.stat().st_size != meta.get("bytes") or _sha256(f) != meta.get("sha256"):
            raise ArtifactError(f"artifact file {name} in {str(path)!r} is corrupt or was modified "
                                "(sha256 mismatch); re-save the model")
    return manifest


def _json(path: Path, name: str):
    try:
        return json.loads((path / name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # only reachable if the manifest was forged too
        raise ArtifactError(f"artifact file {name} is not valid JSON: {e}") from None


def load(path: str | Path):
    """Load a QuantizedModel saved by ``save``; every file is checksummed first."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from qcompile.calibration.engine import CalibrationResult
    from qcompile.capture import capture
    from qcompile.pipeline import QuantizedModel, run_pipeline_passes
    from qcompile.recipes import Recipe

    path = Path(path)
    t0 = time.perf_counter()
    _read_manifest(path)
    cfg_dict, recipe, structure = _json(path, "config.json"), _json(path, "recipe.json"), _json(path, "structure.json")
    recipe = Recipe.from_dict({**recipe, "skip": tuple(recipe.get("skip", ()))})
    config = transformers.AutoConfig.for_model(**cfg_dict)
    try:
        tensors = load_file(str(path / "tensors.safetensors"))
    except SafetensorError as e:
        raise ArtifactError(f"artifact file tensors.safetensors is unreadable: {e}") from None
    for alias, target in structure["aliases"].items():
        tensors[alias] = tensors[target]
    scales = {k[len(_SCALES):]: tensors.pop(k) for k in list(tensors) if k.startswith(_SCALES)}
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    skeleton = CalibrationResult(scales={k: torch.ones(n) for k, n in structure["scales"].items()},
                                 act_stats=_placeholder_stats(model, recipe))
    gm = capture(model)
    log = run_pipeline_passes(gm, recipe, config, skeleton)
    _load_tensors(gm, tensors)
    for entry in log:  # the passes rebuilt the structure; the codes and scales are the artifact's
        if entry.name == "quantize_weights":
            entry.notes = [f"{entry.matches} weights' codes and scales loaded from the artifact"]
    calibration = CalibrationResult(scales=scales) if scales else None  # artifacts saved before scales: None
    qm = QuantizedModel(gm, recipe, config, log, calibration, {"load": time.perf_counter() - t0})
    return qm


def _placeholder_stats(model, recipe):
    if recipe.fp16_ratio <= 0:
        return {}
    return {name: {"absmean": torch.zeros(m.in_features)} for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _load_tensors(gm, tensors: dict[str, torch.Tensor]) -> None:
    from qcompile.passes.graph_utils import get_tensor

    wanted = _graph_tensors(gm)
    missing, extra = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
    if missing or extra:
        raise ArtifactError(f"tensors.safetensors does not match the rebuilt graph: missing {missing[:3]}, "
                            f"unexpected {extra[:3]} (saved by a different qcompile or recipe?)")
    for name, t in tensors.items():
        cur = get_tensor(gm, name)
        if cur.shape != t.shape or cur.dtype != t.dtype:
            raise ArtifactError(f"tensor {name} has shape {tuple(t.shape)} {t.dtype}, the graph expects "
                                f"{tuple(cur.shape)} {cur.dtype}")
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if isinstance(getattr(owner, leaf), torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(t, requires_grad=False))
        else:
            setattr(owner, leaf, t)
