"""SIGTERM handled like SIGINT while a study's run is open, and telling an interruption from a failure.

SIGTERM is what ``kill``, batch schedulers (SLURM at the time limit, before SIGKILL) and container
runtimes send first. By default it ends Python at once, leaving the run marked ``running``. Inside
``with new_run(...)`` it raises ``RunTerminated``, a ``KeyboardInterrupt``, in the main thread, so
``finally`` blocks run and the run is marked ``interrupted``, as after Ctrl-C.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable

__all__ = ["RunFailed", "RunTerminated", "install_sigterm", "restore_sigterm", "interrupted"]


class RunTerminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM inside ``with new_run(...)``."""


class RunFailed(RuntimeError):
    """An error that marks the run ``failed`` even when raised while handling an interrupt: a sharded run's
    rank 0 that torchrun stops with SIGTERM because another rank failed (``resnet_probe.shards``)."""


def install_sigterm(handler: Callable[[int, Any], None]) -> Any:
    """Make ``handler`` the SIGTERM handler and return the previous one (``None``: nothing installed).

    Only the main thread may set handlers; a handler set from C cannot be restored, so it is kept.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        return None
    return signal.signal(signal.SIGTERM, handler)


def restore_sigterm(previous: Any) -> None:
    """Put back the handler ``install_sigterm`` returned (nothing when it installed nothing)."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def interrupted(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was raised while handling, a ``KeyboardInterrupt`` (Lightning answers an
    interrupt during ``fit`` with its clean-up and then ``SystemExit(1)``); never for a ``RunFailed``."""
    if isinstance(exc, RunFailed):
        return False
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
