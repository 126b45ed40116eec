"""Run folders on disk: where each file lives, how a new folder is made, and how one is read back.

A run folder ``<out>/<study>/<YYYYmmdd-HHMMSS>-<id>/`` holds::

    status.json       {"state": "running" | "complete" | "failed" | "interrupted", "error", "started",
                       "finished", "pid", "host", "pid_start", "heartbeat"}
    report.json       tables (file, dtypes), figure specs, texts, headlines, combined sub-runs
    provenance.json   command, config, packages, git, data source, hardware, times
    tables/*.csv      tidy long tables
    figures/*.png     figures drawn from the tables
    source/           the study script, copied at the start
    report.md, report.html

A folder is created with ``exist_ok=False`` (a fresh random id is tried on a clash), so a run never
writes into another run's folder. ``status.json`` says ``running`` until the study finishes; a
study killed outright leaves it so, and ``liveness`` finds out that its process is gone.
"""
from __future__ import annotations

import json
import secrets
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text

__all__ = ["RunFolderError", "STATES", "STATUS", "REPORT", "PROVENANCE", "make_run_dir", "read_json",
           "write_json", "check_run_dir"]

STATUS, REPORT, PROVENANCE = "status.json", "report.json", "provenance.json"
STATES = ("running", "complete", "failed", "interrupted")


class RunFolderError(OSError):
    """A run folder cannot be created, is not a run folder, or one of its files is unreadable."""


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file of a run folder, raising ``RunFolderError`` naming the file when it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing: {Path(path).parent} is not a complete run folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is not valid JSON ({e})") from None


def check_run_dir(path: str | Path) -> Path:
    """Return ``path`` if it is a run folder (a directory with ``report.json``), else raise ``RunFolderError``."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise RunFolderError(f"{path} is not a directory; expected a run folder such as runs/<study>/<run-id>")
    if not (path / REPORT).is_file():
        raise RunFolderError(f"{path} is not a run folder: it has no {REPORT} "
                             "(expected a folder written by resnet_probe.report.new_run)")
    return path


def _first_missing(path: Path) -> Path | None:
    """The outermost ancestor of ``path`` (or ``path`` itself) that does not exist yet."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def make_run_dir(out: str | Path, study: str, attempts: int = 50) -> Path:
    """Create a new, empty run folder ``out/study/<YYYYmmdd-HHMMSS>-<6 hex>`` and return it.

    Raises:
        RunFolderError: the output folder cannot be created or written (the message names it);
            folders this call created are removed again.
    """
    base = Path(out) / study
    created_root = _first_missing(base)
    try:
        base.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for _ in range(attempts):
            candidate = base / f"{stamp}-{secrets.token_hex(3)}"
            try:
                candidate.mkdir(exist_ok=False)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free run folder name under {base} after {attempts} attempts")
        try:
            for sub in ("tables", "figures"):
                (candidate / sub).mkdir()
            probe = candidate / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            _remove_tree(candidate)
            raise
        return candidate
    except OSError as e:
        if created_root is not None:
            _remove_empty_dirs(base, created_root)
        reason = e.strerror or str(e)
        raise RunFolderError(f"cannot create a run folder under {base}: {reason} "
                             f"({type(e).__name__} at {e.filename or base}); choose a writable output folder") from e


def _remove_empty_dirs(deepest: Path, root: Path) -> None:
    """Remove ``deepest`` and its parents up to ``root`` while they are empty (another run may own them)."""
    for p in [deepest, *deepest.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == root:
            return


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
