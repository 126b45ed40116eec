"""Safe loading of models for studies: the project's checkpoints, torchvision and timm ResNet state_dicts.

``load_model`` always reads files with ``torch.load(..., weights_only=True)``, which rebuilds
tensors and plain containers but never calls arbitrary Python objects. A file that needs more than
that (a pickled ``nn.Module``, or anything naming other globals) could run code of the file's
author when unpickled, so it is refused; a user who trusts the file can pass ``allow_unsafe=True``
(CLI: ``--allow_unsafe_load``). Files that are truncated, are not checkpoints, or do not fit any
known architecture raise ``CheckpointError`` naming the file and the mismatch.

This module is plain PyTorch: it imports neither Lightning nor the training code.
"""
from __future__ import annotations

import functools
import io
import os
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from .models import CifarNet
from .models.cifar import CONFIG_KEYS

# block type and blocks per stage: a cheap first filter before comparing every shape
_LAYOUTS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
            "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
            "resnet152": ("bottleneck", (3, 8, 36, 3)), "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3)),
            "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3)), "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3)),
            "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3)), "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3))}
TORCHVISION_ARCHS = tuple(_LAYOUTS)
TIMM_PREFIX = "timm:"
TIMM_MODULES = ("resnet", "resnetv2")  # timm model modules whose blocks the anatomy reads
UNSAFE_FLAG = "--allow_unsafe_load"


class CheckpointError(ValueError):
    """A file that cannot be loaded as a model; the message names the file and the reason."""


class UnsafeLoadWarning(UserWarning):
    """A file is being unpickled without ``weights_only`` because the user allowed it; named each time."""


warnings.simplefilter("always", UnsafeLoadWarning)  # every unpickled file is named, not only the first


class UnsafeCheckpointError(CheckpointError):
    """A file that would need arbitrary unpickling (possible code execution) to load."""


# ---- reading files ------------------------------------------------------------------------------

def _pickle_globals(data: bytes, max_pickles: int = 4) -> list[str]:
    """The ``module.name`` globals a pickle stream asks for (the legacy format holds several pickles).

    Raises:
        ValueError: the bytes are not a well-formed pickle stream.
    """
    found, strings, memo = [], [], {}
    stream = io.BytesIO(data)
    for _ in range(max_pickles):
        if stream.tell() >= len(data):
            break
        for op, arg, _pos in pickletools.genops(stream):
            if isinstance(arg, str) and op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE",
                                                    "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING"):
                strings.append(arg)
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[arg] = strings[-1]
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[arg])
            elif op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown global>")
    return found


def _unsafe_globals(path: Path) -> list[str]:
    """Globals in the file's pickle(s) that ``weights_only`` loading does not allow."""
    if zipfile.is_zipfile(path):  # torch.save's format: the pickle is one member of the archive
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if not members:
                raise ValueError("zip archive without data.pkl")
            raw = zf.read(members[0])
    else:
        raw = path.read_bytes()
    names = _pickle_globals(raw)
    try:  # torch's own allow-list; if its private layout changes, every global is reported
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001
        allowed = set()
    allowed |= {f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals()
                if hasattr(g, "__qualname__")}
    flagged = {n for n in names if n not in allowed} or set(names)
    return sorted(flagged, key=lambda n: (n.startswith(("torch.", "__builtin__.", "builtins.")), n))


def _short_reason(error: Exception) -> str:
    """The informative line of a ``torch.load`` error, without its advice to drop ``weights_only``."""
    noise = ("weights_only", "weights only", "file an issue", "documentation", "pytorch 2.6", "trusted source")
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not any(n in ln.lower() for n in noise)]
    return f"{type(error).__name__}: {(useful or lines or [''])[0][:160]}"


