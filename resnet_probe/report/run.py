"""A study's run: a new folder that collects tidy tables, figure specs, texts and headlines, then a report.

Every change is saved at once (tables as CSV, the rest in ``report.json``), atomically, so a run
that dies keeps what it had measured and ``resnet-probe report RUN_DIR`` can still draw it.
``finish()`` draws every figure from the tables on disk, writes the reports, marks the run
complete and prints where the report is.

``status.json`` names the writing process (pid, host, start time) and the time of its last save
(``heartbeat``), so a run killed outright can be told from one still running (see ``liveness``).
Inside ``with new_run(...) as run:`` the main thread handles SIGTERM like SIGINT (see
``interrupt``): the run is marked ``interrupted``; the previous handler is restored on exit.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .figures import select_rows, validate_figure
from .folder import (PROVENANCE, REPORT, STATES, STATUS, RunFolderError, check_run_dir, make_run_dir, read_json,
                     write_json)
from .interrupt import RunFailed, RunTerminated, install_sigterm, interrupted, restore_sigterm
from .liveness import process_identity, writer_alive
from .provenance import collect_provenance, finish_provenance, jsonable
from .render import render_report
from .tables import check_name, read_table, write_table

__all__ = ["Run", "new_run", "open_run"]

REPORT_FORMAT = 1


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class Run:
    """One run folder of a study. Make one with ``new_run`` (new folder) or ``open_run`` (existing one).

    Attributes:
        path: the run folder.
        study: the study's name.
    """

    def __init__(self, path: Path, state: dict, provenance: dict, status: dict, *, writer: bool = False):
        self.path = Path(path)
        self._state = state
        self._prov = provenance
        self._status = status
        self._cache: dict[str, pd.DataFrame] = {}
        self._writer = writer        # made by new_run in this process: its saves are the run's heartbeat
        self._terminated = False     # SIGTERM received inside the with block
        self._ending = False         # being marked failed / interrupted
        self._sigterm_before = None  # the SIGTERM handler to restore on exit, while ours is installed

    # ---- reading -------------------------------------------------------------------------------
    @property
    def study(self) -> str:
        return self._state["study"]

    @property
    def state(self) -> str:
        """``running``, ``complete``, ``failed`` or ``interrupted``."""
        return self._status["state"]

    @property
    def status(self) -> dict[str, Any]:
        """The content of ``status.json``: state, error, started, finished, pid, host, pid_start, heartbeat."""
        return dict(self._status)

    @property
    def tables(self) -> list[str]:
        """Names of the saved tables."""
        return list(self._state["tables"])

    @property
    def figures(self) -> list[dict[str, Any]]:
        """The figure declarations (name, kind, table, spec, section, caption)."""
        return [dict(f) for f in self._state["figures"]]

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._prov)

    def table(self, name: str) -> pd.DataFrame:
        """Read a saved table back from disk (same columns, dtypes and values as were added)."""
        if name not in self._state["tables"]:
            raise KeyError(f"no table {name!r} in {self.path}; tables: {self.tables}")
        if name not in self._cache:
            rec = self._state["tables"][name]
            self._cache = {name: read_table(self.path / rec["file"], rec["dtypes"], rows=rec.get("rows"))}
        return self._cache[name].copy()

    # ---- writing -------------------------------------------------------------------------------
    def _save(self) -> None:
        write_json(self.path / REPORT, self._state)
        if self._writer:  # a Run opened with open_run must not write back a status it read earlier
            self._write_status(self._status)

    def _write_status(self, status: dict) -> None:
        """Write ``status`` to ``status.json`` with the time of this save as its ``heartbeat``."""
        self._status = {**status, "heartbeat": _now()}
        write_json(self.path / STATUS, self._status)

    def add_table(self, name: str, df: pd.DataFrame) -> Path:
        """Save a tidy long table as ``tables/<name>.csv`` (adding the same name again replaces it).

        Args:
            name: file-safe table name.
            df: tidy table with at least ``metric`` and a numeric ``value`` column (see ``tables.py``).

        Returns:
            The CSV path.
        """
        check_name(name, "table")
        path = self.path / "tables" / f"{name}.csv"
        self._cache.pop(name, None)
        self._state["tables"][name] = write_table(df, path, name)
        self._save()
        return path

    def add_figure(self, name: str, kind: str, table: str, *, section: str | None = None,
                   caption: str | None = None, **spec: Any) -> None:
        """Declare a figure drawn from a saved table at ``finish()`` (and by ``resnet-probe report``).

        Args:
            name: file-safe figure name (``figures/<name>.png``); declaring it again replaces it.
            kind: one of ``FIGURE_KINDS`` (line, bar, scatter, heatmap, layer_profile, contour).
            table: name of a table already added.
            section: report section to place it in (default: a "Figures" section).
            caption: text under the figure (default: its title).
            **spec: the figure spec, e.g. ``x="step", y="value", hue="model", query="metric == 'val_error'"``.
        """
        check_name(name, "figure")
        if table not in self._state["tables"]:
            raise KeyError(f"figure {name!r}: no table {table!r}; add it first. Tables: {self.tables}")
        df = self.table(table)
        spec = validate_figure(kind, spec, list(df.columns))
        select_rows(df, spec, f"figure {name!r}")
        fig = {"name": name, "kind": kind, "table": table, "spec": spec, "section": section, "caption": caption}
        self._state["figures"] = [f for f in self._state["figures"] if f["name"] != name] + [fig]
        self._save()

    def add_text(self, section: str, markdown: str) -> None:
        """Append Markdown text to a report section (sections appear in the order first used)."""
        if not section or not isinstance(section, str):
            raise ValueError("add_text needs a section name")
        self._state["texts"].append({"section": section, "markdown": str(markdown)})
        self._save()

    def add_headline(self, content: pd.DataFrame | str, *, title: str | None = None) -> None:
        """Add a headline item shown at the top of the report: a (wide) DataFrame or Markdown text.

        Numbers with uncertainty are best pre-formatted with ``format_ci`` / ``format_mean_std``.
        """
        if isinstance(content, pd.DataFrame):
            df = content.reset_index() if content.index.name is not None else content
            item = {"kind": "table", "title": title, "columns": [str(c) for c in df.columns],
                    "rows": jsonable(df.astype(object).where(df.notna(), None).values.tolist())}
        elif isinstance(content, str):
            item = {"kind": "markdown", "title": title, "markdown": content}
        else:
            raise TypeError(f"headline must be a DataFrame or Markdown text, got {type(content).__name__}")
        self._state["headlines"].append(item)
        self._save()

    def set_data(self, description: Mapping[str, Any]) -> None:
        """Record the data source (e.g. ``DataSource.provenance()``); ``synthetic: True`` adds a warning banner."""
        self._prov["data"] = jsonable(dict(description))
        write_json(self.path / PROVENANCE, self._prov)
        if self._writer:
            self._write_status(self._status)

    def set_command(self, command: str) -> None:
        """Record the command that repeats this run (shown in the report's provenance)."""
        self._prov["command"] = str(command)
        write_json(self.path / PROVENANCE, self._prov)

    def set_title(self, title: str) -> None:
        """Set the report's title (default: the study name)."""
        self._state["title"] = str(title)
        self._save()

    def mark(self, state: str, error: str | None = None) -> None:
        """Record the run's state in ``status.json`` (``running``, ``complete``, ``failed``, ``interrupted``)."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; valid: {STATES}")
        self._write_status({**self._status, "state": state, "error": error})

    def link_child(self, child: "Run | str | Path", title: str | None = None) -> None:
        """Show another run's headlines and figures in this run's report (see ``combine_runs``)."""
        child_path = check_run_dir(child.path if isinstance(child, Run) else Path(child)).resolve()
        if child_path == self.path.resolve():
            raise ValueError(f"a run cannot include itself ({self.path})")
        rel = Path(os.path.relpath(child_path, self.path.resolve())).as_posix()
        entry = {"path": rel, "title": title}
        self._state["children"] = [c for c in self._state["children"] if c["path"] != rel] + [entry]
        self._save()

    def write_report(self) -> Path:
        """Rewrite report.md / report.html from the saved state and figures, leaving the status as it is.

        Returns:
            The path of ``report.html``.
        """
        status = dict(self._status)
        if status.get("state") == "running" and writer_alive(status) is False:  # shown, not recorded
            status["error"] = (f"the process that wrote it is gone (pid {status['pid']} on host {status['host']}, "
                               f"last saved {status.get('heartbeat')})")
        return render_report(self.path, self._state, self._prov, status)[1]

    def finish(self) -> Path:
        """Draw every figure from the saved tables, write report.md / report.html, mark the run complete.

        Prints the report's path and returns it (``report.html``).
        """
        from .rebuild import draw_all  # rebuild.py imports this module
        try:
            draw_all(self)
            self._prov = finish_provenance(self._prov)
            write_json(self.path / PROVENANCE, self._prov)
            status = {**self._status, "state": "complete", "error": None, "finished": self._prov["finished"]}
            _, html_path = render_report(self.path, self._state, self._prov, status)
        except BaseException as e:
            self._mark_ended_by(e)
            raise
        self._write_status(status)
        print(f"report: {html_path} (markdown: {html_path.with_suffix('.md')})", flush=True)
        return html_path

    def _mark_ended_by(self, exc: BaseException) -> None:
        """Mark the run ``interrupted`` (SIGINT, SIGTERM) or ``failed`` by ``exc`` (always ``failed`` for a
        ``RunFailed``)."""
        self._ending = True  # a SIGTERM arriving now (torchrun stopping a sharded run) does not cut the marking short
        error = f"{type(exc).__name__}: {exc}"
        if self._terminated and not isinstance(exc, (RunTerminated, RunFailed)):
            error = f"received SIGTERM ({error})"
        failed = isinstance(exc, RunFailed) or not (self._terminated or interrupted(exc))
        self.mark("failed" if failed else "interrupted", error)

    def _on_sigterm(self, signum: int, frame) -> None:
        if self._terminated or self._ending:  # the run is already being marked: a SIGTERM does not cut that short
            return
        self._terminated = True
        raise RunTerminated(f"received {signal.Signals(signum).name}")

    def __enter__(self) -> "Run":
        if self._sigterm_before is None:
            self._sigterm_before = install_sigterm(self._on_sigterm)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                if self.state != "complete":
                    self.finish()
            else:
                self._mark_ended_by(exc)
        finally:
            restore_sigterm(self._sigterm_before)
            self._sigterm_before = None
        return False

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, state={self.state!r})"


def new_run(study: str, out: str | Path = "runs", config: Mapping[str, Any] | None = None, *,
            data: Mapping[str, Any] | None = None, source_file: str | Path | None = None,
            title: str | None = None, argv: list[str] | None = None) -> Run:
    """Create a new run folder ``out/<study>/<YYYYmmdd-HHMMSS>-<id>`` and record its provenance.

    Args:
        study: the study's name (file-safe, e.g. ``"degradation"``).
        out: root of all run folders.
        config: the resolved configuration (hyperparameters with units, scale, seeds).
        data: data source description; ``synthetic: True`` (or ``kind: "synthetic"``) puts a warning
            banner on the report. Can also be given later with ``Run.set_data``.
        source_file: the study script (usually ``__file__``); copied into ``source/``.
        title: report title (default: the study name).
        argv: command line to record (default ``sys.argv``).

    Returns:
        The ``Run``; its ``status.json`` says ``running`` until ``finish()``.

    Raises:
        RunFolderError: the output folder cannot be written (the message names it).
    """
    check_name(study, "study")
    if source_file is not None and not Path(source_file).is_file():
        raise FileNotFoundError(f"source_file {source_file} does not exist")
    path = make_run_dir(out, study)
    try:
        prov = collect_provenance(config, data, argv, source_file)
        if source_file is not None:
            src = Path(source_file)
            (path / "source").mkdir()
            dest = path / "source" / src.name
            shutil.copy2(src, dest)
            prov["source"] = {"file": f"source/{src.name}", "original": str(src.resolve()),
                              "sha256": hashlib.sha256(dest.read_bytes()).hexdigest()}
        status = {"state": "running", "error": None, "started": prov["started"], "finished": None,
                  **process_identity(), "heartbeat": prov["started"]}
        state = {"format": REPORT_FORMAT, "study": study, "title": title or study, "tables": {}, "figures": [],
                 "texts": [], "headlines": [], "children": []}
        write_json(path / STATUS, status)
        write_json(path / PROVENANCE, prov)
        write_json(path / REPORT, state)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return Run(path, state, prov, status, writer=True)


def open_run(path: str | Path) -> Run:
    """Open an existing run folder (to read its tables, add to it, or re-draw its report).

    Raises:
        RunFolderError: ``path`` is missing or not a run folder, or its JSON files are corrupt.
    """
    path = check_run_dir(path)
    state = read_json(path / REPORT)
    if not isinstance(state, dict) or "study" not in state:
        raise RunFolderError(f"{path / REPORT} is not a report state written by resnet_probe.report")
    for key, empty in (("tables", {}), ("figures", []), ("texts", []), ("headlines", []), ("children", [])):
        state.setdefault(key, empty)
    prov = read_json(path / PROVENANCE) if (path / PROVENANCE).is_file() else {}
    status = read_json(path / STATUS) if (path / STATUS).is_file() else {"state": "unknown", "error": None}
    return Run(path, state, prov, status)
