"""The inductor cache of a GPU check, packed into a few files so that a later run can start warm.

torch.compile's inductor keeps the kernels and graphs it compiled under ``TORCHINDUCTOR_CACHE_DIR``.
``benchmarks.gpu_check`` points that variable to a folder of its own and, after each stage, packs the
folder into ``inductor-cache.tar.gz.part00``, ``.part01``, ... in its output folder: each file at
most ``PART_BYTES``, no more files and bytes than the caller allows (a GPU machine gives back only a
few small files), or none at all, with the reason, when the packed cache is larger. ``unpack``
restores such parts into a cache folder before a run.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

PART_BYTES = 15 * 2**20  # under the 16 MiB a file may have to come back from the GPU machine
PREFIX = "inductor-cache.tar.gz.part"


def parts(folder: Path) -> list[Path]:
    """The cache parts in ``folder``, in order."""
    return sorted(Path(folder).glob(f"{PREFIX}*"))


def pack(cache_dir: Path, out_dir: Path, max_files: int, max_bytes: int) -> dict:
    """Pack ``cache_dir`` into parts in ``out_dir`` (replacing earlier parts there).

    Returns:
        ``{"files": [...], "bytes": n}``, or ``{"skipped": reason}``.
    """
    for old in parts(out_dir):
        old.unlink()
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir() or not any(cache_dir.iterdir()):
        return {"skipped": f"the cache {cache_dir} is empty"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        tar.add(cache_dir, arcname=".")
    data = buffer.getvalue()
    count = -(-len(data) // PART_BYTES)
    if count > max_files or len(data) > max_bytes:
        return {"skipped": f"packed cache of {len(data) / 2**20:.1f} MiB needs {count} files of at most "
                           f"{PART_BYTES / 2**20:.0f} MiB; {max_files} files and {max_bytes / 2**20:.0f} MiB allowed"}
    written = []
    for i in range(count):
        path = Path(out_dir) / f"{PREFIX}{i:02d}"
        path.write_bytes(data[i * PART_BYTES:(i + 1) * PART_BYTES])
        written.append(path.name)
    return {"files": written, "bytes": len(data)}


def unpack(parts_dir: Path, cache_dir: Path) -> int:
    """Restore the parts found in ``parts_dir`` into ``cache_dir``; returns the packed bytes (0: none)."""
    found = parts(parts_dir)
    if not found:
        return 0
    data = b"".join(p.read_bytes() for p in found)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(cache_dir, filter="data")
    return len(data)
