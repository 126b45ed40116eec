"""Per-channel sum and sum of squares in one read of the activation, on the CPU.

The streaming statistics need, for each batch and channel, the sum and the sum of squares of the
values. PyTorch computes them as two reductions, each reading the activation once; on a CPU, where
the probe's cost is mostly that memory traffic, ``channel_moments`` reads each value once and adds
both in float64. A float32 value and its square are exact in float64, so these raw sums carry only
float64 rounding, far below the float32 rounding of PyTorch's per-piece sums.

The kernel (``_moments.c``, OpenMP over the (example, channel) planes) is compiled with the
system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) the first time it is needed, and
cached in ``$RESNET_PROBE_CACHE/native`` (default ``~/.cache/resnet_probe/native``) under a name
that hashes the source, the compiler, its flags and the CPU, so a shared cache never serves a build
made for another processor. Where no compiler works, or with ``RESNET_PROBE_NATIVE=0``,
``channel_moments`` returns None and the caller uses PyTorch's reductions; ``status()`` says which
path is taken and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..cache import cache_root

SOURCE = Path(__file__).with_name("_moments.c")
FLAG_SETS = (  # tried in order: the first that compiles is used
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),  # no OpenMP: one thread
)
_KERNEL_NAMES = {torch.float32: "channel_moments_f32", torch.float64: "channel_moments_f64"}
_lock = threading.Lock()
_loaded: dict = {}  # "kernels" -> {dtype: ctypes function} or None; "why" -> what status() reports


def enabled() -> bool:
    """False when the environment variable ``RESNET_PROBE_NATIVE`` is ``0`` (PyTorch reductions only)."""
    return os.environ.get("RESNET_PROBE_NATIVE", "1") != "0"


def available() -> bool:
    """Whether the kernel is built (building it on first call) and not switched off."""
    return enabled() and _kernels() is not None


def channel_moments(x: torch.Tensor, scratch: dict | None = None) -> torch.Tensor | None:
    """Per-channel ``[sum; sum of squares]`` of ``x`` (N, C, ...), a new (2, C) float64 tensor, or
    None where the kernel does not apply: ``x`` not a contiguous float32 / float64 CPU tensor with at
    least two dimensions and one value, no kernel built, or the kernel switched off.

    Args:
        x: the batch.
        scratch: a dict in which to keep the working buffer between calls (2 x N x C float64 values:
            the per-(example, channel) sums before they are added per channel).
    """
    if (x.dtype not in _KERNEL_NAMES or x.device.type != "cpu" or x.dim() < 2 or x.numel() == 0
            or not x.is_contiguous() or not enabled()):
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    n, c = x.shape[0], x.shape[1]
    key = ("native", n * c)  # written through a raw pointer: an inference-mode buffer serves any batch
    pieces = None if scratch is None else scratch.get(key)
    if pieces is None:
        pieces = torch.empty(2 * n * c, dtype=torch.float64)
        if scratch is not None:
            scratch[key] = pieces
    out = torch.empty(2, c, dtype=torch.float64)
    kernels[x.dtype](x.data_ptr(), n, c, x.numel() // (n * c), pieces.data_ptr(), out.data_ptr(),
                     torch.get_num_threads())
    return out


def status() -> str:
    """Which reduction the probes use on CPU tensors, and why."""
    if not enabled():
        return "PyTorch reductions (RESNET_PROBE_NATIVE=0)"
    if _kernels() is None:
        return f"PyTorch reductions ({_loaded['why']})"
    return f"one-read kernel {_loaded['why']}"


def cache_dir() -> Path:
    """``$RESNET_PROBE_CACHE/native``, default ``~/.cache/resnet_probe/native``."""
    return cache_root() / "native"


def _kernels() -> dict | None:
    """``{dtype: kernel}`` from the compiled library (built and cached on first use), or None when it
    cannot be built."""
    if "kernels" not in _loaded:
        with _lock:
            if "kernels" not in _loaded:
                try:
                    path = _build()
                    _loaded["kernels"], _loaded["why"] = _load(path), str(path)
                except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                    _loaded["kernels"], _loaded["why"] = None, f"no one-read kernel: {err}"
    return _loaded["kernels"]


def _load(path: Path) -> dict:
    lib = ctypes.CDLL(str(path))
    kernels = {}
    for dtype, name in _KERNEL_NAMES.items():
        fn = kernels[dtype] = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        fn.restype = None
    return kernels


def _build() -> Path:
    """The path of the compiled kernel for this source, compiler and CPU, compiling it if needed."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    identity = [SOURCE.read_bytes(), compiler.encode(), version.encode(), _cpu().encode()]
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([*identity, " ".join(flags).encode()])).hexdigest()[:16]
        path = cache_dir() / f"moments-{key}.so"
        if not path.exists():
            try:
                _compile(compiler, flags, path)
            except RuntimeError as err:
                errors.append(str(err))
                continue
        return path
    raise RuntimeError(f"{compiler} could not compile {SOURCE.name}: {'; '.join(errors)}")


def _compile(compiler: str, flags: tuple[str, ...], path: Path) -> None:
    """Compile the kernel into ``path`` (written whole or not at all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        done = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(tmp)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RuntimeError(f"{' '.join(flags)}: {last}")


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        found = name and shutil.which(name)
        if found:
            return found
    raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")


def _cpu() -> str:
    """The processor's identity and feature flags (what ``-march=native`` compiles for)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"