def read_checkpoint(path: str | os.PathLike, *, allow_unsafe: bool = False) -> Any:
    """``torch.load`` a file onto the CPU with ``weights_only=True``, refusing unsafe files.

    Args:
        path: the file.
        allow_unsafe: if the file needs arbitrary unpickling, load it anyway (``weights_only=False``).
            Only for files from a source you trust: unpickling can execute any code.

    Raises:
        UnsafeCheckpointError: the file needs arbitrary unpickling and ``allow_unsafe`` is false.
        CheckpointError: missing, empty, truncated or not a PyTorch file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty, not a checkpoint")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols; the outcome is reported below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 - classified below
        reason = _short_reason(safe_error)
        try:
            unsafe = _unsafe_globals(path)
        except Exception:  # noqa: BLE001 - not a pickle / zip at all
            unsafe = None
        if not unsafe:
            with open(path, "rb") as f:
                zip_start = f.read(4) == b"PK\x03\x04"
            detail = ("a truncated torch.save zip archive (its central directory is missing)"
                      if zip_start and not zipfile.is_zipfile(path)
                      else "truncated, corrupt or not a PyTorch checkpoint")
            raise CheckpointError(f"{path}: cannot be read as a checkpoint: {detail} ({reason})") from None
        if not allow_unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused: loading it needs arbitrary unpickling (it names "
                f"{', '.join(unsafe[:12])}{' ...' if len(unsafe) > 12 else ''}), and unpickling can execute "
                "arbitrary code chosen by whoever made the file. Only tensors and plain containers are "
                "loaded by default (torch.load(weights_only=True)). If you trust the file's source, load "
                f"it knowingly with allow_unsafe=True (command line: {UNSAFE_FLAG}).") from None
    warnings.warn(f"{path}: loading with arbitrary unpickling (allowed by allow_unsafe / {UNSAFE_FLAG}); this can "
                  f"run code from the file, which names {', '.join(unsafe[:6])}{' ...' if len(unsafe) > 6 else ''}",
                  UnsafeLoadWarning, stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot be loaded even without weights_only: "
                              f"{type(e).__name__}: {e}") from None


# ---- matching state_dicts to architectures ------------------------------------------------------

def _shapes(sd: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _mismatch(expected: dict[str, tuple], got: dict[str, tuple], limit: int = 10) -> str:
    """Missing keys, unexpected keys and shape mismatches between two key -> shape maps."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: checkpoint {got[k]} vs model {expected[k]}" for k in expected
              if k in got and got[k] != expected[k]]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label} ({len(items)}): {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or "no differences"


def torchvision_model(arch: str, num_classes: int = 1000, device: str | torch.device = "cpu") -> nn.Module:
    if arch not in TORCHVISION_ARCHS:
        raise CheckpointError(f"unknown torchvision architecture {arch!r}; valid: {', '.join(TORCHVISION_ARCHS)}")
    with torch.device(device):
        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def timm_names() -> tuple[str, ...]:
    """The timm model names ``load_model`` accepts as ``timm:NAME`` (its ResNet and ResNetV2 families).

    Raises:
        CheckpointError: timm is not installed.
    """
    try:
        import timm  # optional dependency, needed only for timm models
    except ImportError:
        raise CheckpointError("timm models need the timm package (pip install timm)") from None
    return tuple(n for m in TIMM_MODULES for n in timm.list_models(module=m))


def check_timm_name(name: str) -> None:
    """Raise ``CheckpointError`` unless timm is installed and ``name`` is one of ``timm_names()``."""
    names = timm_names()
    if name not in names:
        raise CheckpointError(f"unknown timm ResNet {name!r}; valid: {', '.join(names)}")


def timm_model(name: str, num_classes: int | None = None, zero_init_last: bool = True) -> nn.Module:
    """A timm ResNet / ResNetV2 with random weights (``timm.create_model(name, pretrained=False)``).

    Args:
        name: one of ``timm_names()``.
        num_classes: classifier outputs (``None``: timm's 1000).
        zero_init_last: timm's default zeroes the last BN scale of every branch, so every F(x) is 0 and a
            random net measures nothing; ``False`` keeps that BN at scale 1 (as torchvision's random ResNets).

    Raises:
        CheckpointError: timm is not installed, or ``name`` is not one of ``timm_names()``.
    """
    check_timm_name(name)
    import timm  # optional dependency, needed only for timm models
    options = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=False, zero_init_last=zero_init_last, **options)


@functools.lru_cache(maxsize=None)
def _torchvision_shapes(arch: str, num_classes: int) -> dict[str, tuple]:
    return _shapes(torchvision_model(arch, num_classes, device="meta").state_dict())


def _strip_prefix(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """A state_dict of tensors inside a loaded object (itself, or under ``state_dict`` / ``model``)."""
    for candidate in (obj, *(obj.get(k) for k in ("state_dict", "model") if isinstance(obj, dict))):
        if isinstance(candidate, dict) and candidate and all(isinstance(v, torch.Tensor) for v in candidate.values()):
            return _strip_prefix(dict(candidate), "module.")
    return None


def _num_classes(sd: dict[str, torch.Tensor], default: int = 1000) -> int:
    """Rows of the classifier: ``fc`` (torchvision, timm ResNet) or ``head.fc`` (timm ResNetV2: a 1x1 conv)."""
    for key in ("fc.weight", "head.fc.weight"):
        w = sd.get(key)
        if isinstance(w, torch.Tensor) and w.dim() in (2, 4):
            return int(w.shape[0])
    return default


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str,
                 assign: bool = False) -> None:
    """``load_state_dict(strict=True)``, with a ``CheckpointError`` naming every difference instead."""
    expected = _shapes(model.state_dict())
    got = _shapes(sd)
    if expected != got:
        raise CheckpointError(f"{path}: does not match {what}: {_mismatch(expected, got)}")
    model.load_state_dict(sd, strict=True, assign=assign)



def _layout(keys) -> tuple[str, tuple[int, ...]]:
    blocks = {tuple(k.split(".")[:2]) for k in keys if k.startswith("layer") and k.count(".") >= 2}
    counts = tuple(sum(1 for layer, _ in blocks if layer == f"layer{s}") for s in range(1, 5))
    kind = "bottleneck" if any(".conv3." in k for k in keys) else "basic"
    return kind, counts


