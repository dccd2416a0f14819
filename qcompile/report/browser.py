"""Open a report in headless Chromium: console messages, what the page rendered, and a screenshot.

The page sets ``data-images-ok="k/n"`` on ``<body>`` once every embedded figure decoded, so the
rendered DOM (``--dump-dom``) says whether the figures loaded; console messages come from Chromium's
``--enable-logging=stderr`` log (its ``:CONSOLE`` lines). Chromium itself is Debian's ``chromium``
package (``find_chromium(install=True)`` tries ``apt-get install chromium`` once when we are root).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from qcompile.errors import QcompileError

__all__ = ["BrowserCheck", "check_in_browser", "find_chromium"]


@functools.lru_cache(maxsize=2)
def find_chromium(install: bool = False) -> str | None:
    """Path of a Chromium binary, or None; with ``install``, try Debian's package once (root only)."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shutil.which("chromium")


def run_chromium(exe: str, page: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=5000", *extra, Path(page).resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@dataclass
class BrowserCheck:
    """What Chromium saw: ``ok`` when there were no console messages and every figure and the layer table rendered."""
    console: list[str] = field(default_factory=list)
    images_ok: str | None = None  # "k/n" from the page, None when the page never set it (script error)
    layer_rows: int = 0
    plot_ids: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    screenshot_std: float | None = None  # pixel standard deviation: ~0 for a blank page

    @property
    def ok(self) -> bool:
        if self.console or self.images_ok is None or self.layer_rows == 0:
            return False
        k, n = self.images_ok.split("/")
        return k == n and int(n) > 0 and (self.screenshot_std is None or self.screenshot_std > 0.05)

    def summary(self) -> str:
        shot = f", screenshot {self.screenshot} (pixel std {self.screenshot_std:.2f})" if self.screenshot else ""
        return (f"chromium: {'OK' if self.ok else 'FAILED'}: {len(self.console)} console messages, figures "
                f"{self.images_ok or 'not loaded'}, {self.layer_rows} layer rows, plots "
                f"{', '.join(self.plot_ids) or 'none'}{shot}")


def check_in_browser(html: Path, screenshot: Path | None = None, size: tuple[int, int] = (1400, 2600),
                     install: bool = False) -> BrowserCheck:
    """Render ``html`` headless: the DOM (table rows, figures decoded, plot ids), console, optional PNG."""
    exe = find_chromium(install)
    if exe is None:
        raise QcompileError("chromium is not installed (Debian: apt-get install chromium)")
    html = Path(html)
    dom = run_chromium(exe, html, "--dump-dom")
    if dom.returncode != 0:
        raise QcompileError(f"chromium failed on {html}: {dom.stderr[-500:]}")
    check = BrowserCheck(console=console_lines(dom.stderr))
    m = re.search(r'data-images-ok="(\d+/\d+)"', dom.stdout)
    check.images_ok = m.group(1) if m else None
    table = re.search(r'<table id="layers".*?<tbody>(.*?)</tbody>', dom.stdout, re.DOTALL)
    check.layer_rows = table.group(1).count("<tr") if table else 0
    check.plot_ids = re.findall(r'id="plot-([\w-]+)"', dom.stdout)
    if screenshot is not None:
        shot = run_chromium(exe, html, f"--window-size={size[0]},{size[1]}",
                            f"--screenshot={Path(screenshot).resolve()}")
        check.console += [c for c in console_lines(shot.stderr) if c not in check.console]
        if shot.returncode != 0 or not Path(screenshot).is_file():
            raise QcompileError(f"chromium could not take a screenshot of {html}: {shot.stderr[-500:]}")
        import matplotlib.image as mpimg

        img = mpimg.imread(screenshot)
        check.screenshot, check.screenshot_std = Path(screenshot), float(img[..., :3].std())
    return check
