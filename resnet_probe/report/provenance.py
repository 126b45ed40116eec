"""Provenance of a run: what was run, with what, on what, from which data, and when.

``collect_provenance`` records the command line, the resolved config, package versions, the git
revision of the code (with a dirty flag), the data source as the study describes it, the hardware,
and the start time; ``finish_provenance`` adds the end time and wall time. ``is_synthetic`` decides
whether a report must carry the synthetic-data warning.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

__all__ = ["PACKAGES", "collect_provenance", "finish_provenance", "git_revision", "hardware",
           "package_versions", "is_synthetic", "jsonable"]

# distribution name -> name shown in reports (the import name)
PACKAGES = {"torch": "torch", "torchvision": "torchvision", "pytorch-lightning": "pytorch_lightning",
            "captum": "captum", "seaborn": "seaborn", "matplotlib": "matplotlib", "scipy": "scipy",
            "numpy": "numpy", "pandas": "pandas"}


def jsonable(obj: Any) -> Any:
    """``obj`` converted to plain JSON types (paths, tuples, numpy scalars, dataclasses become JSON)."""
    return json.loads(json.dumps(obj, default=_default))


def _default(o: Any) -> Any:
    if hasattr(o, "item") and callable(o.item) and getattr(o, "ndim", 1) == 0:
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)
                if isinstance(getattr(o, f.name), (str, int, float, bool, type(None), Path))}
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    return str(o)


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages the results depend on (``None`` when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist, shown in PACKAGES.items():
        try:
            out[shown] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[shown] = None
    return out


def git_revision(folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """Git commit and dirty flag of the repository holding ``folder`` (default: this package's checkout).

    Returns:
        ``{"revision": sha or None, "dirty": bool or None, "note": why missing}`` plus the
        repository's ``root`` when there is one.
    """
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parents[2]
    if folder.is_file():
        folder = folder.parent

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "git failed")
        return res.stdout.strip()

    try:
        root = git("rev-parse", "--show-toplevel")
        revision = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except FileNotFoundError:
        return {"revision": None, "dirty": None, "note": "git is not installed"}
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        note = "not a git repository" if "not a git repository" in str(e).lower() else str(e)
        return {"revision": None, "dirty": None, "note": note}
    return {"revision": revision, "dirty": dirty, "note": None, "root": root}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def hardware() -> dict[str, Any]:
    """CPU model, logical cores, RAM (GiB), OS, and the CUDA devices when torch sees any.

    CUDA is queried through torch only when the process has already imported torch (every study
    that can use a GPU has), so writing a report never pays for importing it; a run without CUDA
    records ``gpu: None``.
    """
    out: dict[str, Any] = {"cpu": _cpu_model(), "cores": os.cpu_count(), "ram_gib": _ram_gib(),
                           "platform": platform.platform(), "gpu": None, "gpu_count": 0, "cuda": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        n = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_count=n, cuda=torch.version.cuda,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return out


def _study_git(source_file: str | os.PathLike | None) -> dict[str, Any] | None:
    """The study script's repository when it is not this package's checkout, else ``None``."""
    if source_file is None:
        return None
    study, package = git_revision(source_file), git_revision()
    if study.get("root") is not None and study.get("root") == package.get("root"):
        return None
    return study


def is_synthetic(data: Mapping[str, Any] | None) -> bool:
    """Whether a data-source description says the data is synthetic (``synthetic: true`` or ``kind: synthetic``)."""
    if not data:
        return False
    return bool(data.get("synthetic")) or str(data.get("kind", "")).lower() == "synthetic"


def collect_provenance(config: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None,
                       argv: list[str] | None = None, source_file: str | os.PathLike | None = None
                       ) -> dict[str, Any]:
    """Everything known about a run at its start.

    Args:
        config: the study's resolved configuration.
        data: the data source description (e.g. ``DataSource.provenance()``).
        argv: the command line (default ``sys.argv``).
        source_file: the study script; its repository is recorded too when it is not the package's.

    Returns:
        A JSON-ready dict with ``command, argv, cwd, config, packages, git`` (this package's checkout),
        ``study_git`` (the script's repository if different, else None), ``data, hardware, started``.
    """
    argv = list(sys.argv if argv is None else argv)
    return jsonable({
        "command": " ".join([Path(sys.executable).name, *argv]),
        "argv": argv,
        "cwd": os.getcwd(),
        "config": dict(config or {}),
        "packages": package_versions(),
        "git": git_revision(),
        "study_git": _study_git(source_file),
        "data": dict(data) if data is not None else None,
        "hardware": hardware(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "started_unix": time.time(),
        "finished": None,
        "wall_s": None,
    })


def finish_provenance(prov: dict[str, Any]) -> dict[str, Any]:
    """Return ``prov`` with the end time and the wall time since its start."""
    now = time.time()
    out = dict(prov)
    if not (out.get("hardware") or {}).get("gpu"):
        out["hardware"] = hardware()  # torch may have been imported (and CUDA used) after the run began
    out["finished"] = datetime.now().astimezone().isoformat(timespec="seconds")
    out["wall_s"] = round(now - float(prov.get("started_unix", now)), 3)
    return out
