"""Which colour, dash and marker each level of a figure gets, fixed over all of its panels."""
from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.colors import to_rgb

from . import figure_kinds as fk
from .family_colours import FAMILY_COLOURS, OTHER_COLOURS, family_of, grey_shades, palette_for, shades

__all__ = ["figure_mapping", "panel_family"]


def _level_values(df: pd.DataFrame, key: str, column: str) -> dict:
    """level of ``key`` -> its single value in ``column`` (levels with several values are left out)."""
    if column not in df.columns or key == column:
        return {}
    values = df.groupby(key, sort=False)[column].unique()
    return {lv: v[0] for lv, v in values.items() if len(v) == 1}


def _families(df: pd.DataFrame, key: str) -> dict:
    """level of ``key`` -> its family, from a ``family`` column when there is one, else from the level's name."""
    given = {lv: family_of(f) for lv, f in _level_values(df, key, "family").items()}
    return {lv: given.get(lv) or family_of(lv) for lv in pd.unique(df[key].dropna())}


def figure_mapping(df: pd.DataFrame, kind: str, spec: dict[str, Any], panel_families: list) -> fk.Mapping:
    """The colours, dashes and markers of one figure (see ``family_colours`` for the colour rules).

    Args:
        df: the figure's rows.
        kind: the figure kind.
        spec: the validated spec.
        panel_families: the family of each panel's rows (None where not one family), in panel order.
    """
    m = fk.Mapping()
    hue, style, x = spec.get("hue"), spec.get("style"), spec.get("x")
    pal = spec.get("palette")
    given = {str(k): v for k, v in pal.items()} if isinstance(pal, dict) else {}
    named = None if isinstance(pal, dict) else pal
    own = [f for f in dict.fromkeys(panel_families) if f]
    m.color = to_rgb(OTHER_COLOURS[0])
    m.family_colours = {f: to_rgb(FAMILY_COLOURS[f]) for f in own}
    if len(own) == 1 and len(set(panel_families)) == 1:
        m.color = m.family_colours[own[0]]
    if hue:
        m.hue_levels = fk.levels(df[hue], spec.get("hue_order"))
        m.hue_numeric = pd.api.types.is_numeric_dtype(df[hue]) and not pd.api.types.is_bool_dtype(df[hue])
        m.hue_integer = m.hue_numeric and fk.is_integral(df[hue])
        families = _families(df, hue)
        depths = _level_values(df, hue, "depth")
        if any(families.values()) or not (m.hue_numeric and own):
            m.palette = palette_for(m.hue_levels, families, depths, fallback=named, numeric=m.hue_numeric)
        else:
            # a numeric hue (depth, block) in panels of one family: that family's shades, dark = larger
            m.family_palettes = {f: dict(zip(m.hue_levels, shades(FAMILY_COLOURS[f], len(m.hue_levels))))
                                 for f in own}
            alone = len(own) == 1 and None not in panel_families
            m.palette = (m.family_palettes[own[0]] if alone else
                         dict(zip(m.hue_levels, grey_shades(len(m.hue_levels)))))
        for lv in m.hue_levels:
            if str(lv) in given:
                m.palette[lv] = given[str(lv)]
                for p in m.family_palettes.values():
                    p[lv] = given[str(lv)]
    if style:
        m.style_levels = fk.levels(df[style], spec.get("style_order"))
        dashes = spec.get("dashes") or {}
        m.dashes = {lv: tuple(dashes.get(str(lv), dashes.get(lv, fk.DEFAULT_DASHES[i % len(fk.DEFAULT_DASHES)])))
                    for i, lv in enumerate(m.style_levels)}
        m.markers = {lv: fk.DEFAULT_MARKERS[i % len(fk.DEFAULT_MARKERS)] for i, lv in enumerate(m.style_levels)}
    if kind in ("bar", "heatmap") or (x and not pd.api.types.is_numeric_dtype(df[x])):
        m.x_levels = fk.levels(df[x], spec.get("order") or spec.get("x_order"))
        x_families = _families(df, x)
        if kind == "bar" and not hue and any(x_families.values()):
            m.x_palette = palette_for(m.x_levels, x_families, _level_values(df, x, "depth"))
    m.spread = fk.spread_of(df, kind, spec)
    return m


def panel_family(rows: pd.DataFrame, facets: list) -> str | None:
    """The one family a panel's rows belong to (from ``family``, ``model`` or the facet values), or None."""
    for column in ("family", "model"):
        if column in rows.columns:
            found = {family_of(v) for v in pd.unique(rows[column].dropna())}
            if len(found) == 1:
                return found.pop()
    found = {family_of(v) for v in facets} - {None}
    return found.pop() if len(found) == 1 else None
