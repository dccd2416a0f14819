"""Packaging: every Python package folder is listed in pyproject.toml; `import qcompile` stays light."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _listed_packages() -> set[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(cfg["packages"]), cfg["package-dir"]


def _package_folders(package_dir: dict) -> set[str]:
    found = set()
    for dotted, folder in package_dir.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            name = ".".join((dotted, *rel))
            # a sub-folder mapped elsewhere (qcompile/passes -> passes/) is found through its own mapping
            if any(name == d or name.startswith(d + ".") for d in package_dir if d != dotted and len(d) > len(dotted)):
                continue
            found.add(name)
    return found


def test_every_package_folder_is_listed():
    listed, package_dir = _listed_packages()
    on_disk = _package_folders(package_dir)
    assert on_disk - listed == set(), f"add these to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"listed but missing on disk: {sorted(listed - on_disk)}"


def test_import_is_light():
    code = ("import sys, qcompile, qcompile.formats, qcompile.recipes\n"
            "heavy = [m for m in ('triton', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`import qcompile` pulled in {out}"
