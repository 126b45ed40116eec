"""``resolve_source(spec)``: turn a ``--data`` string into a ``DataSource``.

Forms: ``auto`` | ``pack`` | ``pack=PATH`` | ``torchvision`` | ``torchvision=ROOT`` | ``synthetic`` |
``synthetic=N_TRAIN`` (N_TRAIN training images and N_TRAIN // 5 test images) | a path to an ``.npz`` pack. ``auto`` follows the user's intent in this order: ``$RESNET_PROBE_DATA``
(any non-auto form), the shared pack (``<repo>/../shared/data/cifar10-jpeg.npz``, looked up from
the package checkout and from the working directory), torchvision's CIFAR-10 under
``$RESNET_PROBE_CIFAR_ROOT`` (default ``~/.cache/resnet_probe/cifar10``), a download there when
the network allows, and only then synthetic data, announced loudly (a warning and a line on
stderr) and marked ``synthetic=True`` so every report made from it says so. Explicit forms never
fall back: if what was asked for is missing or broken, they raise.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from . import torchvision_source
from .pack import load_pack
from .source import DataSource
from .synthetic import make_synthetic
from .torchvision_source import default_cifar_root, load_torchvision, torchvision_data_present

PACK_NAME = "cifar10-jpeg.npz"
SPEC_FORMS = ("auto", "pack", "pack=PATH", "torchvision", "torchvision=ROOT", "synthetic", "synthetic=N_TRAIN",
              "PATH.npz")
DATA_ENV = "RESNET_PROBE_DATA"


class SyntheticDataWarning(UserWarning):
    """``auto`` found no CIFAR-10 data and fell back to the synthetic set."""


def pack_candidates() -> list[Path]:
    """Where ``auto`` / ``pack`` look for the shared pack, in order (existing or not)."""
    repo = Path(__file__).resolve().parents[2]
    cwd = Path.cwd()
    found: list[Path] = []
    for base in (repo.parent, cwd.parent, cwd):
        p = (base / "shared" / "data" / PACK_NAME).resolve()
        if p not in found:
            found.append(p)
    return found


def default_pack_path() -> Path | None:
    """The first existing shared pack among ``pack_candidates()``, or ``None``."""
    return next((p for p in pack_candidates() if p.is_file()), None)


def _announce_synthetic(reasons: list[str]) -> None:
    msg = ("NO CIFAR-10 DATA FOUND; FALLING BACK TO SYNTHETIC DATA. Results will not be CIFAR-10 "
           "results (every report is marked synthetic). Looked for: " + "; ".join(reasons) +
           f". Point --data or ${DATA_ENV} at the JPEG pack (pack=PATH) or a torchvision root.")
    warnings.warn(msg, SyntheticDataWarning, stacklevel=3)
    print(f"resnet_probe.data: WARNING: {msg}", file=sys.stderr, flush=True)


def _resolve_auto(download: bool, cache: bool, synthetic_size: tuple[int, int], seed: int) -> DataSource:
    reasons = []
    env = os.environ.get(DATA_ENV, "").strip()
    if env and env != "auto":
        try:
            return resolve_source(env, download=download, cache=cache, synthetic_size=synthetic_size,
                                  synthetic_seed=seed)
        except (OSError, ValueError) as exc:
            raise type(exc)(f"${DATA_ENV}={env!r} could not be used: {exc}") from exc
    reasons.append(f"${DATA_ENV} (unset)")
    pack = default_pack_path()
    if pack is not None:
        return load_pack(pack, cache=cache)
    reasons.append("shared pack at " + ", ".join(str(p) for p in pack_candidates()))
    root = default_cifar_root()
    if torchvision_data_present(root):
        return load_torchvision(root)
    reasons.append(f"torchvision CIFAR-10 under {root}")
    if not download:
        reasons.append("download not allowed")
    elif not torchvision_source.network_reachable():
        reasons.append(f"download (no network: {torchvision_source.CIFAR_HOST} unreachable)")
    else:
        try:
            return load_torchvision(root, download=True)
        except (OSError, RuntimeError) as exc:
            reasons.append(f"download into {root} failed ({exc})")
    _announce_synthetic(reasons)
    return make_synthetic(*synthetic_size, seed=seed)


def resolve_source(spec: str = "auto", *, download: bool = True, cache: bool = True,
                   synthetic_size: tuple[int, int] = (50_000, 10_000), synthetic_seed: int = 0) -> DataSource:
    """Resolve a data spec into a loaded ``DataSource``.

    Args:
        spec: ``auto``, ``pack``, ``pack=PATH``, ``torchvision``, ``torchvision=ROOT``, ``synthetic``,
            ``synthetic=N_TRAIN``, or a path to an ``.npz`` pack.
        download: allow torchvision to download CIFAR-10 (``auto`` tries only when the host answers).
        cache: use the on-disk cache of decoded packs.
        synthetic_size: ``(n_train, n_test)`` of the synthetic set.
        synthetic_seed: seed of the synthetic set.

    Returns:
        The loaded ``DataSource``.

    Raises:
        ValueError: ``spec`` is none of the valid forms, or a pack is malformed.
        FileNotFoundError: an explicit pack / torchvision root holds no data.
        ConnectionError: an explicit torchvision download failed.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"data spec must be a string, one of {', '.join(SPEC_FORMS)}; got {spec!r}")
    spec = os.fspath(spec).strip()
    head, sep, arg = spec.partition("=")
    if spec == "auto":
        return _resolve_auto(download, cache, synthetic_size, synthetic_seed)
    if spec == "synthetic":
        return make_synthetic(*synthetic_size, seed=synthetic_seed)
    if head == "synthetic" and sep:
        if not arg.isdigit() or int(arg) < 5:
            raise ValueError(f"synthetic=N_TRAIN needs an integer N_TRAIN >= 5; got {spec!r}")
        return make_synthetic(int(arg), int(arg) // 5, seed=synthetic_seed)
    if spec == "pack":
        pack = default_pack_path()
        if pack is None:
            raise FileNotFoundError(f"no shared CIFAR-10 pack found; looked at "
                                    f"{', '.join(map(str, pack_candidates()))}; use pack=PATH")
        return load_pack(pack, cache=cache)
    if head == "pack" and sep and arg:
        return load_pack(arg, cache=cache)
    if spec == "torchvision":
        return load_torchvision(default_cifar_root(), download=download)
    if head == "torchvision" and sep and arg:
        return load_torchvision(arg, download=download)
    if spec.endswith(".npz") or Path(spec).expanduser().is_file():
        return load_pack(spec, cache=cache)
    raise ValueError(f"unknown data spec {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")
