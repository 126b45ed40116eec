"""Statements about drawn figures: family colours, integer ticks, legends outside the data, legible text."""
from __future__ import annotations

import colorsys

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex, to_rgb
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from resnet_probe.report.family_colours import FAMILY_COLOURS, OTHER_COLOURS, depth_of, family_of
from resnet_probe.report.figure_layout import FIGURE_WIDTH_PX, MIN_PANEL_IN, REPORT_WIDTH_PX
from resnet_probe.report.figures import build_figure

RESIDUAL, PLAIN = FAMILY_COLOURS["residual"].lower(), FAMILY_COLOURS["plain"].lower()


def model_table(models: dict[str, float], layers: int = 9, seeds: int = 1, **extra) -> pd.DataFrame:
    """Per-layer values of each model; a model's values are its offset + layer / 100, so a line names its model."""
    rows = [dict(model=name, metric="response_std", layer=layer, seed=seed, value=offset + layer / 100,
                 site=f"block{layer}", downsampling=layer in (4, 7), **extra)
            for name, offset in models.items() for layer in range(1, layers + 1) for seed in range(seeds)]
    return pd.DataFrame(rows)


def drawn(df: pd.DataFrame, kind: str, **spec):
    fig = build_figure(df, kind, spec)
    fig.canvas.draw()
    return fig


def data_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def line_colours(fig) -> dict[float, str]:
    """First y value of every drawn data line -> its colour."""
    return {round(float(line.get_ydata()[0]), 6): to_hex(line.get_color())
            for ax in data_axes(fig) for line in ax.get_lines() if len(line.get_ydata()) > 1}


def bar_colours(fig) -> dict[float, str]:
    """Height of every bar -> its face colour."""
    return {round(float(p.get_height()), 6): to_hex(p.get_facecolor()[:3]) for ax in data_axes(fig)
            for p in ax.patches if isinstance(p, Rectangle) and p.get_height() != 0}


def hls_hue(colour) -> float:
    return colorsys.rgb_to_hls(*to_rgb(colour))[0]


