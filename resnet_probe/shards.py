"""Sharded studies: one evaluation split over the ranks of ``torch.distributed``, combined exactly.

A study started under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` /
``MASTER_PORT`` set by it) joins one process group (NCCL when the study runs on CUDA, gloo on the
CPU) and gives each rank a ``Shard``. The evaluation images are cut into the *units* one process
already evaluates one at a time (the lesion engine's chunks of ``batch_size`` images, the response
study's groups, the paths study's batches); each rank takes a contiguous run of units (the first
``units % world_size`` ranks one more), so every image is evaluated exactly once and by exactly the
forward passes one process would run on it. The results are combined so that N processes give one
process's tables:

- per-example arrays (errors, losses, KL, path magnitudes) are gathered in rank order, which is
  the original image order: the same arrays as one process, bit for bit, and so the same means and
  the same bootstrap intervals (every rank computes them from the gathered arrays with the same seed);
- streamed float64 sums (probe statistics) are all-reduced (``probes.stats.all_reduce_stats``):
  equal to one process's sums up to the order of the float64 additions (relative 1e-15, well within
  the 1e-12 the tests hold them to).

Only rank 0 writes the run folder; the other ranks compute the same tables and discard them.

Failure. Every collective waits at most ``timeout`` (``RESNET_PROBE_SHARD_TIMEOUT`` seconds,
default 1800). A collective that fails (a rank died, or did not arrive in time) raises
``ShardFailure``; a rank 0 that torchrun stops (it sends SIGTERM to every rank when one exits with an
error) raises it too, so the run folder is marked ``failed`` naming the cause, and no rank waits
forever. Under NCCL a timed-out collective is ended by NCCL's watchdog, which stops the process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .report.interrupt import RunFailed

__all__ = ["ONE", "Shard", "ShardFailure", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S", "close_process_group",
           "environment_shard", "launched_world_size", "shard_timeout"]

TIMEOUT_ENV = "RESNET_PROBE_SHARD_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class ShardFailure(RunFailed):
    """A sharded run cannot go on: a collective failed or timed out, or torchrun stopped this rank."""


@dataclass(frozen=True)
class Shard:
    """This process's part of a sharded evaluation.

    Attributes:
        rank: this process's rank (0 writes the run folder).
        world_size: number of ranks; 1 is one process (no collective is ever called).
        timeout_s: the collective timeout the process group was created with (for messages).
    """

    rank: int = 0
    world_size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..world_size-1; got rank {self.rank} of {self.world_size}")

    @property
    def writer(self) -> bool:
        """Whether this rank writes the run folder (rank 0)."""
        return self.rank == 0

    def span(self, n_units: int) -> range:
        """The contiguous units of ``range(n_units)`` this rank evaluates (the first ``n_units % world_size``
        ranks take one more; a rank may get none when there are fewer units than ranks)."""
        base, extra = divmod(n_units, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def units(self, items: list) -> list:
        """This rank's contiguous part of ``items`` (see ``span``)."""
        r = self.span(len(items))
        return items[r.start:r.stop]

    def gather(self, array: np.ndarray, axis: int = -1, what: str = "per-example values") -> np.ndarray:
        """Every rank's ``array`` concatenated along ``axis`` in rank order (the original unit order).

        Identity in one process. Ranks with no units pass an empty array of the right other dimensions.
        """
        if self.world_size == 1:
            return array
        parts = self._collective(what, _all_gather_object, np.ascontiguousarray(array))
        return np.concatenate(parts, axis=axis)

    def gather_objects(self, obj: Any, what: str) -> list:
        """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
        if self.world_size == 1:
            return [obj]
        return self._collective(what, _all_gather_object, obj)

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        return self._collective(what, _broadcast_object, obj)

    def all_reduce_probes(self, session) -> None:
        """Sum a probe session's counts and sums over the ranks (``ProbeSession.all_reduce``)."""
        if self.world_size > 1:
            self._collective("probe statistics", lambda s: s.all_reduce(), session)

    def _collective(self, what: str, call, arg):
        try:
            return call(arg)
        except (RuntimeError, dist.DistError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ShardFailure(f"rank {self.rank} of {self.world_size}: combining {what} failed ({first}); another "
                               f"rank stopped, or did not arrive within the {self.timeout_s:g} s collective timeout "
                               f"({TIMEOUT_ENV})") from e


def _all_gather_object(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


ONE = Shard()


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when the process was not started by a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def shard_timeout() -> float:
    """Seconds a collective may wait: ``RESNET_PROBE_SHARD_TIMEOUT`` (default 1800)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def environment_shard(device: torch.device | str = "cpu", timeout_s: float | None = None) -> Shard:
    """This process's ``Shard``: from an initialised process group, from torchrun's environment, or ``ONE``.

    Under torchrun (``WORLD_SIZE`` > 1) the default process group is created here with backend NCCL
    when ``device`` is CUDA (or ``auto`` with CUDA available; each rank on GPU ``LOCAL_RANK``), else gloo, and
    ``timeout=timedelta(seconds=timeout_s)`` (default ``shard_timeout()``).
    """
    timeout_s = shard_timeout() if timeout_s is None else float(timeout_s)
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size(), timeout_s)
    if launched_world_size() <= 1:
        return ONE
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run the study in one process")
    cuda = torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return Shard(dist.get_rank(), dist.get_world_size(), timeout_s)


def close_process_group() -> None:
    """Destroy the default process group after a run that finished (nothing when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
