"""The CIFAR-10 JPEG pack: an ``.npz`` of concatenated JPEG files, decoded once and cached as uint8.

Format (``shared/data/README.md``): ``{split}_jpeg`` (uint8, all JPEG files of the split back to
back), ``{split}_offsets`` (int64, n+1; image i is ``jpeg[offsets[i]:offsets[i+1]]``),
``{split}_labels`` (uint8, n) for ``split`` in train / test, and ``classes`` (str, in label order).
Images are decoded on the CPU with ``torchvision.io.decode_jpeg`` (so the cached pixels do not
depend on which GPU decoder is present) and the full decode of each split is cached as a ``.npy``
under ``cache_dir()``, keyed by the pack's path, size and mtime; a subset (``indices`` / ``limit``)
decodes only the images it needs and is not cached.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from ..cache import cache_root
from ._seeding import seeded_generator
from .source import IMAGE_SHAPE, DataSource

SPLITS = ("train", "test")
PACK_ARRAYS = ("train_jpeg", "train_offsets", "train_labels",
               "test_jpeg", "test_offsets", "test_labels", "classes")
_DECODE_CHUNK = 4096


class PackFormatError(ValueError):
    """The file exists but is not a valid CIFAR-10 JPEG pack."""


def cache_dir() -> Path:
    """Where decoded packs are cached: ``$RESNET_PROBE_CACHE`` or ``~/.cache/resnet_probe``."""
    return cache_root()


def _fail(path: Path, problem: str) -> PackFormatError:
    return PackFormatError(
        f"{path}: {problem}. Expected a CIFAR-10 JPEG pack: an .npz holding {', '.join(PACK_ARRAYS)} "
        "(see shared/data/README.md)")


def _read_index(z, path: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and labels of one split, checked against each other and the JPEG byte count."""
    offsets, labels = z[f"{split}_offsets"], z[f"{split}_labels"]
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) < 2:
        raise _fail(path, f"{split}_offsets must be a 1-d integer array of length n+1 >= 2; "
                          f"got {offsets.dtype} {offsets.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(offsets) - 1:
        raise _fail(path, f"{split}_labels must be a 1-d integer array with one label per image "
                          f"({len(offsets) - 1}); got {labels.dtype} {labels.shape}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
        raise _fail(path, f"{split}_offsets must start at 0 and increase strictly")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise _fail(path, f"{split}_labels must lie in 0..{num_classes - 1}; "
                          f"got values in {labels.min()}..{labels.max()}")
    n_bytes = _npy_length(z, f"{split}_jpeg", path)
    if offsets[-1] != n_bytes:
        raise _fail(path, f"{split}_offsets end at {offsets[-1]} but {split}_jpeg holds {n_bytes} bytes")
    return offsets, labels.astype(np.int64)


def _npy_length(z, name: str, path: Path) -> int:
    """Length of a 1-d uint8 array inside the npz, read from its header when possible."""
    with z.zip.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            arr = z[name]
            shape, dtype = arr.shape, arr.dtype
    if len(shape) != 1 or dtype != np.uint8:
        raise _fail(path, f"{name} must be a 1-d uint8 byte array; got {dtype} {shape}")
    return int(shape[0])


@contextlib.contextmanager
def _codec_deprecation_silenced():
    """torchvision 0.29 deprecates its JPEG codec in favour of torchcodec; the codec still works."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield


def _decode(jpeg: np.ndarray, offsets: np.ndarray, indices: np.ndarray, path: Path, split: str) -> torch.Tensor:
    """Decode images ``indices`` of a split into a ``(len(indices), 3, 32, 32)`` uint8 tensor."""
    out = torch.empty((len(indices), *IMAGE_SHAPE), dtype=torch.uint8)
    with _codec_deprecation_silenced():
        for start in range(0, len(indices), _DECODE_CHUNK):
            _decode_chunk(jpeg, offsets, indices, start, out, path, split)
    return out


def _decode_chunk(jpeg: np.ndarray, offsets: np.ndarray, indices: np.ndarray, start: int, out: torch.Tensor,
                  path: Path, split: str) -> None:
    """Decode ``indices[start:start + _DECODE_CHUNK]`` into ``out``; name the first bad image on failure."""
    chunk = indices[start:start + _DECODE_CHUNK]
    data = [torch.from_numpy(jpeg[offsets[i]:offsets[i + 1]]) for i in chunk]
    try:
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        decoded = []
        for i, d in zip(chunk, data):
            try:
                decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB))
            except RuntimeError as exc:
                raise _fail(path, f"{split} image {i} is not a decodable JPEG ({exc})") from None
    for j, (i, img) in enumerate(zip(chunk, decoded)):
        if tuple(img.shape) != IMAGE_SHAPE:
            raise _fail(path, f"{split} image {i} decodes to shape {tuple(img.shape)}, not {IMAGE_SHAPE}")
        out[start + j] = img


def _cache_file(path: Path, split: str) -> Path:
    st = path.stat()
    tag = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
    return cache_dir() / f"{path.stem}-{tag}-{st.st_size}-{st.st_mtime_ns}-{split}.npy"


def _load_cached(file: Path, n: int) -> torch.Tensor | None:
    try:
        arr = np.load(file, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.dtype != np.uint8 or arr.shape != (n, *IMAGE_SHAPE):
        return None
    return torch.from_numpy(arr)


def _save_cached(file: Path, images: torch.Tensor) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, images.numpy())
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
    except OSError as exc:
        warnings.warn(f"could not cache decoded images at {file} ({exc}); they will be decoded again next time")


def _split_images(z, path: Path, split: str, offsets: np.ndarray, indices: np.ndarray | None,
                  cache: bool) -> torch.Tensor:
    n = len(offsets) - 1
    file = _cache_file(path, split) if cache else None
    cached = _load_cached(file, n) if file is not None and file.exists() else None
    if cached is not None:
        return cached if indices is None else cached[torch.from_numpy(indices)].contiguous()
    jpeg = z[f"{split}_jpeg"]
    if indices is not None:
        return _decode(jpeg, offsets, indices, path, split)
    images = _decode(jpeg, offsets, np.arange(n), path, split)
    if file is not None:
        _save_cached(file, images)
    return images


def _subset(indices, limit: int | None, n: int, seed: int, split: str, path: Path) -> np.ndarray | None:
    if indices is not None:
        idx = np.asarray(torch.as_tensor(indices, dtype=torch.int64).cpu().numpy(), dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < -n or idx.max() >= n)):
            raise IndexError(f"{path}: {split} indices must be a 1-d list within 0..{n - 1}")
        return idx % n
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise ValueError(f"limit must be a positive number of images; got {limit}")
    perm = torch.randperm(n, generator=seeded_generator(seed, "pack-subset", split))[:limit]
    return np.sort(perm.numpy())


def load_pack(path: str | os.PathLike, *, train_indices=None, test_indices=None, limit: int | None = None,
              seed: int = 0, cache: bool = True) -> DataSource:
    """Load (decode) the CIFAR-10 JPEG pack.

    Args:
        path: the ``.npz`` pack.
        train_indices, test_indices: decode only these images of each split (in this order).
        limit: when the indices of a split are not given, decode only ``limit`` images of it: a
            seeded random subset (the pack is sorted by class, so never its first ``limit``),
            returned in pack order.
        seed: seed of the ``limit`` subset.
        cache: read / write the full decode of each split under ``cache_dir()``.

    Returns:
        A ``DataSource`` of kind ``"pack"``; ``details`` records the file size, mtime and subset.

    Raises:
        FileNotFoundError: no file at ``path``.
        PackFormatError: the file is not a valid pack (names the path and what was expected).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 JPEG pack not found: {path} (expected an .npz file with "
                                f"{', '.join(PACK_ARRAYS)})")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise _fail(path, f"not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise _fail(path, "holds a single array, not an .npz archive")
    with z:
        missing = [a for a in PACK_ARRAYS if a not in z.files]
        if missing:
            raise _fail(path, f"missing arrays {missing} (found {sorted(z.files)})")
        try:
            classes = tuple(str(c) for c in z["classes"].reshape(-1))
            if not classes:
                raise _fail(path, "classes is empty")
            out: dict[str, torch.Tensor] = {}
            subsets = {}
            for split, idx in zip(SPLITS, (train_indices, test_indices)):
                offsets, labels = _read_index(z, path, split, len(classes))
                sub = _subset(idx, limit, len(labels), seed, split, path)
                subsets[split] = None if sub is None else len(sub)
                out[f"{split}_images"] = _split_images(z, path, split, offsets, sub, cache)
                out[f"{split}_labels"] = torch.from_numpy(labels if sub is None else labels[sub])
        except (zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
            if isinstance(exc, PackFormatError):
                raise
            raise _fail(path, f"unreadable content ({type(exc).__name__}: {exc})") from None
    st = path.stat()
    n_tr, n_te = len(out["train_labels"]), len(out["test_labels"])
    subset_note = "" if subsets == {"train": None, "test": None} else f" (subset: {n_tr} train, {n_te} test)"
    return DataSource(
        name="cifar10-jpeg", kind="pack", path=str(path.resolve()), synthetic=False, classes=classes,
        description=f"CIFAR-10 JPEG pack {path.name}{subset_note}", **out,
        details={"file_size": st.st_size, "file_mtime_ns": st.st_mtime_ns,
                 "subset_train": subsets["train"], "subset_test": subsets["test"],
                 "subset_seed": seed if any(v is not None for v in subsets.values()) else None})


def write_pack(path: str | os.PathLike, source: DataSource, quality: int = 75) -> Path:
    """Write ``source`` as a JPEG pack (atomically), e.g. a small pack for tests or a shared subset.

    Args:
        path: destination ``.npz``.
        source: images and labels to encode.
        quality: JPEG quality, 1..100.

    Returns:
        The path written.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"classes": np.array(source.classes)}
    for split in SPLITS:
        images = getattr(source, f"{split}_images")
        with _codec_deprecation_silenced():
            blobs = encode_jpeg(list(images), quality=quality)
        sizes = np.array([len(b) for b in blobs], dtype=np.int64)
        arrays[f"{split}_jpeg"] = torch.cat(blobs).numpy()
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        arrays[f"{split}_labels"] = getattr(source, f"{split}_labels").numpy().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path
