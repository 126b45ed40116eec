"""A run folder's state is true: SIGTERM marks it interrupted, a killed writer is found out, and
``resnet-probe report`` refuses incomplete runs and tables changed after the run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from resnet_probe.cli import main
from resnet_probe.report import RunFolderError, RunTerminated, new_run, open_run, rebuild_main
from resnet_probe.report.liveness import process_identity, writer_alive

ROOT = Path(__file__).resolve().parents[1]

# A study reduced to what matters here: it opens its run, saves a table and a figure, and works on.
STUDY = textwrap.dedent('''
    import pathlib, sys, time
    import pandas as pd
    from resnet_probe.report import new_run

    out, ready = sys.argv[1], pathlib.Path(sys.argv[2])
    with new_run("sleeper", out=out) as run:
        run.add_table("curve", pd.DataFrame({"metric": "error", "step": range(5),
                                             "value": [0.9, 0.7, 0.5, 0.4, 0.35]}))
        run.add_figure("curve", "line", "curve", x="step")
        ready.write_text(str(run.path))
        time.sleep(600)
''')


def _start_study(tmp: Path) -> tuple[subprocess.Popen, Path]:
    """Start the study in a subprocess; return it and its run folder once its table is saved."""
    (tmp / "study.py").write_text(STUDY)
    ready = tmp / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([sys.executable, str(tmp / "study.py"), str(tmp / "runs"), str(ready)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "study.err", "w"))
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), (tmp / "study.err").read_text()
    return proc, Path(ready.read_text())


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def _report_refuses_then_rebuilds_when_allowed(run_dir: Path, capsys, reason: str, banner: str) -> None:
    """``resnet-probe report`` refuses the run, exit status 1, saying ``reason``; with ``--allow-incomplete``
    it rebuilds the report, which carries ``banner``."""
    assert main(["report", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert reason in err and "--allow-incomplete" in err and not (run_dir / "report.html").exists()
    assert main(["report", str(run_dir), "--allow-incomplete"]) == 0
    assert banner in (run_dir / "report.html").read_text()


def test_sigterm_mid_study_marks_the_run_interrupted_and_report_refuses_it(tmp_path, capsys):
    proc, run_dir = _start_study(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    status = _status(run_dir)
    assert status["state"] == "interrupted" and status["error"] == "RunTerminated: received SIGTERM"
    assert status["pid"] == proc.pid and status["host"] == socket.gethostname()
    assert status["started"] <= status["heartbeat"]

    _report_refuses_then_rebuilds_when_allowed(
        run_dir, capsys, f"run {run_dir} is interrupted: RunTerminated: received SIGTERM. Not rebuilt",
        "This run is incomplete (state: interrupted; RunTerminated: received SIGTERM)")


def test_sigkill_mid_study_is_reported_as_a_run_whose_process_is_gone(tmp_path, capsys):
    proc, run_dir = _start_study(tmp_path)
    assert main(["report", str(run_dir)]) == 1
    assert f"run {run_dir} is still running (pid {proc.pid} on host {socket.gethostname()}" in capsys.readouterr().err

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _status(run_dir)["state"] == "running"  # nothing could record the kill
    _report_refuses_then_rebuilds_when_allowed(
        run_dir, capsys, f"run {run_dir} is marked 'running' but the process that wrote it is gone (pid {proc.pid}",
        "This run is incomplete (state: running; the process that wrote it is gone")
    assert _status(run_dir)["state"] == "running"  # the report says so; the status stays what was recorded


def test_a_reused_pid_or_another_host_is_not_taken_for_the_writer():
    me = process_identity()
    assert writer_alive(me) is True
    if me["pid_start"] is not None:  # Linux: the start time tells a later process with the same pid apart
        assert writer_alive({**me, "pid_start": me["pid_start"] + 1}) is False
    assert writer_alive({**me, "host": me["host"] + "-elsewhere"}) is None
    assert writer_alive({"pid": None, "host": None}) is None


def test_the_runs_sigterm_handler_is_installed_only_inside_the_with_block(tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    def previous(signum, frame):
        pass

    signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(RunTerminated):
            with new_run("demo", out=tmp_path) as run:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the handler raises here, at once
        assert signal.getsignal(signal.SIGTERM) is previous
        assert run.state == "interrupted" and run.status["error"] == "RunTerminated: received SIGTERM"

        seen = []

        def study_in_a_thread():
            with new_run("demo", out=tmp_path):
                seen.append(signal.getsignal(signal.SIGTERM))

        thread = threading.Thread(target=study_in_a_thread)
        thread.start()
        thread.join()
        assert seen == [previous]  # only the main thread may handle signals: nothing installed, no error
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_interrupt_turned_into_system_exit_still_marks_the_run_interrupted(tmp_path):
    """Lightning's Trainer answers Ctrl-C during fit with its clean-up and then ``exit(1)``."""
    with pytest.raises(SystemExit):
        with new_run("demo", out=tmp_path) as run:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise SystemExit(1)
    assert run.state == "interrupted"
    with pytest.raises(SystemExit):
        with new_run("demo", out=tmp_path) as failed:
            raise SystemExit(3)
    assert failed.state == "failed"


@pytest.mark.parametrize("cut", ["whole-lines", "inside-a-line"])
def test_a_table_cut_after_the_run_is_refused(tmp_path, capsys, cut):
    run = new_run("demo", out=tmp_path)
    run.add_table("curve", pd.DataFrame({"metric": "error", "step": range(12), "value": np.linspace(1, 0.1, 12)}))
    run.add_table("extra", pd.DataFrame({"metric": "loss", "step": range(12), "value": np.linspace(2, 0.2, 12)}))
    run.add_figure("curve", "line", "curve", x="step")
    run.finish()
    if cut == "whole-lines":  # a table no figure draws: the report lists its row count all the same
        path = run.path / "tables" / "extra.csv"
        path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-3]))
        message = f"table file {path} has 9 rows but report.json recorded 12"
    else:
        path = run.path / "tables" / "curve.csv"
        path.write_bytes(path.read_bytes()[:-4])
        message = f"table file {path} is cut off inside its last line"
    with pytest.raises(SystemExit) as exc:
        rebuild_main([str(run.path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(RunFolderError, match="changed after the run wrote it"):
        open_run(run.path).table(path.stem)
