"""The shape every analysis study shares: models in, one measurement per model, tables out, a report.

``analysis_run`` resolves the models (given, or trained into the run folder when none are),
draws the evaluation images, measures each model in turn (saving its tables after each, so an
interrupted run keeps the finished models), writes the study's report and returns a
``StudyResult``. The studies (``response_std``, ``lesion``, ``paths``, ``highway``) supply the
measurement and the report.

Sharded runs (``resnet_probe.shards``): a study whose measurement splits its images over ranks passes
its ``Shard``. Every rank loads the same models and images and measures them (each its part of the
images, the results combined so every rank holds one process's tables); only rank 0 opens the run
folder, saves the tables and writes the report, and every rank returns rank 0's run path. Rank 0 marks
the folder ``failed`` when a collective fails or times out, or when torchrun stops it because another
rank failed. A sharded run analyses given models: it does not train.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from ..report.interrupt import RunTerminated
from ..shards import ONE, Shard, ShardFailure, launched_world_size
from ..train.fit import resolve_device
from .inputs import StudyData, StudyModel, Zoo, as_study_models, check_labels
from .runs import StudyResult, progress, study_config, study_run
from .train_zoo import ZooSettings, trained_zoo

Measure = Callable[[StudyModel, torch.Tensor, torch.Tensor, dict], dict[str, pd.DataFrame]]
Report = Callable[[Any, dict[str, pd.DataFrame], StudyData, int], None]


def as_zoo(models: Zoo | Sequence | None, seed: int) -> Zoo | None:
    """A ``Zoo`` from what a caller passes (a ``Zoo``, ``StudyModel``s or networks), ``None`` for nothing."""
    if isinstance(models, Zoo):
        return models
    if not models:
        return None
    return Zoo(models=as_study_models(models, seed))


def analysis_run(study: str, *, title: str, source_file: str, settings: Any, models: Zoo | Sequence | None,
                 data: StudyData, out: str | Path, seeds: Sequence[int], device: str, train: ZooSettings,
                 scale: str | None, measure: Measure, report: Report, check: Callable[[StudyModel], None] = None,
                 shard: Shard | None = None) -> StudyResult:
    """Run an analysis study end to end (see the module docstring).

    Args:
        study: its name (run folder and command).
        title: the report's title.
        source_file: the study's module file (copied into the run folder).
        settings: its settings dataclass (needs ``n_examples``).
        models: the models to analyse; ``None`` or empty: train ``train``'s nets into the run folder.
        data: evaluation data (and training data when nets are trained).
        out: root of the run folders.
        seeds: training seeds; the first also draws the evaluation images.
        device: ``auto``, ``cpu`` or ``cuda``.
        train: the nets trained when no model is given.
        scale: the preset the settings came from (recorded).
        measure: ``(model, images, labels, keys) -> {table: DataFrame}`` for one model.
        report: ``(run, tables, data, n_images)``: texts, figures and headline from the tables.
        check: raises for a model the study cannot analyse, before anything is measured.
        shard: this rank's part of a sharded run (``None``: the study does not shard, and refuses to run
            under a launcher that started several processes).
    """
    dev = resolve_device(device)
    zoo = as_zoo(models, seeds[0])
    if zoo is not None and check is not None:
        for sm in zoo.models:
            check(sm)
    if shard is None and launched_world_size() > 1:
        raise ValueError(f"the {study} study does not split its images over ranks; run it in one process "
                         f"(not under torchrun with {launched_world_size()} processes)")
    shard = shard or ONE
    if shard.world_size > 1 and zoo is None:
        raise ValueError(f"a sharded {study} run analyses given models and does not train: train them first "
                         "in one process (resnet-probe train_zoo) and pass the run folder or checkpoints")
    config = study_config(models=[m.source for m in zoo.models] if zoo else [], data=data.spec, seeds=seeds,
                          device=device, out=out, scale=scale, settings=settings, train=train)
    if not shard.writer:
        path = Path(shard.broadcast(None, "the run folder's path"))
        tables, _ = _measure_all(study, zoo, data, settings, seeds, dev, measure, path.name, shard, save=None)
        return StudyResult(path, tables, zoo)
    with study_run(study, config, title=title, data=data.provenance(), source_file=source_file) as run:
        try:
            shard.broadcast(str(run.path), "the run folder's path")
            if zoo is None:
                zoo = trained_zoo(run, data, train, seeds, dev.type)
            tables, n_images = _measure_all(study, zoo, data, settings, seeds, dev, measure, run.path.name, shard,
                                            save=run.add_table)
        except RunTerminated as e:
            if shard.world_size == 1:
                raise
            raise ShardFailure(f"rank 0 of {shard.world_size} received SIGTERM: torchrun stops every rank when one "
                               "of them fails (its log names the rank and its error), or the job was cancelled") from e
        run.add_table("models", models_table(zoo.models, run.path.name))
        tables["models"] = run.table("models")
        report(run, tables, data, n_images)
    return StudyResult(run.path, tables, zoo)


def _measure_all(study: str, zoo: Zoo, data: StudyData, settings: Any, seeds: Sequence[int], dev: torch.device,
                 measure: Measure, run_name: str, shard: Shard, save: Callable[[str, pd.DataFrame], Any] | None
                 ) -> tuple[dict[str, pd.DataFrame], int]:
    """Measure every model of ``zoo`` on the evaluation images, saving each table after each model (rank 0).

    Returns:
        The tables and the number of evaluation images."""
    images, labels = data.evaluation(settings.n_examples, seeds[0], study)
    tables: dict[str, pd.DataFrame] = {}
    for sm in progress(zoo.models, study) if shard.writer else zoo.models:
        sm.model.to(dev).eval()
        check_labels(sm, labels, images)
        if shard.writer:
            ranks = f" over {shard.world_size} ranks" if shard.world_size > 1 else ""
            print(f"{study}: {sm.name} (seed {sm.seed}): {len(sm.blocks)} blocks, {len(labels):,} images{ranks}",
                  flush=True)
        for name, df in measure(sm, images.to(dev), labels.to(dev), sm.keys(run_name)).items():
            tables[name] = pd.concat([tables[name], df], ignore_index=True) if name in tables else df
            if save is not None:
                save(name, tables[name])
    return tables, len(labels)


def models_table(models: Sequence[StudyModel], run_name: str) -> pd.DataFrame:
    """One row per model and fact: blocks, trainable parameters, and the errors recorded when it was trained."""
    rows = []
    for sm in models:
        keys = {**sm.keys(run_name), "site": "network", "family": sm.family, "depth": sm.depth,
                "kind": sm.info.get("kind", ""), "source": sm.source or ""}
        rows += [{**keys, "metric": "n_blocks", "value": float(len(sm.blocks))},
                 {**keys, "metric": "parameters", "value": float(sm.n_parameters)}]
        for k, v in sm.info.get("metrics", {}).items():
            if k.endswith("error_percent"):
                rows.append({**keys, "metric": k, "value": float(v)})
    return pd.DataFrame(rows)