def luminance(colour) -> float:
    r, g, b = to_rgb(colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


# ---- one colour per family --------------------------------------------------------------------
def test_model_names_name_their_family_and_depth():
    assert [family_of(v) for v in ("plain-20", "residual-56", "highway-14", "preact-110", "resnet18 (random init)",
                                   "wide_resnet50_2", "resnext50_32x4d", "Residual", "plainly", "measure", 20)] == \
        ["plain", "residual", "highway", "preact", "residual", "residual", "residual", "residual", None, None, None]
    assert [depth_of(v) for v in ("plain-20", "resnet18 (random init)", "preact-resnet-110", "residual")] == \
        [20, 18, 110, None]


def test_the_residual_family_has_the_same_colour_in_every_kind_of_figure():
    df = model_table({"plain-20": 0.0, "residual-20": 1.0})
    first = {1.01: RESIDUAL, 0.01: PLAIN}  # layer 1 of each model
    for kind, spec in (("line", dict(x="layer", hue="model")), ("layer_profile", dict(x="layer", hue="model")),
                       ("line", dict(x="layer", hue="model", col="model"))):
        colours = line_colours(drawn(df, kind, **spec))
        assert {y: colours[y] for y in first} == first, (kind, spec)
    bars = bar_colours(drawn(df[df.layer == 1], "bar", x="site", hue="model"))
    assert bars == first
    by_model = bar_colours(drawn(df[df.layer == 1], "bar", x="model"))  # no hue: the bars name the models
    assert by_model == first
    fig = drawn(df, "scatter", x="layer", hue="model")
    points = next(c for c in data_axes(fig)[0].collections if isinstance(c, PathCollection))
    faces = {round(float(y), 6): to_hex(c[:3]) for (_, y), c in zip(points.get_offsets(), points.get_facecolors())}
    assert faces[1.01] == RESIDUAL and faces[0.01] == PLAIN


def test_a_family_column_and_family_hues_give_the_family_colour_too():
    df = model_table({"net-a": 0.0, "net-b": 1.0})
    df["family"] = np.where(df["model"] == "net-b", "residual", "plain")
    assert line_colours(drawn(df, "line", x="layer", hue="model"))[1.01] == RESIDUAL
    assert line_colours(drawn(df, "line", x="layer", hue="family"))[1.01] == RESIDUAL
    # a named palette (response_std asked for "Paired") does not recolour a family
    assert line_colours(drawn(df, "line", x="layer", hue="family", palette="Paired"))[1.01] == RESIDUAL
    one = df[df["family"] == "residual"]  # no hue: a panel of one family is drawn in its colour
    assert set(line_colours(drawn(one, "line", x="layer")).values()) == {RESIDUAL}


def test_depths_of_one_family_are_shades_of_its_colour_darker_when_deeper():
    df = model_table({"residual-56": 2.0, "residual-20": 1.0, "residual-110": 3.0, "resnet18 (random init)": 4.0})
    colours = line_colours(drawn(df, "line", x="layer", hue="model"))
    by_depth = [colours[y] for y in (4.01, 1.01, 2.01, 3.01)]  # depths 18, 20, 56, 110
    lum = [luminance(c) for c in by_depth]
    assert lum == sorted(lum, reverse=True) and len(set(by_depth)) == 4
    assert all(abs(hls_hue(c) - hls_hue(RESIDUAL)) < 0.02 for c in by_depth)


def test_a_numeric_hue_in_panels_of_one_family_is_drawn_in_that_familys_shades():
    df = pd.concat([model_table({f"{fam}-{d}": o + d / 1000}, layers=4).assign(family=fam, depth=d)
                    for fam, o in (("plain", 0.0), ("residual", 1.0)) for d in (20, 56)])
    fig = drawn(df, "line", x="layer", hue="depth", col="family", palette="viridis")
    colours = line_colours(fig)
    assert abs(hls_hue(colours[1.066]) - hls_hue(RESIDUAL)) < 0.02  # residual-56 in the residual panel
    assert abs(hls_hue(colours[0.03]) - hls_hue(PLAIN)) < 0.02  # plain-20 in the plain panel
    assert luminance(colours[1.066]) < luminance(colours[1.03])  # deeper is darker


def test_other_hue_values_never_take_a_family_colour():
    df = pd.DataFrame([dict(metric="m", measure=f"measure {i}", x=j, value=i + j / 10)
                       for i in range(9) for j in range(3)])
    family = {to_hex(c) for c in FAMILY_COLOURS.values()}
    for n in (2, len(OTHER_COLOURS), 9):
        colours = set(line_colours(drawn(df[df.value < n], "line", x="x", hue="measure")).values())
        assert len(colours) == n and not colours & family
        assert min(np.linalg.norm(np.subtract(to_rgb(c), to_rgb(f))) for c in colours for f in family) > 0.15
    assert not {to_hex(c) for c in OTHER_COLOURS} & family


# ---- ticks, legends, sizes --------------------------------------------------------------------
def visible_tick_labels(ax, axis: str = "x") -> list[str]:
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks if lo <= t.get_position()[0 if axis == "x" else 1] <= hi and t.get_text()]


@pytest.mark.parametrize("dtype", ["int64", "float64"])  # float: whole numbers read back from a CSV with gaps
def test_integer_columns_get_integer_ticks(dtype):
    df = model_table({"residual-20": 0.0}, layers=3)  # three layers: matplotlib alone ticks 1.0, 1.25, 1.5, ...
    df["layer"] = df["layer"].astype(dtype)
    for kind in ("line", "scatter", "layer_profile"):
        fig = drawn(df, kind, x="layer", hue="model")
        for ax in data_axes(fig):
            labels = visible_tick_labels(ax)
            assert labels == ["1", "2", "3"], (kind, labels)
    fractional = pd.DataFrame({"metric": "m", "x": [0.0, 0.5, 1.0], "value": [1.0, 2.0, 3.0]})
    assert any("." in s for s in visible_tick_labels(data_axes(drawn(fractional, "line", x="x"))[0]))


def test_a_long_legend_sits_outside_the_data_and_does_not_squeeze_it():
    df = model_table({"plain-20": 0.0, "residual-20": 1.0}, layers=6)
    widths = []
    for suffix in ("", " trained with the paper recipe for 64,000 iterations at batch size 128"):
        named = df.assign(model=df["model"] + suffix)
        fig = drawn(named, "bar", x="site", hue="model", flag="downsampling",
                    flag_label="downsampling block (shortcut changes shape)")
        renderer = fig.canvas.get_renderer()
        ax, legend = data_axes(fig)[0], fig.legends[0]
        assert not ax.get_window_extent(renderer).overlaps(legend.get_window_extent(renderer))
        assert fig.get_size_inches()[0] * fig.dpi <= FIGURE_WIDTH_PX + 1
        widths.append(ax.get_window_extent(renderer).width)
    assert widths[1] == pytest.approx(widths[0], rel=0.03)


