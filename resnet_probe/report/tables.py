"""Tidy long tables: the one form in which every study saves its measurements.

A tidy table has one measurement per row. It must have a ``metric`` column (what was measured, e.g.
``response_std``, ``val_error``) and a numeric ``value`` column; the recommended identifying columns
are ``run, seed, model, site, metric, value, step`` and studies add others as needed (``split``,
``depth``, ``k``, ``lo``, ``hi``). Tables are written as CSV with the column dtypes recorded beside
them, so reading a table back gives the same frame that was saved.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import atomic_write_csv
from .folder import RunFolderError

__all__ = ["TIDY_REQUIRED", "TIDY_RECOMMENDED", "check_name", "validate_tidy", "write_table", "read_table"]

TIDY_REQUIRED = ("metric", "value")
TIDY_RECOMMENDED = ("run", "seed", "model", "site", "metric", "value", "step")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DTYPES = ("int64", "float64", "bool", "object", "string")


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is a safe file stem (letters, digits, ``_ . -``), else raise ``ValueError``."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith("."):
        raise ValueError(f"{what} name {name!r} must be letters, digits, '_', '.' or '-' "
                         "(starting with a letter or digit)")
    return name


def validate_tidy(df: pd.DataFrame, name: str = "table") -> pd.DataFrame:
    """Check that ``df`` is a tidy long table and return it with a plain 0..n-1 index.

    Rules: string column names, unique; no MultiIndex; a non-empty ``metric`` column without
    missing entries; a numeric ``value`` column (NaN allowed for a measurement that failed); every
    other column of a simple type (numbers, booleans, strings).

    Args:
        df: the candidate table.
        name: its name, used in error messages.

    Returns:
        The validated table (index reset; ``value`` as float64).
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"table {name!r} must be a pandas DataFrame, got {type(df).__name__}")
    if isinstance(df.columns, pd.MultiIndex):
        raise ValueError(f"table {name!r} has MultiIndex columns; tidy tables are long: "
                         f"one row per measurement with columns such as {', '.join(TIDY_RECOMMENDED)}")
    if isinstance(df.index, pd.MultiIndex) or df.index.name is not None:
        raise ValueError(f"table {name!r} has a named index {list(df.index.names)}; "
                         "call df.reset_index() so it becomes columns")
    cols = list(df.columns)
    bad = [c for c in cols if not isinstance(c, str)]
    if bad:
        raise ValueError(f"table {name!r} has non-string column names {bad}")
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise ValueError(f"table {name!r} has duplicate columns {dup}")
    missing = [c for c in TIDY_REQUIRED if c not in cols]
    if missing:
        raise ValueError(f"table {name!r} is not tidy: missing column(s) {missing}; it has {cols}. "
                         f"A tidy table needs {list(TIDY_REQUIRED)} and usually {list(TIDY_RECOMMENDED)}: "
                         "melt wide tables with df.melt(id_vars=..., var_name='metric', value_name='value')")
    if len(df) == 0:
        raise ValueError(f"table {name!r} is empty")
    if df["metric"].isna().any():
        raise ValueError(f"table {name!r} has rows without a metric")
    if not (pd.api.types.is_numeric_dtype(df["value"]) and not pd.api.types.is_bool_dtype(df["value"])):
        raise ValueError(f"table {name!r}: column 'value' must be numeric, got dtype {df['value'].dtype}")
    out = df.reset_index(drop=True).copy()
    out["value"] = out["value"].astype(np.float64)
    for c in cols:
        kind = _dtype_name(out[c])
        if kind is None:
            raise ValueError(f"table {name!r}: column {c!r} has dtype {out[c].dtype}; "
                             f"use numbers, booleans or strings")
        if kind == "object":
            values = out[c].astype(object)
            out[c] = values.where(values.isna(), values.map(str))
    return out


def _dtype_name(s: pd.Series) -> str | None:
    if pd.api.types.is_bool_dtype(s):
        return "bool"
    if pd.api.types.is_integer_dtype(s):
        return "int64"
    if pd.api.types.is_float_dtype(s):
        return "float64"
    if pd.api.types.is_string_dtype(s) or isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object:
        return "object"
    return None


def write_table(df: pd.DataFrame, path: Path, name: str) -> dict[str, Any]:
    """Validate ``df`` and write it atomically to ``path`` as CSV.

    Returns:
        The table's record for ``report.json``: file name, column dtypes and row count.
    """
    df = validate_tidy(df, name)
    atomic_write_csv(df, path)
    return {"file": f"tables/{path.name}", "dtypes": {c: _dtype_name(df[c]) for c in df.columns},
            "rows": int(len(df))}


def read_table(path: Path, dtypes: dict[str, str] | None = None, rows: int | None = None) -> pd.DataFrame:
    """Read a table written by ``write_table``, restoring the recorded column dtypes.

    Args:
        path: the CSV file.
        dtypes: column -> one of ``int64, float64, bool, object`` (from ``report.json``).
        rows: the row count recorded when the table was written; a file with another count, or one
            cut off inside its last line, is refused.

    Returns:
        The table.

    Raises:
        FileNotFoundError: no such file.
        RunFolderError: the file is not the table that was written (cut off, rows lost or added, unreadable).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table file {path} does not exist")
    changed = "it changed after the run wrote it; restore it, or re-run the study"
    if rows is not None:
        with open(path, "rb") as f:
            f.seek(max(path.stat().st_size - 1, 0))
            if f.read(1) != b"\n":  # write_table ends every file with a line break
                raise RunFolderError(f"table file {path} is cut off inside its last line: {changed}")
    dtypes = dict(dtypes or {})
    text_cols = {c: str for c, d in dtypes.items() if d in ("object", "string")}
    try:
        df = pd.read_csv(path, dtype=text_cols or None, keep_default_na=False, na_values=[""],
                         float_precision="round_trip")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise RunFolderError(f"table file {path} cannot be read as CSV ({e})") from None
    if rows is not None and len(df) != rows:
        raise RunFolderError(f"table file {path} has {len(df)} rows but report.json recorded {rows} "
                             f"when the table was saved: {changed}")
    for c, d in dtypes.items():
        if c not in df.columns or d not in _DTYPES:
            continue
        if d == "object":
            df[c] = df[c].astype(object).where(df[c].notna(), None)
        elif d == "bool":
            df[c] = df[c].astype(bool)
        elif d == "int64" and not df[c].isna().any():
            df[c] = df[c].astype(np.int64)
        elif d == "float64":
            df[c] = df[c].astype(np.float64)
    return df
