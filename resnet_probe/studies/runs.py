"""A study's run folder: its resolved configuration, the command that re-runs it, and what it returns.

``study_run`` opens a new run folder (``resnet_probe.report.new_run``) for a study and writes
``config.yaml`` into it: the study's settings and inputs in the form its command line reads, so
``resnet-probe STUDY --config RUN/config.yaml`` (recorded in the provenance as ``command``)
repeats the run into a new folder. A study returns a ``StudyResult``: the run folder and its
tables as DataFrames (and the trained models, for studies that train), which other studies take
directly.
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import pandas as pd
import yaml
from tqdm.auto import tqdm

from ..report import Run, new_run
from ..report.provenance import jsonable
from ..train.fit import progress_wanted
from .inputs import absolute_if_path

__all__ = ["CONFIG_FILE", "StudyResult", "progress", "settings_dict", "study_config", "study_run"]

CONFIG_FILE = "config.yaml"
T = TypeVar("T")


@dataclass(eq=False)
class StudyResult:
    """What a study returns.

    Attributes:
        path: its run folder.
        tables: every table it saved, by name.
        zoo: the models it trained (``train_zoo``, and studies that trained their own nets), else ``None``.
    """

    path: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    zoo: Any = None


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass (nested ones included) as plain YAML / JSON values (tuples become lists)."""
    return jsonable(dataclasses.asdict(settings)) if settings is not None else None


def study_config(*, models: Sequence[str | None] = (), data: str | None = None, seeds: Iterable[int] = (0,),
                 device: str = "auto", out: str | Path = "runs", scale: str | None = None, settings: Any = None,
                 train: Any = None) -> dict[str, Any]:
    """The configuration a study records: the keys of its command line (``resnet_probe.studies.command``).

    Files and folders (model sources, the data path of ``pack=`` / ``imagefolder=``, ``out``) are
    recorded as absolute paths, so the recorded command and the notebooks re-open them from any
    working directory.
    """
    config: dict[str, Any] = {"models": [absolute_if_path(m) if m is not None else None for m in models],
                              "data": _absolute_data_spec(data), "seeds": [int(s) for s in seeds],
                              "device": device, "out": str(Path(out).resolve()), "scale": scale,
                              "settings": settings_dict(settings)}
    if train is not None:
        config["train"] = settings_dict(train)
    return config


def _absolute_data_spec(spec: str | None) -> str | None:
    """``pack=PATH`` / ``imagefolder=PATH`` with PATH made absolute when it exists; other specs unchanged."""
    if spec is None or "=" not in spec:
        return spec
    kind, path = spec.split("=", 1)
    return f"{kind}={absolute_if_path(path)}"


def study_run(study: str, config: dict[str, Any], *, title: str, data: dict[str, Any] | None,
              source_file: str) -> Run:
    """A new run folder for ``study`` with its ``config.yaml`` and the command that re-runs it.

    A model handed over in memory (no source) cannot be re-created by a command; the provenance says so.
    """
    run = new_run(study, out=config["out"], config=config, data=data, source_file=source_file, title=title)
    path = run.path / CONFIG_FILE
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    if any(m is None for m in config.get("models", ())):
        command = "not re-runnable from the command line: some models were given in memory, not as files"
    else:
        command = shlex.join(["resnet-probe", study, "--config", str(path)])
    run.set_command(command)
    return run


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``items`` with a progress bar on stderr when it is a terminal (tqdm), plainly otherwise."""
    return iter(tqdm(items, desc=desc, total=total, disable=not progress_wanted(), leave=False, dynamic_ncols=True))