def surface_table(models: dict[str, float], points: int = 5) -> pd.DataFrame:
    """A bowl ``offset + a^2 + b^2`` on a ``points`` x ``points`` grid per model (a loss surface's shape)."""
    axis = np.linspace(-1, 1, points)
    return pd.DataFrame([dict(model=name, metric="loss", seed=0, site="network", alpha=a, beta=b,
                              value=offset + a * a + b * b) for name, offset in models.items() for a in axis
                         for b in axis])


def test_contour_panels_share_one_colour_scale_and_name_their_family_in_its_colour():
    df = surface_table({"plain-20": 1.0, "residual-20": 5.0})
    fig = drawn(df, "contour", x="alpha", y="beta", col="model", logz=True, marker=[0, 0])
    axes = data_axes(fig)
    assert len(axes) == 2 and sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 1
    levels = [tuple(c.levels) for ax in axes for c in ax.collections if hasattr(c, "levels")]
    assert len(set(levels)) == 1 and levels[0][0] == pytest.approx(1.0) and levels[0][-1] == pytest.approx(7.0)
    assert np.allclose(np.diff(np.log(levels[0])), np.log(levels[0][1] / levels[0][0]))   # geometric with logz
    assert {to_hex(ax.title.get_color()) for ax in axes} == {PLAIN, RESIDUAL}
    assert all(any(list(line.get_xdata()) == [0] and list(line.get_ydata()) == [0] for line in ax.get_lines())
               for ax in axes)


def test_contour_cells_of_a_grid_the_data_does_not_fill_are_left_out():
    df = surface_table({"plain-8": 1.0, "plain-20": 2.0, "residual-20": 3.0})
    df["family"], df["depth"] = df["model"].str.split("-").str[0], df["model"].str.split("-").str[1].astype(int)
    fig = drawn(df, "contour", x="alpha", y="beta", row="family", col="depth")
    assert len(data_axes(fig)) == 3          # residual-8 is missing: its cell is hidden, not an empty frame


def test_a_contour_marker_must_be_a_point():
    with pytest.raises(ValueError, match=r"marker must be a point \[x, y\]"):
        drawn(surface_table({"plain-8": 1.0}), "contour", x="alpha", y="beta", marker=0)


def legibility_cases():
    names = [f"{f}-{d}" for f in ("plain", "highway", "residual") for d in (20, 56, 110)]
    nine = model_table({name: i for i, name in enumerate(names)}, layers=20)
    blocks = (model_table({name: i for i, name in enumerate(names)}, layers=20, seeds=3)
              .rename(columns={"layer": "block_index"}).assign(step=lambda d: d["seed"] * 1000))
    two = model_table({"plain-20": 0.0, "residual-20": 1.0}, seeds=3)
    yield "line", two, dict(x="layer", hue="model", title="Response std per layer")
    yield "bar", two, dict(x="site", hue="model", flag="downsampling", title="bars")
    yield "scatter", two, dict(x="layer", hue="model", style="downsampling")
    yield "heatmap", two, dict(x="layer", y="model")
    yield "layer_profile", nine, dict(x="layer", hue="model", flag="downsampling")
    yield "line", nine, dict(x="layer", col="model", title="nine facets")
    yield "line", blocks, dict(x="step", hue="block_index", col="model", errorbar=None)
    yield "contour", surface_table({"plain-20": 1.0, "residual-20": 2.0}), dict(x="alpha", y="beta", col="model",
                                                                                title="Loss surfaces")


@pytest.mark.parametrize("case", range(8))
def test_every_figure_fits_the_report_and_its_text_is_legible_at_1280_px(case):
    kind, df, spec = list(legibility_cases())[case]
    fig = drawn(df, kind, **spec)
    width_px = fig.get_size_inches()[0] * fig.dpi
    assert width_px <= FIGURE_WIDTH_PX + 1 <= REPORT_WIDTH_PX  # shown at its own size in a 1280-px window
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
             and (t.axes is None or t.axes.get_visible())]
    smallest = min(t.get_fontsize() * fig.dpi / 72 for t in texts)
    assert smallest >= 12, f"{kind}: text of {smallest:.1f} px"
    renderer = fig.canvas.get_renderer()
    for ax in data_axes(fig):
        assert ax.get_window_extent(renderer).width >= 0.6 * MIN_PANEL_IN * fig.dpi  # panels wrap, not shrink
    if spec.get("hue") == "block_index":  # 20 blocks: a colour bar, not 20 legend entries
        assert not fig.legends and any(ax.get_ylabel() == "block_index" for ax in fig.axes)
