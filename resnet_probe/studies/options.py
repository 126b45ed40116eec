"""Command-line options shared by every study: scale, data, seeds, output folder, device.

``study_parser`` builds the common parser; a study adds its own options with ``default=None`` so that
``scale_settings`` can tell an explicit command-line value (which always wins) from "use the scale's
setting". ``--set KEY=VALUE`` overrides any scale setting by name without a dedicated option.
"""
from __future__ import annotations

import argparse
import ast
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a device is resolved, so that --help stays instant
    import torch

SCALES = ("quick", "paper")
DEVICES = ("auto", "cpu", "cuda")


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def study_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser every study starts from.

    Args:
        name: study name (used as the program name, e.g. ``degradation``).
        description: one paragraph shown by ``--help``.

    Returns:
        A parser with ``--scale {quick,paper}`` (default quick), ``--data`` (default ``auto``; the forms of
        ``resnet_probe.data.resolve_source``), ``--seeds`` (ints, default 0), ``--out`` (default ``runs``),
        ``--device {auto,cpu,cuda}``, ``--threads N`` (see ``set_threads``) and ``--set KEY=VALUE`` (repeatable
        scale-setting override).
    """
    p = argparse.ArgumentParser(prog=name, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="quick",
                   help="quick: minutes on a CPU; paper: the paper recipe, for a GPU")
    p.add_argument("--data", default="auto",
                   help="auto | pack | pack=PATH | torchvision | torchvision=ROOT | synthetic | PATH.npz")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training / sampling seeds")
    p.add_argument("--out", default="runs", help="folder under which the new run folder is created")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto picks cuda when available")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core); on a machine shared with "
                        "other jobs, 1 avoids OpenMP stalls")
    p.add_argument("--set", dest="overrides", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="override one scale setting by name (Python literal values), e.g. --set epochs=2")
    return p


def scale_settings(args: argparse.Namespace, quick: dict, paper: dict) -> dict:
    """The settings of the chosen scale with explicit command-line values applied on top.

    A setting is overridden by ``args.<key>`` when that attribute exists and is not ``None`` (study options
    default to ``None``), and by ``--set key=value``, which wins over both.

    Args:
        args: parsed namespace from a ``study_parser`` parser.
        quick: settings of the quick scale.
        paper: settings of the paper scale (must have the same keys as ``quick``).

    Returns:
        A new dict of settings.

    Raises:
        ValueError: unknown scale, mismatched keys, or ``--set`` naming an unknown setting.
    """
    if set(quick) != set(paper):
        raise ValueError(f"quick and paper settings differ in keys: {sorted(set(quick) ^ set(paper))}")
    scale = getattr(args, "scale", "quick")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    settings = dict(quick if scale == "quick" else paper)
    for key in settings:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    for key, value in getattr(args, "overrides", None) or []:
        if key not in settings:
            raise ValueError(f"--set {key}: unknown setting; valid: {', '.join(sorted(settings))}")
        settings[key] = value
    return settings


def resolve_device(name: str = "auto") -> "torch.device":
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU raises.

    Args:
        name: ``auto``, ``cpu`` or ``cuda`` (``cuda:N`` accepted).

    Returns:
        The ``torch.device``.
    """
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but no CUDA GPU is available; use --device cpu or auto")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")


def resolve_data(spec: str = "auto", n_train: int | None = None, n_test: int | None = None):
    """Load a ``--data`` source; a synthetic set is made only as large as a study needs.

    Args:
        spec: a ``resnet_probe.data.resolve_source`` form.
        n_train: training images the study uses at most (sizes the synthetic set; ``None`` = 50,000).
        n_test: test images the study uses at most (``None`` = 10,000).

    Returns:
        The ``DataSource`` (``synthetic=True`` when it is not CIFAR-10; pass ``source.provenance()`` to
        ``new_run(data=...)``).
    """
    from ..data import resolve_source
    size = (n_train or 50_000, n_test or 10_000)
    return resolve_source(spec, synthetic_size=size)


def set_threads(n: int | None) -> None:
    """Use ``n`` CPU threads in torch's intra-op pool (``None``: leave torch's default).

    On a 2-core machine busy with other jobs, a 2-thread OpenMP pool stalls whenever one of its threads
    is descheduled: measured here, a ResNet-20 training step on 128 images took 3.3 s with 2 threads and
    0.64 s with 1 thread while other jobs ran.
    """
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be a positive number; got {n}")
    import torch
    torch.set_num_threads(n)


def add_load_arguments(parser: argparse.ArgumentParser, archs: tuple[str, ...] | None = None) -> None:
    """Add ``--arch`` (one of ``archs`` when given) and ``--allow-unsafe-load``: how model files are read."""
    parser.add_argument("--arch", choices=archs, default=None,
                        help="torchvision architecture of state_dict files, e.g. resnet50 (default: inferred "
                             "from the keys)")
    parser.add_argument("--allow-unsafe-load", dest="allow_unsafe_load", action="store_true",
                        help="load files that need arbitrary unpickling; this can execute code from the "
                             "file, so only use it for files from a source you trust")


def add_imagenet_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--weights``, ``--limit`` and ``--no-download``: pretrained torchvision models on ImageNet folders."""
    parser.add_argument("--weights", default=None, metavar="NAME",
                        help="torchvision weights for torchvision:ARCH models (IMAGENET1K_V1, IMAGENET1K_V2, "
                             "DEFAULT), read from torch.hub.get_dir()/checkpoints/; absent: random weights")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="with --data imagefolder=PATH: evaluate a seeded random subset of N images")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never download missing torchvision weights (without this flag they are "
                             "downloaded when download.pytorch.org answers)")