def _infer_torchvision_arch(sd: dict[str, torch.Tensor], path: Path) -> str:
    got, n = _shapes(sd), _num_classes(sd)
    layout = _layout(got)
    likely = [a for a in TORCHVISION_ARCHS if _LAYOUTS[a] == layout]
    matches = [a for a in likely if _torchvision_shapes(a, n) == got]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CheckpointError(f"{path}: matches several architectures ({', '.join(matches)}); pass arch=")

    def distance(arch: str) -> int:
        exp = _torchvision_shapes(arch, n)
        return len(exp.keys() ^ got.keys()) + sum(exp[k] != got[k] for k in exp.keys() & got.keys())

    representatives = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # one per layout
    closest = min(likely or representatives, key=distance)
    raise CheckpointError(f"{path}: the state_dict matches none of the torchvision ResNets "
                          f"({', '.join(TORCHVISION_ARCHS)}; a timm model's file needs arch='timm:NAME'); "
                          f"closest is {closest}: {_mismatch(_torchvision_shapes(closest, n), got)}")


# ---- the entry point ------------------------------------------------------------------------------

def load_model(source: str | os.PathLike, *, arch: str | None = None,
               allow_unsafe: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model for analysis, in eval mode on the CPU.

    Args:
        source: a project checkpoint (``.ckpt`` with ``hyper_parameters`` and a ``model.``-prefixed
            ``state_dict``), a torchvision or timm ResNet state_dict file, ``"torchvision:NAME"``
            for a torchvision ResNet with random weights (``NAME`` in ``TORCHVISION_ARCHS``), or
            ``"timm:NAME"`` for a timm ResNet with random weights (``NAME`` in ``timm_names()``).
        arch: the architecture of a state_dict file: a torchvision name, or ``"timm:NAME"`` for a
            timm model; ``None`` = inferred from its keys and shapes among the torchvision ResNets.
        allow_unsafe: load a file that needs arbitrary unpickling (only for trusted files).

    Returns:
        ``(model, info)`` with ``info`` = ``{"kind", "arch", "hparams", "path"}``; ``kind`` is
        ``"project"``, ``"torchvision"``, ``"torchvision-random"``, ``"timm"``, ``"timm-random"``
        or ``"module"`` (an unsafe-loaded pickled module); a timm model's ``arch`` is ``timm:NAME``.

    Raises:
        CheckpointError: naming the file and the problem (refused, unreadable, or mismatched keys).
    """
    if isinstance(source, str) and source.startswith("torchvision:"):
        name = source.split(":", 1)[1]
        model = torchvision_model(name)
        return model.eval(), {"kind": "torchvision-random", "arch": name, "hparams": {}, "path": None}
    if isinstance(source, str) and source.startswith(TIMM_PREFIX):
        model = timm_model(source[len(TIMM_PREFIX):], zero_init_last=False)  # a random F(x) that is not 0
        return model.eval(), {"kind": "timm-random", "arch": source, "hparams": {}, "path": None}
    if arch is not None and arch.startswith(TIMM_PREFIX):
        check_timm_name(arch[len(TIMM_PREFIX):])  # reported before the file is read
    path = Path(source)
    obj = read_checkpoint(path, allow_unsafe=allow_unsafe)
    if isinstance(obj, nn.Module):
        return obj.eval(), {"kind": "module", "arch": type(obj).__name__, "hparams": {}, "path": str(path)}

    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if isinstance(hparams, dict) and isinstance(obj.get("state_dict"), dict):  # arch is ignored here
        sd = {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        if not sd:
            raise CheckpointError(f"{path}: a Lightning checkpoint without 'model.' weights; keys: "
                                  f"{', '.join(list(obj['state_dict'])[:10])}")
        kwargs = {k: hparams[k] for k in CONFIG_KEYS if k in hparams}
        try:
            model = CifarNet(**kwargs)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its hyper_parameters do not describe a CIFAR net: {e}") from None
        what = f"{model.family}-{model.depth}"
        load_strict(model, sd, path, f"the {what} network its hyper_parameters describe")
        return model.eval(), {"kind": "project", "arch": what, "hparams": dict(hparams), "path": str(path)}

    sd = _as_state_dict(obj)
    if sd is None:
        keys = ", ".join(map(str, list(obj)[:10])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: neither a project checkpoint nor a state_dict of tensors (found: {keys})")
    if arch is not None and arch.startswith(TIMM_PREFIX):
        # built on the CPU, not the meta device: some timm buffers (anti-aliasing filters) are not saved
        model = timm_model(arch[len(TIMM_PREFIX):], _num_classes(sd))
        load_strict(model, sd, path, f"timm {arch[len(TIMM_PREFIX):]}")
        return model.eval(), {"kind": "timm", "arch": arch, "hparams": {}, "path": str(path)}
    arch = arch or _infer_torchvision_arch(sd, path)
    # built on the meta device and given the file's tensors: no time spent on a random init
    model = torchvision_model(arch, _num_classes(sd), device="meta")
    load_strict(model, sd, path, f"torchvision {arch}", assign=True)
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: no values for {', '.join(left[:10])} in torchvision {arch}")
    return model.eval(), {"kind": "torchvision", "arch": arch, "hparams": {}, "path": str(path)}
