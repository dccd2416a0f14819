"""save/load: bit-identical logits, checksums catch any change, atomic writes, clear errors."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.artifacts import ArtifactError, load, save
from qcompile.recipes import resolve_recipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import tiny_model

    model = tiny_model("gqa")
    qm = qcompile.quantize(model, "w4a8v4-rtn-dint4", progress=False)
    path = save(qm, tmp_path_factory.mktemp("art") / "qm")
    return qm, path


def test_round_trip_bit_identical(saved, input_ids):
    qm, path = saved
    qm2 = load(path)
    assert torch.equal(qm(input_ids), qm2(input_ids))
    assert qm2.recipe == qm.recipe
    (before,) = [e for e in qm.pass_log if e.name == "quantize_weights"]
    (after,) = [e for e in qm2.pass_log if e.name == "quantize_weights"]
    assert after.notes == [f"{before.matches} weights' codes and scales loaded from the artifact"]


def test_round_trip_calibrated_mixed_precision(tmp_path, model, input_ids):
    r = resolve_recipe("w4a4-mixed10-rtn").replace(calib_samples=2, calib_seq_len=32)
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    qm = qcompile.quantize(model, r, calibration=calib, progress=False)
    qm2 = load(save(qm, tmp_path / "mixed"))
    assert torch.equal(qm(input_ids), qm2(input_ids))


@pytest.mark.parametrize("name", ["manifest.json", "config.json", "recipe.json", "structure.json",
                                  "tensors.safetensors"])
def test_tampered_file_is_named(saved, tmp_path, name):
    import shutil

    _, path = saved
    copy = tmp_path / "c"
    shutil.copytree(path, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="manifest|" + name.replace(".", r"\.")):
        load(copy)


def test_truncated_and_missing(saved, tmp_path):
    import shutil

    _, path = saved
    copy = tmp_path / "t"
    shutil.copytree(path, copy)
    with open(copy / "tensors.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ArtifactError, match="tensors.safetensors"):
        load(copy)
    (copy / "recipe.json").unlink()
    with pytest.raises(ArtifactError, match="recipe.json is missing|tensors.safetensors"):
        load(copy)
    with pytest.raises(ArtifactError, match="not a folder"):
        load(tmp_path / "nope")


def test_interrupted_save_keeps_previous(saved, tmp_path, monkeypatch, input_ids):
    qm, path = saved
    target = save(qm, tmp_path / "keep")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save(qm, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["keep"]  # no temporary folder left behind


def test_bad_destinations(saved, tmp_path):
    qm, _ = saved
    with pytest.raises(ArtifactError, match="does not exist"):
        save(qm, tmp_path / "missing" / "x")
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / "data.txt").write_text("user data")
    with pytest.raises(ArtifactError, match="not a qcompile artifact"):
        save(qm, tmp_path / "file")
    assert (tmp_path / "file" / "data.txt").read_text() == "user data"


def test_no_pickle_in_artifact(saved):
    _, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["config.json", "recipe.json", "structure.json", "tensors.safetensors"]


@settings(max_examples=25, deadline=None)
@given(file=st.sampled_from(["config.json", "recipe.json", "structure.json", "tensors.safetensors"]),
       frac=st.floats(0, 0.999), bit=st.integers(0, 7))
def test_random_byte_flips_always_detected(saved, tmp_path_factory, file, frac, bit):
    import shutil

    _, path = saved
    copy = tmp_path_factory.mktemp("flip") / "a"
    shutil.copytree(path, copy)
    data = bytearray((copy / file).read_bytes())
    data[int(frac * len(data))] ^= 1 << bit
    (copy / file).write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        load(copy)
