"""One colour per model family in every figure, whichever column carries the family.

A level of a figure's hue (or of its ``x`` axis for bars without a hue) belongs to a family when its
rows say so in a ``family`` column, or when its name does: ``plain-20``, ``residual-56``,
``highway-14``, ``preact-110``, ``resnet18 (random init)`` (torchvision ResNets, ResNeXts and wide
ResNets are residual), or the family name itself. Levels of one family share its hue; several
depths of one family are shades of it, darker = deeper. Every other level takes a colour from
``OTHER_COLOURS`` (or a grey ramp for ordered numbers), which never contain a family colour, so a
colour in one figure means the same family in every other.

``palette_for(levels)`` gives the same colours to notebooks and other seaborn code.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import seaborn as sns
from matplotlib.colors import to_rgb

__all__ = ["FAMILY_COLOURS", "OTHER_COLOURS", "family_of", "depth_of", "shades", "grey_shades", "palette_for"]

# Paul Tol's "vibrant" scheme, chosen to stay distinct for colour-blind readers.
FAMILY_COLOURS = {"plain": "#CC3311", "highway": "#009988", "residual": "#0077BB", "preact": "#EE3377"}
OTHER_COLOURS = ("#EE7733", "#33BBEE", "#999933", "#7A5230", "#888888", "#DDAA33", "#222222")

_NAME = re.compile(r"""^\s*(?P<name>pre-?act(?:ivation)?|plain|highway|residual|resnext|wide[-_ ]?resnet|resnet|wrn)
                       (?![a-z])[-_ ]*(?:resnet)?[-_ ]*(?P<depth>\d+)?""", re.IGNORECASE | re.VERBOSE)
_ALIASES = {"resnext": "residual", "resnet": "residual", "wrn": "residual"}


def family_of(value: object) -> str | None:
    """The family a level names (``"residual-56"`` -> ``"residual"``), or None."""
    if not isinstance(value, str):
        return None
    match = _NAME.match(value)
    if not match:
        return None
    name = re.sub(r"[-_ ]", "", match["name"].lower())
    if name.startswith("pre"):
        return "preact"
    if name.startswith("wide"):
        return "residual"
    return _ALIASES.get(name, name)


def depth_of(value: object) -> int | None:
    """The depth a level names after its family (``"plain-20"`` -> 20, ``"resnet18"`` -> 18), or None."""
    match = _NAME.match(value) if isinstance(value, str) else None
    return int(match["depth"]) if match and match["depth"] else None


def _steps(n: int) -> np.ndarray:
    # -1 lightest .. +1 darkest; two shades sit closer to the colour itself than the ends of a longer ramp
    return np.linspace(-1.0, 1.0, n) * min(1.0, 0.6 * (n - 1))


def _shade(rgb: tuple[float, float, float], step: float) -> tuple[float, float, float]:
    # lighter: towards white (at most 55 %); darker: towards black (at most 50 %); the hue stays
    target, amount = (1.0, -0.55 * step) if step < 0 else (0.0, 0.5 * step)
    return tuple(float(c + (target - c) * amount) for c in rgb)


def shades(colour: str, n: int) -> list[tuple[float, float, float]]:
    """``n`` shades of ``colour`` from light to dark; ``n == 1``: the colour itself."""
    rgb = to_rgb(colour)
    return [rgb] if n == 1 else [_shade(rgb, step) for step in _steps(n)]


def grey_shades(n: int) -> list[tuple[float, float, float]]:
    """``n`` greys from light to dark, with the steps of ``shades``."""
    return shades("#5a5a5a", n)


def palette_for(levels: Iterable, families: Mapping | None = None, depths: Mapping | None = None,
                fallback: str | list | None = None, numeric: bool = False) -> dict:
    """Colour of every level: family shades for family levels, other colours for the rest.

    Args:
        levels: the levels in legend order.
        families: level -> family where the table says so (default: ``family_of`` of the level).
        depths: level -> depth where the table says so (default: ``depth_of`` of the level).
        fallback: a seaborn palette name (or colour list) for levels of no family, used only when no
            level has a family (it could hold a family colour).
        numeric: the levels are ordered numbers: levels of no family get a light-to-dark grey ramp.

    Returns:
        level -> RGB tuple.
    """
    levels = list(levels)
    families = {lv: (families or {}).get(lv) or family_of(lv) for lv in levels}
    depths = {lv: (depths or {}).get(lv, depth_of(lv)) for lv in levels}
    out: dict = {}
    for family in dict.fromkeys(f for f in families.values() if f):
        members = [lv for lv in levels if families[lv] == family]
        members.sort(key=lambda lv: (depths[lv] is not None, depths[lv] or 0, levels.index(lv)))
        out.update(zip(members, shades(FAMILY_COLOURS[family], len(members))))
    rest = [lv for lv in levels if lv not in out]
    if rest:
        if fallback is not None and not out:
            colours = sns.color_palette(fallback, len(rest))
        elif numeric or len(rest) > len(OTHER_COLOURS):
            colours = grey_shades(len(rest))
        else:
            colours = [to_rgb(c) for c in OTHER_COLOURS[:len(rest)]]
        out.update(zip(rest, (tuple(c) for c in colours)))
    return {lv: out[lv] for lv in levels}

