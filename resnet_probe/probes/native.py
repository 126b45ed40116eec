"""Per-channel sum and sum of squares in one read of the activation, on the CPU.

The streaming statistics need, for each batch and channel, the sum and the sum of squares of the
values. PyTorch computes them as two reductions, each reading the activation once; on a CPU, where
the probe's cost is mostly that memory traffic, ``channel_moments`` reads each value once and adds
both in float64. A float32 value and its square are exact in float64, so these raw sums carry only
float64 rounding, far below the float32 rounding of PyTorch's per-piece sums.

The kernel (``_moments.c``, OpenMP over the (example, channel) planes) is compiled with the
system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) the first time it is needed, and
cached in ``$RESNET_PROBE_CACHE/native`` (default ``~/.cache/resnet_probe/native``) under a name
that hashes the source, the compiler, its flags and the CPU, so a cache never serves a build made
for another processor.

Loading a library runs its code, so the cache is trusted only when nobody else can write to it:
the folder and the library must belong to the current user (or to root) and must not be group- or
world-writable, else the kernel is neither built nor loaded there (a cache shared between users is
refused; each user keeps their own). A build is compiled into a private temporary file in the
folder, its sha256 is written beside it (``moments-<key>.so.sha256``) and it is then renamed into
place; a library is loaded only when its bytes match that record (a library without one, or with
another, is rebuilt). Where no compiler works, the cache is refused, the library does not load or
lacks the kernel's symbols, or with ``RESNET_PROBE_NATIVE=0``, ``channel_moments`` returns None and
the caller uses PyTorch's reductions; ``status()`` says which path is taken and why. The decision is
taken once per process.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..cache import cache_root

SOURCE = Path(__file__).with_name("_moments.c")
FLAG_SETS = (  # tried in order: the first that compiles is used
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),  # no OpenMP: one thread
)
_KERNEL_NAMES = {torch.float32: "channel_moments_f32", torch.float64: "channel_moments_f64"}
_LIBRARY_MODE = 0o755  # set explicitly: a umask of 002 would otherwise leave a build group-writable
_RECORD_MODE = 0o644
_lock = threading.Lock()
_loaded: dict = {}  # "kernels" -> {dtype: ctypes function} or None; "why" -> what status() reports


class UntrustedCache(RuntimeError):
    """The kernel cache, or a file in it, could have been written by another user."""


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


def library_paths() -> list[Path]:
    """Where the kernel is looked for, one library per flag set of ``FLAG_SETS``, in the order tried.

    Raises:
        RuntimeError: no C compiler.
    """
    compiler = _compiler()
    return [path for _, path in _candidates(compiler)]


def _kernels() -> dict | None:
    """``{dtype: kernel}`` from the verified library (built and cached on first use), or None when
    it cannot be built, trusted, loaded or bound; decided once per process."""
    if "kernels" not in _loaded:
        with _lock:
            if "kernels" not in _loaded:
                try:
                    path = _library()
                    _loaded["kernels"], _loaded["why"] = _load(path), str(path)
                except Exception as err:  # whatever stops the kernel, the probes still measure
                    _loaded["kernels"], _loaded["why"] = None, f"no one-read kernel: {err}"
    return _loaded["kernels"]


def _load(path: Path) -> dict:
    """Bind the kernels of the library at ``path`` (checked by ``_library`` just before).

    Raises:
        OSError: the library does not load.
        AttributeError: it lacks a kernel's symbol.
    """
    lib = ctypes.CDLL(str(path))
    kernels = {}
    for dtype, name in _KERNEL_NAMES.items():
        try:
            fn = kernels[dtype] = getattr(lib, name)
        except AttributeError:
            raise AttributeError(f"{path} has no symbol {name}") from None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        fn.restype = None
    return kernels


def _library() -> Path:
    """The path of a verified kernel library for this source, compiler and CPU, compiling it if needed.

    Raises:
        UntrustedCache: the cache folder or the library could have been written by another user.
        RuntimeError: no compiler, or no flag set compiles.
    """
    compiler = _compiler()
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(folder, follow=True)
    errors = []
    for flags, path in _candidates(compiler):
        if not _verified(path):
            try:
                _compile(compiler, flags, path)
            except RuntimeError as err:
                errors.append(str(err))
                continue
            if not _verified(path):
                raise RuntimeError(f"{path} changed while it was being built")
        return path
    raise RuntimeError(f"{compiler} could not compile {SOURCE.name}: {'; '.join(errors)}")


def _candidates(compiler: str) -> list[tuple[tuple[str, ...], Path]]:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    identity = [SOURCE.read_bytes(), compiler.encode(), version.encode(), _cpu().encode()]
    out = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([*identity, " ".join(flags).encode()])).hexdigest()[:16]
        out.append((flags, cache_dir() / f"moments-{key}.so"))
    return out


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_private(path: Path, follow: bool = False) -> None:
    """Raise ``UntrustedCache`` unless ``path`` belongs to the current user (or root) and is neither
    group- nor world-writable; a file must be a regular file, not a symbolic link."""
    st = path.stat() if follow else path.lstat()
    if not follow and not stat.S_ISREG(st.st_mode):
        raise UntrustedCache(f"{path} is not a regular file")
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise UntrustedCache(f"{path} belongs to user id {st.st_uid}, not to you ({me}); set "
                             "RESNET_PROBE_CACHE to a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedCache(f"{path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o}), "
                             "so anyone could have written its libraries; set RESNET_PROBE_CACHE to a "
                             "folder only you can write")


def _verified(path: Path) -> bool:
    """Whether ``path`` holds a trusted library matching its sha256 record; False when either is
    missing or they differ (the library is then rebuilt).

    Raises:
        UntrustedCache: the library or its record could have been written by another user.
    """
    record = _record_path(path)
    if not path.exists() or not record.exists():
        return False
    _check_private(path)
    _check_private(record)
    return record.read_text().strip() == _sha256(path)


def _compile(compiler: str, flags: tuple[str, ...], path: Path) -> None:
    """Compile the kernel into a private temporary file, record its sha256 and rename it to ``path``
    (a reader sees the whole library or none)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        done = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(tmp)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RuntimeError(f"{' '.join(flags)}: {last}")
        os.chmod(tmp, _LIBRARY_MODE)  # the linker may have recreated it under the umask
        _write_private(_record_path(path), _sha256(tmp) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a private temporary file renamed into place."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(name, _RECORD_MODE)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


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
