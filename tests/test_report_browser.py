"""The HTML report renders in headless Chromium: no console messages, the per-layer table and every figure.

Chromium comes from Debian (``apt-get install chromium``, tried once when it is missing and we are root);
the tests skip cleanly when it cannot be installed. Console messages are read from Chromium's
``--enable-logging=stderr`` log (``INFO:CONSOLE`` lines); a planted script error proves the check can fail.
"""
from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_model

from qcompile.report.browser import check_in_browser, console_lines, find_chromium, run_chromium

pytestmark = pytest.mark.slow


def _run_chromium(page, *extra):
    exe = find_chromium(install=True)
    if exe is None:
        pytest.skip("chromium is not installed and could not be installed with apt-get")
    return run_chromium(exe, page, *extra)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from qcompile.report import build_report

    out = tmp_path_factory.mktemp("report")
    ids = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(2))
    return build_report(tiny_model("llama"), ids, out, recipe="w4a8v4-rtn-int4", backends=("onnx", "triton"),
                        device="cpu", progress=False, err_tokens=64)


def test_report_renders_without_console_errors(report, tmp_path):
    shot = tmp_path / "shot.png"
    r = _run_chromium(report["html"], "--window-size=1400,2600", f"--screenshot={shot}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert console_lines(r.stderr) == []
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (2600, 1400)
    assert img[..., :3].std() > 0.05  # not a blank page (measured 0.2)


def test_rendered_dom_has_the_per_layer_table_and_every_figure(report):
    r = _run_chromium(report["html"], "--dump-dom")
    assert r.returncode == 0 and console_lines(r.stderr) == []
    dom = r.stdout
    n_plots = len(report["plots"])
    assert n_plots == 5
    assert f'data-images-ok="{n_plots}/{n_plots}"' in dom  # set by the page once every figure decoded
    layers = re.search(r'<table id="layers".*?<tbody>(.*?)</tbody>', dom, re.DOTALL).group(1)
    assert layers.count("<tr") == 14
    assert "model.layers.1.mlp.down_proj" in layers
    for name in ("sqnr", "error_split", "ranges", "outliers", "backends"):
        assert f'id="plot-{name}"' in dom
    assert 'id="pass-log"' in dom and 'href="passes/' in dom


def test_console_check_catches_a_script_error(report, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(report["html"].read_text().replace("<script>", "<script>undefinedFunction();", 1))
    r = _run_chromium(bad, "--dump-dom")
    assert any("undefinedFunction" in line for line in console_lines(r.stderr))
    assert "data-images-ok" not in r.stdout


def test_check_in_browser_sums_it_up(report, tmp_path):
    if find_chromium(install=True) is None:
        pytest.skip("chromium is not installed and could not be installed with apt-get")
    good = check_in_browser(report["html"], screenshot=tmp_path / "shot.png")
    assert good.ok, good.summary()
    assert good.images_ok == "5/5" and good.layer_rows == 14 and good.screenshot_std > 0.05
    assert set(good.plot_ids) >= {"sqnr", "error_split", "ranges", "outliers", "backends"}
    bad = tmp_path / "bad.html"
    bad.write_text(report["html"].read_text().replace("<script>", "<script>undefinedFunction();", 1))
    broken = check_in_browser(bad)
    assert not broken.ok and broken.images_ok is None and broken.console
    assert "FAILED" in broken.summary()
