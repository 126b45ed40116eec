"""Atomic file writing: a reader sees either the old file or the complete new one, never half of it.

Every output of the toolkit (tables, figures, reports, checkpoints' side files) is written to a
temporary file in the destination folder and moved over the destination with ``os.replace``, which
is atomic on POSIX and Windows when both paths are on the same file system. If the writer raises,
including ``KeyboardInterrupt``, the temporary file is removed and the destination is untouched.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_csv"]


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary files are created private (0600); finished files get the usual permissions instead.
_FILE_MODE = 0o666 & ~_read_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on failure it is removed.

    The temporary name keeps the destination's suffix (``.png``, ``.csv``, ``.gz``) so writers that
    infer a format from the extension (``savefig``, ``to_csv(compression="infer")``) behave the same.

    Args:
        path: the destination file. Its folder must exist.

    Yields:
        The temporary path to write to (it exists and is empty).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: destination file.
        data: the complete contents.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically.

    Args:
        path: destination file.
        text: the complete contents.
        encoding: text encoding.

    Returns:
        ``path`` as a ``Path``.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_csv(df: "pd.DataFrame", path: str | os.PathLike, **to_csv_kwargs: Any) -> Path:
    """Write a DataFrame as CSV atomically (without its index unless ``index=True`` is passed).

    Args:
        df: the table.
        path: destination file; compression is inferred from its suffix.
        **to_csv_kwargs: passed to ``DataFrame.to_csv``.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    to_csv_kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **to_csv_kwargs)
    return path
