"""Re-draw a run's figures and rewrite its reports from the run folder alone (tables + report.json).

``resnet-probe report RUN_DIR`` (and ``python -m resnet_probe.report RUN_DIR``) call ``rebuild_main``:
no model, no GPU and no torch import is needed, only the saved tables, specs and provenance. The
run's status is left as it is. The command refuses (exit status 1) a run that is not complete --
still running, failed, interrupted, or marked running by a process that is gone -- unless given
``--allow-incomplete``, which rebuilds it into a report marked incomplete. Every table must still
have the row count ``report.json`` recorded when it was saved.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .figures import draw_figure
from .folder import RunFolderError
from .liveness import incomplete_reason
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
        RunFolderError: ``run_dir`` is missing or not a run folder, or a table differs from the one saved.
        FigureError: a figure cannot be drawn from its saved table.
    """
    run = open_run(run_dir)
    for name in run.tables:  # each against its recorded row count, figure or not: the report lists them all
        run.table(name)
    draw_all(run)
    return run.write_report()


def rebuild_main(argv: list[str] | None = None) -> int:
    """Command line: ``resnet-probe report RUN_DIR [RUN_DIR ...]``; prints each report's path.

    Args:
        argv: the arguments after ``report`` (default ``sys.argv[1:]``).

    Returns:
        0 when every report was rebuilt; 1 when a run that is not complete was refused (the others
        are rebuilt). A bad run folder or table exits with status 2 and a message naming it.
    """
    parser = argparse.ArgumentParser(
        prog="resnet-probe report",
        description="Re-draw every figure and rewrite report.md / report.html of run folders from their saved "
                    "tables and report.json (no model or GPU needed).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder, e.g. runs/degradation/<run-id>")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="also rebuild a run that is running, failed, interrupted or whose process is gone "
                             "(its report is marked incomplete); without it such a run is refused, exit status 1")
    args = parser.parse_args(argv)
    refused = 0
    for run_dir in args.run_dirs:
        try:
            run = open_run(run_dir)
            reason = incomplete_reason(run.path, run.status)
            if reason and not args.allow_incomplete:
                print(f"resnet-probe report: {reason}. Not rebuilt; pass --allow-incomplete to rebuild its "
                      "report anyway, marked incomplete", file=sys.stderr, flush=True)
                refused += 1
                continue
            if reason:
                print(f"resnet-probe report: warning: {reason}; its report is marked incomplete",
                      file=sys.stderr, flush=True)
            html_path = rebuild(run.path)
        except (RunFolderError, FigureError) as e:
            parser.error(str(e))
        print(f"report: {html_path} (markdown: {html_path.with_suffix('.md')})", flush=True)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(rebuild_main())
