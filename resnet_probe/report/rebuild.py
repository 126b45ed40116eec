"""Re-draw a run's figures and rewrite its reports from the run folder alone (tables + report.json).

``resnet-probe report RUN_DIR`` (and ``python -m resnet_probe.report RUN_DIR``) call ``rebuild_main``:
no model, no GPU and no torch import is needed, only the saved tables, specs and provenance. The
run's status is left as it is, so rebuilding an interrupted run gives a report marked incomplete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .figures import draw_figure
from .folder import RunFolderError
from .run import Run, open_run

__all__ = ["draw_all", "rebuild", "rebuild_main"]


class FigureError(RuntimeError):
    """A declared figure could not be drawn from its table."""


def draw_all(run: Run) -> list[Path]:
    """Draw every declared figure of ``run`` from its table as saved on disk.

    Returns:
        The PNG paths, in declaration order.

    Raises:
        FigureError: naming the figure, its kind and its table.
    """
    paths = []
    for fig in run.figures:
        path = run.path / "figures" / f"{fig['name']}.png"
        try:
            df = run.table(fig["table"])
            paths.append(draw_figure(df, fig["kind"], fig["spec"], path, name=f"figure {fig['name']!r}"))
        except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
            raise FigureError(f"figure {fig['name']!r} ({fig['kind']} from table {fig['table']!r}) "
                              f"in {run.path}: {e}") from e
    return paths


def rebuild(run_dir: str | Path) -> Path:
    """Re-draw all figures of a run folder and rewrite report.md / report.html, atomically.

    Args:
        run_dir: a run folder written by ``new_run``.

    Returns:
        The path of ``report.html``.

    Raises:
        RunFolderError: ``run_dir`` is missing or not a run folder.
        FigureError: a figure cannot be drawn from its saved table.
    """
    run = open_run(run_dir)
    draw_all(run)
    return run.write_report()


def rebuild_main(argv: list[str] | None = None) -> int:
    """Command line: ``resnet-probe report RUN_DIR [RUN_DIR ...]``; prints each report's path.

    Args:
        argv: the arguments after ``report`` (default ``sys.argv[1:]``).

    Returns:
        0 on success; a bad run folder exits with status 2 and a message naming it.
    """
    parser = argparse.ArgumentParser(
        prog="resnet-probe report",
        description="Re-draw every figure and rewrite report.md / report.html of run folders from their saved "
                    "tables and report.json (no model or GPU needed).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder, e.g. runs/degradation/<run-id>")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        try:
            html_path = rebuild(run_dir)
        except (RunFolderError, FigureError) as e:
            parser.error(str(e))
        print(f"report: {html_path} (markdown: {html_path.with_suffix('.md')})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(rebuild_main())
