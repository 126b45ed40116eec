"""torchvision's CIFAR-10 (the original python batches) as a ``DataSource``.

Downloads happen only when ``download=True``; without a network that fails with a clear error
instead of a bare ``URLError``.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch

from .source import DataSource

CIFAR_HOST = "www.cs.toronto.edu"
BATCH_DIR = "cifar-10-batches-py"
BATCH_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def default_cifar_root() -> Path:
    """``$RESNET_PROBE_CIFAR_ROOT`` or ``~/.cache/resnet_probe/cifar10``."""
    return Path(os.environ.get("RESNET_PROBE_CIFAR_ROOT") or Path.home() / ".cache" / "resnet_probe" / "cifar10")


def torchvision_data_present(root: str | os.PathLike) -> bool:
    """True when ``root`` holds torchvision's extracted CIFAR-10 batches (checksums are checked on load)."""
    d = Path(root).expanduser() / BATCH_DIR
    return all((d / f).is_file() for f in BATCH_FILES)


def network_reachable(host: str = CIFAR_HOST, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the CIFAR-10 host opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_torchvision(root: str | os.PathLike | None = None, download: bool = False) -> DataSource:
    """CIFAR-10 through ``torchvision.datasets.CIFAR10``.

    Args:
        root: directory holding (or to receive) ``cifar-10-batches-py``; default ``default_cifar_root()``.
        download: fetch the data when it is missing (needs a network).

    Returns:
        A ``DataSource`` of kind ``"torchvision"``.

    Raises:
        FileNotFoundError: the data is missing (or fails its checksum) and ``download`` is False.
        ConnectionError: ``download`` is True but the download failed.
    """
    from torchvision.datasets import CIFAR10

    root = Path(root).expanduser() if root is not None else default_cifar_root()
    if not torchvision_data_present(root) and not download:
        raise FileNotFoundError(
            f"torchvision CIFAR-10 not found under {root} (expected {root / BATCH_DIR}/ with "
            f"{', '.join(BATCH_FILES)}); allow download=True with network access, or use the JPEG pack "
            "('pack=PATH') or 'synthetic'")
    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise FileNotFoundError(f"torchvision CIFAR-10 under {root} is missing or corrupted ({exc}); "
                                "delete it and download again, or use the JPEG pack") from None
    except OSError as exc:
        raise ConnectionError(f"could not download CIFAR-10 into {root} ({type(exc).__name__}: {exc}); "
                              "no network? Use the JPEG pack ('pack=PATH') or 'synthetic'") from None

    def images(ds) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))

    def labels(ds) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))

    return DataSource(
        name="cifar10", kind="torchvision", path=str(root.resolve()), synthetic=False,
        train_images=images(train), train_labels=labels(train), test_images=images(test),
        test_labels=labels(test), classes=tuple(train.classes),
        description=f"CIFAR-10 (torchvision, original PNG-equivalent pixels) from {root}",
        details={"download_allowed": bool(download)})
