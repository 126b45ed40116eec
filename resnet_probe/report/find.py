"""Find the run folder a notebook reads: the one named by ``$RESNET_PROBE_RUN``, else the newest complete run.

Notebooks never retrain: they read a study's run folder. ``find_run("lesion")`` returns
``open_run($RESNET_PROBE_RUN)`` when that variable is set (and names a run of that study), otherwise
the newest complete ``lesion`` run under ``runs/`` or ``../runs/`` (the folders ``make demo`` writes
from the repository root, seen from the root or from ``notebooks/``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .run import Run, open_run

RUN_ENV = "RESNET_PROBE_RUN"


def find_run(study: str, roots: Sequence[str | Path] = ("runs", Path("..") / "runs")) -> Run:
    """The run of ``study`` to read (see the module docstring).

    Raises:
        ValueError: ``$RESNET_PROBE_RUN`` names a run of another study.
        FileNotFoundError: no complete run of ``study`` exists under ``roots``; says how to make one.
    """
    env = os.environ.get(RUN_ENV)
    if env:
        run = open_run(env)
        if run.study != study:
            raise ValueError(f"{RUN_ENV}={env} is a {run.study!r} run; this notebook reads {study!r} runs")
        return run
    folders = [p.parent for root in roots for p in (Path(root) / study).glob("*/status.json")]
    complete = [p for p in folders if open_run(p).state == "complete"]
    if not complete:
        raise FileNotFoundError(f"no complete {study} run under {', '.join(f'{r}/{study}/' for r in map(str, roots))}: "
                                f"run `make demo` or `resnet-probe {study}` first, or set {RUN_ENV} to a run folder")
    return open_run(max(complete, key=lambda p: p.name))  # folder names start with the date and time
