"""Fuzzing the artifact loader: every corruption of a saved artifact is an ArtifactError naming what is wrong.

test_artifacts.py flips one bit in the four data files. Here any file (manifest.json included) gets
several flipped bits, is truncated, grows, is deleted, or is swapped for the same file of another
valid artifact; the loader must refuse every one with one line that names the file (or the manifest),
and must still load the untouched original bit-identically.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.artifacts import ArtifactError, load, save
from qcompile.recipes import resolve_recipe

FILES = ["manifest.json", "config.json", "recipe.json", "structure.json", "tensors.safetensors"]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Two valid artifacts: GQA-LLaMA calibrated AQAS dINT4 (scales stored) and LLaMA RTN INT4."""
    model = tiny_model("gqa")
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    recipe = resolve_recipe("w4a8v4-rtn-dint4").replace(scaling="aqas", calib_samples=2, calib_seq_len=32)
    root = tmp_path_factory.mktemp("fuzz-art")
    qm = qcompile.quantize(model, recipe, calibration=calib, progress=False)
    a = save(qm, root / "a")
    b = save(qcompile.quantize(tiny_model("llama"), "w4a8v4-rtn-int4", progress=False), root / "b")
    return a, b, qm


def _copy(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("m") / "art"
    shutil.copytree(src, dst)
    return dst


def _refused(path, *names: str) -> None:
    with pytest.raises(ArtifactError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg and any(n in msg for n in (*names, "manifest")), msg


def test_untouched_copy_loads_bit_identically(artifacts, tmp_path_factory):
    a, _, qm = artifacts
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(load(_copy(a, tmp_path_factory))(ids), qm(ids))


@FUZZ
@given(name=st.sampled_from(FILES), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                                  min_size=1, max_size=4))
def test_bit_flips_anywhere_are_refused(artifacts, tmp_path_factory, name, flips):
    path = _copy(artifacts[0], tmp_path_factory)
    data = bytearray((path / name).read_bytes())
    original = bytes(data)
    for frac, bit in flips:
        data[int(frac * len(data))] ^= 1 << bit
    if bytes(data) == original:   # two flips of the same bit cancel: nothing to detect
        return
    (path / name).write_bytes(bytes(data))
    _refused(path, name)


@FUZZ
@given(name=st.sampled_from(FILES), cut=st.floats(0, 1, exclude_max=True), extra=st.binary(min_size=1, max_size=16),
       grow=st.booleans())
def test_truncated_or_grown_files_are_refused(artifacts, tmp_path_factory, name, cut, extra, grow):
    path = _copy(artifacts[0], tmp_path_factory)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data + extra if grow else data[:int(cut * len(data))])
    _refused(path, name)


@pytest.mark.parametrize("name", FILES)
def test_deleted_or_swapped_files_are_refused(artifacts, tmp_path_factory, name):
    a, b, _ = artifacts
    path = _copy(a, tmp_path_factory)
    (path / name).unlink()
    _refused(path, name)
    # the same file of another valid artifact (a different recipe): each file is valid on its own
    path = _copy(a, tmp_path_factory)
    assert (b / name).read_bytes() != (path / name).read_bytes()
    shutil.copyfile(b / name, path / name)
    _refused(path, *FILES)   # another artifact's manifest is self-consistent: the first file it disowns is named


def test_a_folder_or_link_in_place_of_a_file_is_refused(artifacts, tmp_path_factory):
    path = _copy(artifacts[0], tmp_path_factory)
    (path / "recipe.json").unlink()
    (path / "recipe.json").mkdir()
    _refused(path, "recipe.json")


@pytest.mark.parametrize("old,new", [('"qcompile": "', '"qcompile": "9'),   # a field outside the file table
                                     ('\n "files"', '\n\t"files"'),         # same JSON, other bytes
                                     ('"version": 1', '"version": 1.0')])
def test_manifest_edits_that_keep_valid_json_are_refused(artifacts, tmp_path_factory, old, new):
    path = _copy(artifacts[0], tmp_path_factory)
    text = (path / "manifest.json").read_text()
    assert old in text
    (path / "manifest.json").write_text(text.replace(old, new, 1))
    _refused(path, "manifest.json")


def test_saved_files_get_the_usual_permissions(artifacts):
    """mkdtemp and safetensors create owner-only files; a saved artifact follows the umask instead."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    a = artifacts[0]
    assert (a.stat().st_mode & 0o777) == 0o777 & ~umask
    assert all((f.stat().st_mode & 0o777) == 0o666 & ~umask for f in a.iterdir())
