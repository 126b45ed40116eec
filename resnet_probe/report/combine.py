"""One report over several runs: the quickstart ends with a run whose report embeds its sub-studies.

The combined run keeps only links (paths relative to its own folder) to the sub-runs; its report
shows each sub-run's headline tables and figures, links to the full report, and carries the
synthetic-data banner when any sub-run used synthetic data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .run import Run

__all__ = ["combine_runs"]


def combine_runs(run: Run, children: Sequence[Run | str | Path], title: str | None = None) -> None:
    """Include the headlines and figures of ``children`` in ``run``'s report.

    Call before ``run.finish()``; the children should be finished runs (an unfinished one is shown
    with its state). Each child must be a run folder.

    Args:
        run: the combining run.
        children: sub-runs, as ``Run`` objects or run folder paths.
        title: title of the combined report (default: unchanged).

    Raises:
        RunFolderError: a child is not a run folder.
    """
    if isinstance(children, (str, Path, Run)):
        children = [children]
    for child in children:
        run.link_child(child)
    if title is not None:
        run.set_title(title)
