"""A report as a browser shows it: headless Chromium renders it and its figures to a screenshot."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from resnet_probe.report import new_run
from resnet_probe.report.family_colours import FAMILY_COLOURS
from resnet_probe.report.screenshot import find_chromium, screenshot

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(find_chromium() is None, reason="headless Chromium is not installed")]


def test_a_report_screenshot_shows_the_banner_and_the_figure(tmp_path):
    run = new_run("demo", out=tmp_path, data={"kind": "synthetic", "synthetic": True})
    run.add_table("t", pd.DataFrame({"metric": "error", "model": "residual-20", "value": [0.9, 0.5, 0.3, 0.2],
                                     "step": [0, 1, 2, 3]}))
    run.add_figure("t", "line", "t", x="step", title="error")
    html = run.finish()
    png = screenshot(html, tmp_path / "shot.png", width=1000, height=1400)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape == (1400, 1000, 3)
    red = (img[..., 0] > 170) & (img[..., 1] < 80) & (img[..., 2] < 80)  # the synthetic-data banner
    assert red[:400].sum() > 20_000
    r, g, b = (int(FAMILY_COLOURS["residual"][i:i + 2], 16) for i in (1, 3, 5))
    line = (abs(img[..., 0] - r) < 30) & (abs(img[..., 1] - g) < 30) & (abs(img[..., 2] - b) < 30)
    assert line.sum() > 300  # the figure's line is drawn on the page, in the residual family's colour
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "shot.png"]
