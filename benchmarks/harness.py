"""Timing, memory and result recording shared by every benchmark in this folder.

Times are medians over repeats after warm-up (CUDA events on a GPU, a synchronised host clock
otherwise). Each result file records the hardware, package versions, date and git revision, so a
row can be compared only with rows measured on the same machine.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytorch_lightning
import torch
import torchvision

from resnet_probe.atomic import atomic_write_text
from resnet_probe.batchnorm import calibrate_batchnorm  # noqa: F401  (the benchmarks' BN set-up)

RESULTS = Path(__file__).resolve().parent / "results"
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def resolve_device(name: str | None) -> torch.device:
    """``None``/``auto``: CUDA when present, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2,
                device: torch.device | str | None = None) -> dict:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup`` runs."""
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeats": repeats}


def _proc_status_bytes(field: str) -> int | None:
    """``field`` (``VmRSS``, ``VmHWM``) of ``/proc/self/status`` in bytes; None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_resident_peak() -> int | None:
    """Return the freed heap to the system (glibc ``malloc_trim``) and have every later block of
    128 KiB or more mapped on its own (so it is unmapped when freed, and the peak counts the memory
    held, not where the heap happened to place blocks); then reset this process's peak resident set
    to its current one (``/proc/self/clear_refs``). Returns the current resident set in bytes, or
    None where Linux's ``/proc`` does not allow it."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


def _lifetime_peak() -> int:
    """This process's peak resident set in bytes (``ru_maxrss``: kilobytes on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _child_peak(fn, conn) -> None:
    # A forked child inherits the parent's intra-op thread pool in a broken state: use one thread.
    torch.set_num_threads(1)
    base = _reset_resident_peak()
    if base is None:  # no /proc: the lifetime peak, which an earlier peak of the parent may hide
        base, peak = _lifetime_peak(), _lifetime_peak
    else:
        peak = lambda: _proc_status_bytes("VmHWM")  # noqa: E731
    fn()
    conn.send(peak() - base)
    conn.close()


def evaluate_in_batches(model: torch.nn.Module, images: torch.Tensor, batch: int) -> None:
    """``model`` on ``images``, ``batch`` at a time, without gradients (outputs discarded)."""
    for _ in evaluation_steps(model, images, batch):
        pass


def evaluation_steps(model: torch.nn.Module, images: torch.Tensor, batch: int):
    """``evaluate_in_batches`` one batch per step: a generator that yields after each batch."""
    for i in range(0, len(images), batch):
        with torch.no_grad():
            model(images[i:i + batch])
        yield


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak memory growth in bytes while ``fn()`` runs.

    CUDA: ``max_memory_allocated`` above what was allocated before. CPU: the peak resident set
    of a forked child process that runs ``fn``, above its resident set at the start. Before the
    start the child returns the heap it inherited freed to the system, maps every later block of
    128 KiB or more on its own and resets its peak (Linux, glibc), so neither memory this process
    freed earlier nor its earlier peak hides what ``fn`` needs, nor does the heap's layout add to it.
    The figure includes the library pages that the child's first use of ``fn``'s code brings in (a
    few MB, depending on the installation).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_peak, args=(fn, child))
    proc.start()
    value = parent.recv()
    proc.join()
    return int(value)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str:
    """Short commit of this checkout, ``+uncommitted changes`` when tracked files outside
    ``benchmarks/results/`` differ from it (the results written so far do not count)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=10, check=True).stdout.strip()
    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+uncommitted changes" if dirty else "")


def environment(device: torch.device | str) -> dict:
    """Hardware, versions, date and git revision for a result file."""
    rev = _git_revision()
    return {
        "device": str(device), "hardware": device_name(device), "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "pytorch_lightning": pytorch_lightning.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "git": rev,
    }


def _markdown_table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def default_size(device: torch.device | str) -> str:
    """The benchmark size a device runs when none is asked for: ``paper`` on a GPU, ``small`` on the CPU."""
    return "paper" if torch.device(device).type == "cuda" else "small"


def record(name: str, rows: list[dict], *, config: dict, device: torch.device | str = "cpu",
           results_dir: Path | None = None) -> Path:
    """Write ``<name>-<device>-<date>.json`` and ``.md`` into ``benchmarks/results/``; return the JSON path.

    ``<device>`` is ``cpu`` or ``gpu``, followed by the size (``cpu-paper``) when ``config["size"]`` is
    not the device's default one (small on the CPU, paper on a GPU), so such a run keeps its own file.
    """

    env = environment(device)
    out = Path(results_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if torch.device(device).type == "cuda" else "cpu"
    size = config.get("size")
    if size is not None and size != default_size(device):
        kind = f"{kind}-{size}"
    stem = f"{name}-{kind}-{env['date'][:10]}"
    payload = {"benchmark": name, "environment": env, "config": config, "rows": rows}
    atomic_write_text(out / f"{stem}.json", json.dumps(payload, indent=2, default=str) + "\n")
    md = (f"## {name} ({env['hardware']}, {env['date']})\n\n"
          f"torch {env['torch']}, torchvision {env['torchvision']}, pytorch-lightning "
          f"{env['pytorch_lightning']}, Python {env['python']}, {env['cpu_cores']} CPU cores, git {env['git']}\n\n"
          f"config: `{json.dumps(config, default=str)}`\n\n{_markdown_table(rows)}\n")
    atomic_write_text(out / f"{stem}.md", md)
    print(md)
    return out / f"{stem}.json"
