"""Screenshot a report with headless Chromium, to look at a report the way a reader's browser shows it.

``python -m resnet_probe.report.screenshot REPORT_HTML OUT_PNG [--width 1280 --height 4000]``.
The browser runs with a fresh temporary profile, no sandbox (it runs as root in containers), no
GPU and no network services; the PNG is written atomically.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..atomic import atomic_path

__all__ = ["BROWSERS", "find_chromium", "screenshot", "main"]

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def find_chromium() -> str | None:
    """Path of a Chromium-family browser: ``$RESNET_PROBE_CHROMIUM`` or the first of ``BROWSERS`` on PATH."""
    env = os.environ.get("RESNET_PROBE_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html: str | Path, out_png: str | Path, *, width: int = 1280, height: int = 4000,
               browser: str | None = None, timeout: float = 120.0) -> Path:
    """Render ``html`` in headless Chromium and save a ``width`` x ``height`` PNG of the page.

    Args:
        html: the report file.
        out_png: where the screenshot goes.
        width: window width in CSS pixels.
        height: window height in CSS pixels (the page is cut there).
        browser: the browser executable (default ``find_chromium()``).
        timeout: seconds before the browser is killed.

    Returns:
        ``out_png`` as a ``Path``.

    Raises:
        FileNotFoundError: no report or no browser (the message says how to install one).
        RuntimeError: the browser ran but wrote no valid PNG (its stderr is included).
    """
    html, out_png = Path(html).resolve(), Path(out_png)
    if not html.is_file():
        raise FileNotFoundError(f"report {html} does not exist")
    browser = browser or find_chromium()
    if not browser:
        raise FileNotFoundError(f"no Chromium browser found (looked for {', '.join(BROWSERS)} and "
                                "$RESNET_PROBE_CHROMIUM); on Debian: apt-get install chromium")
    profile = tempfile.mkdtemp(prefix="resnet-probe-chromium-")
    try:
        with atomic_path(out_png) as tmp:
            cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={tmp}",
                   f"--window-size={int(width)},{int(height)}", html.as_uri()]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            data = tmp.read_bytes() if tmp.exists() else b""
            if not data.startswith(PNG_SIGNATURE):
                tail = "\n".join((res.stderr or "").strip().splitlines()[-15:])
                raise RuntimeError(f"{browser} wrote no PNG screenshot of {html} (exit {res.returncode}):\n{tail}")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return out_png


def main(argv: list[str] | None = None) -> int:
    """Command line entry: ``python -m resnet_probe.report.screenshot REPORT_HTML OUT_PNG``."""
    parser = argparse.ArgumentParser(prog="python -m resnet_probe.report.screenshot",
                                     description="Screenshot an HTML report with headless Chromium.")
    parser.add_argument("html", metavar="REPORT_HTML")
    parser.add_argument("png", metavar="OUT_PNG")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args(argv)
    try:
        path = screenshot(args.html, args.png, width=args.width, height=args.height)
    except (FileNotFoundError, RuntimeError) as e:
        parser.error(str(e))
    print(f"screenshot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
