"""Whether the process that wrote a run folder still lives, and what a run's state means for its report.

``status.json`` records who writes the run: ``pid``, ``host``, ``pid_start`` (the process's start
time in clock ticks since boot, field 22 of ``/proc/PID/stat``; ``None`` off Linux), ``started`` and
``heartbeat`` (the time of its last save). A run still marked ``running`` whose process is gone was
killed (SIGKILL, the out-of-memory killer, a lost node) before it could record its end: its tables
hold what it saved until then. ``pid_start`` tells a pid reused by a later process from the writer.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Mapping

__all__ = ["process_identity", "writer_alive", "incomplete_reason"]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state letter, start time in ticks since boot)`` of ``pid`` from ``/proc``, or ``None`` without it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name, in parentheses, may hold spaces
    return fields[0], int(fields[19])


def process_identity() -> dict[str, Any]:
    """``pid``, ``host`` and ``pid_start`` of this process, as recorded in ``status.json``."""
    stat = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": None if stat is None else stat[1]}


def writer_alive(status: Mapping[str, Any]) -> bool | None:
    """Whether the process recorded in ``status`` is alive.

    Returns:
        ``True`` or ``False``; ``None`` when it cannot be told: no process recorded (a folder written
        before ``pid`` was recorded) or another host.
    """
    pid, host = status.get("pid"), status.get("host")
    if pid is None or host is None or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    stat = _proc_stat(int(pid))
    if stat is not None and (stat[0] == "Z" or (status.get("pid_start") is not None
                                                and stat[1] != status["pid_start"])):
        return False  # exited (a zombie), or the pid now belongs to another process
    return True


def incomplete_reason(path: str | Path, status: Mapping[str, Any]) -> str | None:
    """Why the run at ``path`` is not a finished run (``None`` when it is ``complete``), in one sentence."""
    state = status.get("state")
    if state == "complete":
        return None
    error = f": {status['error']}" if status.get("error") else ""
    if state in ("failed", "interrupted"):
        return f"run {path} is {state}{error}"
    if state != "running":
        return f"run {path} has state {state!r} (its status.json is missing or unknown)"
    who = f"pid {status.get('pid')} on host {status.get('host')}"
    saved = f"started {status.get('started')}, last saved {status.get('heartbeat') or 'unknown'}"
    alive = writer_alive(status)
    if alive is False:
        return (f"run {path} is marked 'running' but the process that wrote it is gone ({who}; {saved}): "
                "it was killed before it could record its end, and its tables hold what it saved until then")
    if alive:
        return f"run {path} is still running ({who}; {saved})"
    if status.get("pid") is None:
        return f"run {path} is marked 'running' and records no process to check"
    return (f"run {path} is marked 'running' by {who}; whether that process lives cannot be checked "
            f"from {socket.gethostname()} ({saved})")
