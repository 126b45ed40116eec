"""What the command line needs to know of a study: its name, settings, run function and inputs.

Each study module defines ``COMMAND = StudyCommand(...)``; ``command`` builds the study's parser and
calls its ``run`` from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal


@dataclass(frozen=True)
class StudyCommand:
    """How a study is driven from the command line.

    Attributes:
        name: the study (``lesion``), also its subcommand and run-folder name.
        description: one paragraph for ``--help``.
        run: the study's ``run`` function.
        settings: its settings dataclass (with ``tiny()``, ``quick()`` and ``paper()``).
        inputs: ``models`` (analyses model sources), ``zoo`` (reads a train_zoo run's records) or
            ``data`` (only data: train_zoo itself).
        train: the nets trained when no model is given, per scale (``None``: the study never trains).
        families: families a train_zoo folder contributes (``None``: all).
        threads: default CPU threads (``None``: torch's choice).
        training_images: the study evaluates ``settings.n_examples`` images of the training split, so the
            data must hold that many (a synthetic set is made large enough).
        sharded: the study splits its images over the processes torchrun starts (``resnet_probe.shards``).
    """

    name: str
    description: str
    run: Callable[..., Any]
    settings: type
    inputs: Literal["models", "zoo", "data"] = "models"
    train: Callable[[str], Any] | None = None
    families: tuple[str, ...] | None = None
    threads: int | None = None
    training_images: bool = False
    sharded: bool = False

    def preset(self, scale: str) -> Any:
        return getattr(self.settings, scale)()
