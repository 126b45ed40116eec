"""The command line of every study, generated from its settings with jsonargparse.

``resnet-probe STUDY [MODEL ...] [options]`` and ``python studies/STUDY.py ...`` run here. The
conventions are those of ``resnet-probe fit``: ``--config FILE`` (a run's ``config.yaml`` repeats
it), ``--print_config``, dotted options for nested settings (``--settings.k_max 4``,
``--train.epochs 2``) and the real default of every option in ``--help``. ``--scale tiny|quick|paper``
picks the preset the settings start from (``Settings.quick()`` ...); options given after it win.

Everything the user gives is checked before a run folder exists: a bad option, setting, model
file or data spec ends with one line naming the problem and the valid choices, and exit status 2
(the traceback with ``--debug`` or ``RESNET_PROBE_DEBUG=1``). A study that fails once running
leaves its run folder marked ``failed`` and exits 1.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
import traceback
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ..checkpoints import TORCHVISION_ARCHS
from ..shards import close_process_group, launched_world_size
from ..train.fit import resolve_device
from . import STUDIES
from .inputs import load_data, load_models
from .spec import StudyCommand
from .train_zoo import ZooSettings

__all__ = ["SCALES", "UserError", "main", "study_command"]

SCALES = ("tiny", "quick", "paper")
DEBUG_ENV = "RESNET_PROBE_DEBUG"


class UserError(ValueError):
    """A problem with what the user asked for (reported in one line, exit status 2)."""


def study_command(name: str) -> StudyCommand:
    """The ``COMMAND`` of study ``name`` (``resnet_probe.studies.<name>``)."""
    if name not in STUDIES:
        raise UserError(f"unknown study {name!r}; valid studies: {', '.join(STUDIES)}")
    return importlib.import_module(f"{__package__}.{name}").COMMAND


def _scale(argv: list[str]) -> str:
    """The scale the settings start from: the last ``--scale`` given, on the command line or in a
    ``--config`` file, in command-line order (default ``quick``)."""
    scale = "quick"
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--scale="):
            value = arg.split("=", 1)[1]
        elif arg == "--scale" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg in ("--config",) and i + 1 < len(argv) or arg.startswith("--config="):
            file = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            try:
                loaded = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue  # the parser reports the bad file
            value = loaded.get("scale") if isinstance(loaded, dict) else None
        if value is not None:
            if value not in SCALES:
                raise UserError(f"unknown scale {value!r}; valid scales: {', '.join(SCALES)}")
            scale = value
    return scale


def build_parser(cmd: StudyCommand, scale: str = "quick") -> ArgumentParser:
    """The study's parser, its settings (and training settings) defaulting to the ``scale`` preset."""
    p = ArgumentParser(prog=f"resnet-probe {cmd.name}", description=cmd.description, allow_abbrev=False,
                       exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of options, e.g. a run's config.yaml")
    if cmd.inputs != "data":
        what = ("a train_zoo run folder (its training records and models)" if cmd.inputs == "zoo" else
                "project .ckpt, train_zoo run folder, torchvision state_dict file, torchvision:ARCH or timm:NAME")
        p.add_argument("models", nargs="*", type=str, default=[],
                       help=f"{what}; none: train the nets of --train here")
    p.add_argument("--scale", type=Literal["tiny", "quick", "paper"], default=scale,
                   help="preset the settings start from: tiny (a smoke test), quick (minutes on a CPU), paper "
                        "(the papers' sizes, for a GPU); options given after it win")
    p.add_argument("--data", type=str, default="auto",
                   help="auto | pack | pack=PATH | torchvision | torchvision=ROOT | synthetic | PATH.npz | "
                        "imagefolder=PATH (ImageNet-style folder, for torchvision / timm models)")
    p.add_argument("--seeds", type=list[int], default=[0],
                   help="training seeds, and the seeds of random weights, image subsets and sampling")
    p.add_argument("--out", type=str, default="runs", help="folder under which the new run folder is created")
    p.add_argument("--device", type=Literal["auto", "cpu", "cuda"], default="auto",
                   help="auto picks cuda when available")
    p.add_argument("--threads", type=Optional[int], default=cmd.threads,
                   help="CPU threads for torch (null: torch's choice; 1 avoids OpenMP stalls on a shared machine)")
    p.add_argument("--debug", type=bool, default=False, help="show the traceback of an error")
    if cmd.inputs == "models":
        p.add_argument("--arch", type=Optional[Literal[TORCHVISION_ARCHS]], default=None,
                       help="torchvision architecture of state_dict files (null: inferred from the keys)")
        p.add_argument("--weights", type=Optional[str], default=None,
                       help="torchvision weights for torchvision:ARCH models (IMAGENET1K_V1, IMAGENET1K_V2, "
                            "DEFAULT), read from torch.hub.get_dir()/checkpoints/; null: random weights")
        p.add_argument("--allow_unsafe_load", type=bool, default=False,
                       help="load model files that need arbitrary unpickling; this can run code from the file, "
                            "so only for files from a source you trust (a warning names each file)")
        p.add_argument("--download", type=bool, default=True,
                       help="download missing torchvision weights when download.pytorch.org answers")
    p.add_class_arguments(cmd.settings, "settings", sub_configs=True)
    p.set_defaults({"settings": dataclasses.asdict(cmd.preset(scale))})
    if cmd.train is not None:
        p.add_class_arguments(ZooSettings, "train", sub_configs=True,
                              help="the nets trained when no model is given")
        p.set_defaults({"train": dataclasses.asdict(cmd.train(scale))})
    return p


def _check_out(out: str) -> None:
    """Refuse an output folder that cannot be created or written, before anything is made in it."""
    path = Path(out).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {existing}")


def _config_models(cfg: Namespace) -> list[str]:
    """The models of the last ``--config`` file that names some: a positional list given on the command line
    (even empty) would otherwise replace them."""
    models: list[str] = []
    for path in cfg.get("config") or []:
        loaded = yaml.safe_load(Path(str(path)).read_text(encoding="utf-8"))
        if isinstance(loaded, dict) and loaded.get("models"):
            models = [str(m) for m in loaded["models"]]
    return models


def resolve_inputs(cmd: StudyCommand, parser: ArgumentParser, cfg: Namespace) -> dict[str, Any]:
    """Check and load what the study runs on (settings, device, models, data), before any run folder exists.

    Returns:
        The keyword arguments of the study's ``run``.

    Raises:
        UserError: naming the problem (and the valid choices where there are some).
    """
    try:
        init = parser.instantiate(cfg)  # the settings dataclasses check their values
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    settings, train = init.settings, getattr(init, "train", None)
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise UserError(f"--threads must be a positive number; got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    try:
        resolve_device(cfg.device)
    except ValueError as e:
        raise UserError(str(e)) from None
    _check_out(cfg.out)
    seeds = [int(s) for s in cfg.seeds]
    if not seeds:
        raise UserError("--seeds needs at least one seed")
    kwargs: dict[str, Any] = dict(out=cfg.out, seeds=seeds, device=cfg.device, scale=cfg.scale)
    sources = list(getattr(cfg, "models", []) or []) or _config_models(cfg)
    _check_processes(cmd, sources)
    zoo = None
    try:
        if sources:
            load = dict(arch=cfg.arch, weights=cfg.weights, allow_unsafe=cfg.allow_unsafe_load,
                        download=cfg.download) if cmd.inputs == "models" else {}
            zoo = load_models(sources, cmd.families, seed=seeds[0], **load)
            if cmd.inputs == "zoo" and not zoo.folders:
                raise UserError(f"{cmd.name} reads the training records of a train_zoo run: give its run folder "
                                "(or no model, to train the nets of --train here)")
            if not zoo.models:
                raise UserError(f"no model to analyse in {', '.join(sources)}")
        data = None
        if cmd.inputs != "zoo" or zoo is None:
            n_train = train.data_sizes[0] if zoo is None and train is not None else 1
            if cmd.training_images and n_train is not None:
                n_train = max(n_train, settings.n_examples)
            n_test = getattr(settings, "n_examples", None)
            if cmd.inputs == "data":
                n_train, n_test = settings.data_sizes
            data = load_data(cfg.data, n_train=n_train, n_test=n_test, seed=seeds[0])
    except UserError:
        raise
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, TypeError) as e:
        raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if cmd.inputs == "data":
        return {"settings": settings, "data": data, **kwargs}
    return {"settings": settings, "models": zoo, "data": data, "train": train, **kwargs}


def _check_processes(cmd: StudyCommand, sources: list[str]) -> None:
    """Under torchrun with several processes, only a sharded study analysing given models may run."""
    try:
        world = launched_world_size()
    except ValueError as e:
        raise UserError(str(e)) from None
    if world <= 1:
        return
    sharded = [name for name in STUDIES if study_command(name).sharded] if not cmd.sharded else []
    if sharded:
        raise UserError(f"{cmd.name} does not split its images over processes; run it in one process (studies "
                        f"that do, under torchrun: {', '.join(sharded)})")
    if not sources:
        raise UserError(f"a sharded {cmd.name} run ({world} processes) analyses given models and does not train: "
                        "train them first in one process (resnet-probe train_zoo) and give the run folder")


def _one_line(error: Exception) -> str:
    """A jsonargparse error as one line: ``--settings.mode: expected one of zero_branch, shortcut_only; got x``."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    text = re.sub(r'Parser key "([^"]+)":', r"--\1:", text)
    text = re.sub(r"Expected a typing\.Literal\[([^\]]*)\]", lambda m: "expected one of " + m[1].replace("'", ""), text)
    text = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", text)
    return text.replace(". Got value:", "; got")


def main(name: str, argv: list[str] | None = None) -> int:
    """Run study ``name`` on the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_ENV in os.environ and os.environ[DEBUG_ENV] not in ("", "0") or "--debug" in argv
    prog = f"resnet-probe {name}"
    try:
        cmd = study_command(name)
        parser = build_parser(cmd, _scale(argv))
        try:
            cfg = parser.parse_args(argv)
        except ArgumentError as e:
            raise UserError(f"{_one_line(e)} (see --help)") from None
        kwargs = resolve_inputs(cmd, parser, cfg)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        cmd.run(**kwargs)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the run folder is marked interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - reported in one line; the run folder records it as failed
        if debug:
            traceback.print_exc()
        print(f"{prog}: failed: {type(e).__name__}: {e} (the run folder is marked failed; --debug shows the "
              "traceback)", file=sys.stderr)
        return 1
    close_process_group()
    return 0
