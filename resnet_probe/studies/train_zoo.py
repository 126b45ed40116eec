"""Train plain / highway / residual CIFAR nets over depths and seeds: the networks the other studies read.

Question: the input of every other study -- the same networks, trained the same way, kept together.
Each model is trained through the project's LightningModule (``resnet_probe.train.fit``) and written
to ``<run>/models/<family>-<depth>-seed<s>/`` (``last.ckpt``, Lightning's ``metrics.csv``, and
``probe_gradients.csv``: per-block gradient norms recorded by ``ProbeCallback`` every few steps).
Several seeds of one architecture are trained side by side as one grouped network
(``GroupedClassifier``) on a GPU (``seeds_side_by_side``: ``auto`` = on CUDA); each is exported as an
ordinary ``<family>-<depth>-seed<s>/last.ckpt``. The run's tables are ``curves`` (training /
validation error and loss against the iteration), ``final`` (per model and seed: final train /
validation / test error and loss, steps, seconds, parameters, and the ``checkpoint`` path relative to
the run folder) and ``gradients`` (the gradient records of all models).

Scales: ``quick`` trains plain and residual nets of depths 8 and 20 and a highway net of depth 20 on
4,000 training images for 3 epochs with the one-cycle ``fast`` recipe (CPU, minutes); ``paper`` is He
et al. 2016's recipe (45k/5k split, crop + flip, SGD 0.1 /10 at 32k and 48k, 64k iterations) for
depths 20, 32, 44, 56 and 110, for a GPU; ``tiny`` is a seconds-long smoke test.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

from ..atomic import atomic_path
from ..data import CifarDataModule, normalize, random_subset
from ..models import count_parameters
from ..probes.callback import GRADIENTS_CSV, ProbeCallback
from ..report import format_mean_std
from ..train import CifarClassifier
from ..train.fit import fit, quiet_lightning, resolve_device
from ..train.grouped import GroupedClassifier, per_model_train_batches
from .inputs import StudyData, StudyModel, Zoo, family_rank, load_model_source, model_name
from .spec import StudyCommand
from .runs import StudyResult, progress, study_config, study_run

FAMILIES = ("plain", "highway", "residual", "preact")
TITLE = "Model zoo: plain / highway / residual"


@dataclass(frozen=True)
class ZooSettings:
    """The networks to train and how (He et al. 2016, section 4.2, at ``paper`` scale).

    Args:
        families: families trained (plain, highway, residual, preact).
        depths: per family, the depths (6n+2 layers) trained.
        recipe: ``fast`` (one-cycle, for CPU-length runs) or ``paper`` (SGD 0.1, /10 at 32k and 48k).
        lr: peak (fast) or initial (paper) learning rate.
        epochs: training length in epochs (``None``: by ``max_steps``).
        max_steps: training length in optimizer steps (``None``: by ``epochs``).
        train_limit: training images, a seeded subset (``None``: all 45,000).
        val_size: training images held out for validation.
        test_limit: test images for the final test error (``None``: all 10,000).
        batch_size: images per optimizer step.
        augment: pad-4 random crop and horizontal flip.
        log_every_n_steps: optimizer steps between training-curve points.
        val_every_n_steps: optimizer steps between validation-curve points.
        grad_every_n_steps: optimizer steps between gradient-norm records.
        seeds_side_by_side: train several seeds as one grouped network: ``auto`` (on CUDA), ``yes``, ``no``.
        compile: torch.compile the network (CUDA only).
        gate_bias_decay: apply weight decay to the highway gate biases (off: decay would pull the
            carry-biased initialisation towards zero, and the highway study reports those biases).
        train_eval_examples: training images each net is evaluated on after training, in eval mode, one
            error per image (the data of the degradation study's interval).
    """

    families: tuple[str, ...] = ("plain", "highway", "residual")
    depths: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"plain": (8, 20), "highway": (20,), "residual": (8, 20)})
    recipe: Literal["fast", "paper"] = "fast"
    lr: float = 0.1
    epochs: int | None = 3
    max_steps: int | None = None
    train_limit: int | None = 4000
    val_size: int = 1000
    test_limit: int | None = 1000
    batch_size: int = 64
    augment: bool = False
    log_every_n_steps: int = 10
    val_every_n_steps: int = 63
    grad_every_n_steps: int = 5
    seeds_side_by_side: Literal["auto", "yes", "no"] = "auto"
    compile: bool = False
    gate_bias_decay: bool = False
    train_eval_examples: int = 1000

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; valid: {', '.join(FAMILIES)}")
        object.__setattr__(self, "families", tuple(self.families))
        object.__setattr__(self, "depths", {f: tuple(int(d) for d in ds) for f, ds in dict(self.depths).items()})
        for f in self.families:
            depths = self.depths.get(f)
            if not depths:
                raise ValueError(f"no depths for family {f!r}: give depths as {{family: [depth, ...]}} for each of "
                                 f"{', '.join(self.families)}")
            bad = [d for d in depths if d < 8 or (d - 2) % 6]
            if bad:
                raise ValueError(f"depths must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...); got {bad} for {f}")
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError(f"give exactly one of epochs and max_steps; got epochs={self.epochs}, "
                             f"max_steps={self.max_steps}")
        for name in ("batch_size", "val_size", "log_every_n_steps", "val_every_n_steps", "grad_every_n_steps",
                     "train_eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")

    @classmethod
    def quick(cls) -> "ZooSettings":
        """Depths 8 and 20 (highway 20), 4,000 images, 3 epochs: minutes on a CPU."""
        return cls()

    @classmethod
    def paper(cls) -> "ZooSettings":
        """He et al. 2016: 45k / 5k split, crop + flip, batch 128, SGD 0.1 /10 at 32k and 48k, 64k iterations."""
        return cls(depths={f: (20, 32, 44, 56, 110) for f in ("plain", "highway", "residual")}, recipe="paper",
                   lr=0.1, epochs=None, max_steps=64_000, train_limit=None, val_size=5000, test_limit=None,
                   batch_size=128, augment=True, log_every_n_steps=100, val_every_n_steps=2000,
                   grad_every_n_steps=500, compile=True)

    @classmethod
    def tiny(cls) -> "ZooSettings":
        """A smoke test in seconds (not a result)."""
        return cls(depths={"plain": (8, 14), "highway": (14,), "residual": (8, 14)}, epochs=1, train_limit=128,
                   val_size=64, test_limit=64, batch_size=64, log_every_n_steps=1, val_every_n_steps=1,
                   grad_every_n_steps=1, train_eval_examples=64)

    def only(self, families: Sequence[str], depths: Sequence[int] | dict[str, Sequence[int]] | None = None
             ) -> "ZooSettings":
        """These settings for ``families`` only (and other ``depths``: one list for all, or per family)."""
        chosen = depths if depths is not None else self.depths
        per = {f: tuple(chosen[f] if isinstance(chosen, dict) else chosen) for f in families}
        return replace(self, families=tuple(families), depths=per)

    @property
    def grid(self) -> list[tuple[str, int]]:
        """The ``(family, depth)`` pairs trained, in order."""
        return [(f, d) for f in self.families for d in self.depths[f]]

    def side_by_side(self, seeds: Sequence[int], device: str) -> bool:
        """Whether several ``seeds`` train as one grouped network (``auto``: on CUDA only; on a CPU it saves
        no time)."""
        return len(seeds) > 1 and (self.seeds_side_by_side == "yes"
                                   or (self.seeds_side_by_side == "auto" and device == "cuda"))

    @property
    def data_sizes(self) -> tuple[int | None, int | None]:
        """Training and test images these settings use (``None`` = all), to size a synthetic set."""
        n_train = None if self.train_limit is None else self.train_limit + self.val_size
        return n_train, self.test_limit

    def describe(self, seeds: Sequence[int], device: str) -> str:
        """One Markdown paragraph stating the training setup."""
        length = f"{self.max_steps:,} iterations" if self.max_steps else f"{self.epochs} epochs"
        images = "all training images" if self.train_limit is None else f"{self.train_limit:,} training images"
        tests = "all" if self.test_limit is None else f"{self.test_limit:,}"
        depths = "; ".join(f"{f} {', '.join(map(str, self.depths[f]))}" for f in self.families)
        together = (f" The seeds of each network were trained side by side as one grouped network, sharing seed "
                    f"{seeds[0]}'s validation split, each with its own initialisation, batch order and augmentation."
                    if self.side_by_side(seeds, device) else "")
        decay = "" if "highway" not in self.families else (
            " Highway gate biases are " + ("" if self.gate_bias_decay else "not ") + "weight-decayed.")
        return (f"Depths: {depths}; seeds {', '.join(map(str, seeds))}. Recipe `{self.recipe}` (lr {self.lr}), "
                f"{length}, batch {self.batch_size}, {images} ({self.val_size:,} held out for validation), "
                f"augmentation {'pad-4 crop + flip' if self.augment else 'off'}; test error on {tests} test "
                f"images.{together}{decay}")


# ---- training one network -------------------------------------------------------------------------

class ValidationCurve(pl.Callback):
    """Keeps ``(optimizer steps done, {val metric: value})`` after every validation."""

    def __init__(self):
        self.points: list[tuple[int, dict[str, float]]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        if "val_error" in m and not trainer.sanity_checking:
            self.points.append((int(trainer.global_step), {k: float(v) for k, v in m.items() if k.startswith("val_")}))


def _curves(raw: pd.DataFrame, validations: list[tuple[int, dict]], keys: dict, model: str = "") -> pd.DataFrame:
    """Tidy training curves: error in percent and loss against the optimizer step.

    Training points are Lightning's ``train_*_step`` records in ``raw`` (its ``metrics.csv``: the mean over
    the batches since the previous record, in training mode); validation points are ``(step, metrics)``
    after ``step`` optimizer steps. ``model`` is the suffix of one model's columns in a side-by-side run
    (``/model1``), else empty.
    """
    rows = []
    for column, metric, scale in (("train_error_step", "error_percent", 100.0), ("train_loss_step", "loss", 1.0)):
        column += model
        if column in raw:
            part = raw[["step", column]].dropna().groupby("step", as_index=False).last()
            rows += [{**keys, "site": "network", "split": "train", "metric": metric, "value": float(v) * scale,
                      "step": int(step)} for step, v in zip(part["step"], part[column])]
    for step, m in dict(validations).items():
        rows += [{**keys, "site": "network", "split": "val", "metric": "error_percent",
                  "value": 100.0 * m["val_error" + model], "step": step},
                 {**keys, "site": "network", "split": "val", "metric": "loss", "value": m["val_loss" + model],
                  "step": step}]
    return pd.DataFrame(rows).sort_values(["split", "metric", "step"], kind="stable", ignore_index=True)


def _datamodule(source, s: ZooSettings, seed: int) -> CifarDataModule:
    return CifarDataModule.from_source(source, batch_size=s.batch_size, val_size=s.val_size, split_seed=seed,
                                       train_limit=s.train_limit, test_limit=s.test_limit, augment=s.augment,
                                       seed=seed)


def _train_and_evaluate(module, dm, s: ZooSettings, out_dir: Path, device: str, run_name: str, name: str,
                        fit_data: dict, val: dict, test: dict) -> tuple[pl.Trainer, ValidationCurve, dict]:
    """Train with a gradient-norm callback (``probe_gradients.csv``) and a validation-curve callback,
    then validate and test; returns the Trainer, the curve and ``{seconds, train, val, test}`` metrics."""
    grads = ProbeCallback(sites="*", every_n_epochs=0, every_n_steps=s.grad_every_n_steps, out_dir=out_dir,
                          run=run_name, model_name=name)
    validations = ValidationCurve()
    limits = module.trainer_limits
    steps = limits["max_steps"] if limits["max_steps"] >= 0 else limits["max_epochs"] * dm.steps_per_epoch
    start = time.perf_counter()
    trainer = fit(module, **fit_data, device=device, out_dir=out_dir, callbacks=[grads, validations],
                  log_every_n_steps=s.log_every_n_steps, val_check_interval=min(s.val_every_n_steps, steps),
                  check_val_every_n_epoch=None)
    seconds = time.perf_counter() - start
    train = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train_")}
    with quiet_lightning():
        metrics = {"val": trainer.validate(module, verbose=False, **val)[0],
                   "test": trainer.test(module, verbose=False, **test)[0]}
    return trainer, validations, {"seconds": seconds, "train": train, **metrics}


def _final(result: dict, steps: int, model: str = "") -> dict[str, float]:
    """The ``final`` table's metrics of one model from ``_train_and_evaluate``'s result."""
    nan = float("nan")
    train, val, test = result["train"], result["val"], result["test"]
    return {"train_error_percent": 100 * train.get("train_error" + model, nan),
            "train_loss": train.get("train_loss" + model, nan),
            "val_error_percent": 100 * val["val_error" + model], "val_loss": val["val_loss" + model],
            "test_error_percent": 100 * test["test_error" + model], "test_loss": test["test_loss" + model],
            "steps": float(steps), "train_seconds": result["seconds"]}


def _gradients(out_dir: Path, family: str, depth: int) -> pd.DataFrame:
    path = out_dir / GRADIENTS_CSV
    return pd.read_csv(path).assign(family=family, depth=depth) if path.is_file() else pd.DataFrame()


def _module_options(s: ZooSettings, device: str) -> dict[str, Any]:
    return dict(recipe=s.recipe, lr=s.lr, epochs=s.epochs, max_steps=s.max_steps,
                log_every_n_steps=s.log_every_n_steps, compile=s.compile and device == "cuda",
                gate_bias_decay=s.gate_bias_decay)


def fit_model(family: str, depth: int, seed: int, source, s: ZooSettings, out_dir: Path, device: str = "cpu",
              run_name: str = "") -> dict[str, Any]:
    """Train one network, record its curves and gradient norms, evaluate it, save ``last.ckpt``.

    Returns:
        ``{"final": {metric: value}, "curves": DataFrame, "gradients": DataFrame, "checkpoint": Path}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    dm = _datamodule(source, s, seed)
    module = CifarClassifier(family, depth, seed=seed, **_module_options(s, device))
    name = model_name(family, depth)
    data = {"datamodule": dm}
    trainer, validations, result = _train_and_evaluate(module, dm, s, out_dir, device, run_name, name,
                                                       data, data, data)
    ckpt = out_dir / "last.ckpt"
    with atomic_path(ckpt) as tmp:
        trainer.save_checkpoint(tmp, weights_only=False)
    keys = {"run": run_name, "seed": seed, "model": name, "family": family, "depth": depth}
    return {"final": _final(result, trainer.global_step),
            "curves": _curves(pd.read_csv(out_dir / "metrics.csv"), validations.points, keys),
            "gradients": _gradients(out_dir, family, depth), "checkpoint": ckpt}


def fit_side_by_side(family: str, depth: int, seeds: list[int], source, s: ZooSettings, models_dir: Path,
                     device: str = "cpu", run_name: str = "") -> list[dict[str, Any]]:
    """Train one network per seed as one grouped network (``GroupedClassifier``), as ``fit_model`` would each.

    Model ``s`` starts from seed ``seeds[s]``'s weights and gets its own batch order and augmentation
    (seeded ``seeds[s]``); the models share the validation split of ``seeds[0]`` and are validated and
    tested on the same images. The run's log and gradient norms go to ``<models_dir>/<name>-seeds<a>-<b>...``;
    each model is exported as an ordinary checkpoint, ``<models_dir>/<name>-seed<s>/last.ckpt``.

    Returns:
        one ``fit_model`` result per seed, in order (``train_seconds`` is the shared training time).
    """
    name = model_name(family, depth)
    out_dir = models_dir / f"{name}-seeds{'-'.join(map(str, seeds))}"
    out_dir.mkdir(parents=True, exist_ok=True)
    dm = _datamodule(source, s, seeds[0])
    dm.setup("fit")
    module = GroupedClassifier(family, depth, seeds=seeds, **_module_options(s, device))
    trainer, validations, result = _train_and_evaluate(
        module, dm, s, out_dir, device, run_name, name,
        {"train_dataloaders": per_model_train_batches(dm, seeds), "val_dataloaders": dm.val_dataloader()},
        {"dataloaders": dm.val_dataloader()}, {"dataloaders": dm.test_dataloader()})
    checkpoints = module.export_checkpoints(models_dir, filename=f"{name}-seed{{seed}}/last.ckpt")
    gradients = _gradients(out_dir, family, depth)
    log = pd.read_csv(out_dir / "metrics.csv")
    out = []
    for i, (seed, ckpt) in enumerate(zip(seeds, checkpoints)):
        keys = {"run": run_name, "seed": seed, "model": name, "family": family, "depth": depth}
        mine = f"/model{i}"
        out.append({"final": _final(result, trainer.global_step, mine),
                    "curves": _curves(log, validations.points, keys, mine),
                    "gradients": gradients[gradients["seed"] == seed] if len(gradients) else gradients,
                    "checkpoint": ckpt})
    return out


def training_errors(model, source, s: ZooSettings, split_seed: int, device: str) -> np.ndarray:
    """Top-1 error (0 / 1) of ``model``, in eval mode, on each of ``train_eval_examples`` training images: a
    seeded subset of the training split its data module used (the same images for every net of a seed)."""
    images, labels = _datamodule(source, s, split_seed).splits()["train"]
    idx = random_subset(len(labels), s.train_eval_examples, split_seed, "train_eval")
    x, y = normalize(images[idx]), labels[idx]
    model = model.to(device).eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 500].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), 500)])
    return (pred != y).numpy().astype(float)


def train_models(run, source, s: ZooSettings, seeds: Sequence[int], device: str = "cpu") -> Zoo:
    """Train every (family, depth, seed) of ``s`` into ``run``'s folder and add its tables.

    Adds the tables ``curves``, ``final`` and ``gradients`` to ``run`` after each (family, depth) (so an
    interrupted run keeps the finished models) and returns the trained models with the tables.
    """
    curves, finals, grads, models, per_image = [], [], [], [], []
    seeds = [int(x) for x in seeds]
    side_by_side = s.side_by_side(seeds, device)
    for family, depth in progress(s.grid, "train_zoo"):
        name = model_name(family, depth)
        print(f"train_zoo: training {name} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
              + (" side by side" if side_by_side else ""), flush=True)
        if side_by_side:
            results = fit_side_by_side(family, depth, seeds, source, s, run.path / "models", device, run.path.name)
        else:
            results = [fit_model(family, depth, seed, source, s, run.path / "models" / f"{name}-seed{seed}", device,
                                 run.path.name) for seed in seeds]
        for seed, r in zip(seeds, results):
            sm = load_model_source(str(r["checkpoint"]), seed)
            errors = training_errors(sm.model, source, s, seeds[0] if side_by_side else seed, device)
            r["final"]["train_eval_error_percent"] = 100.0 * float(errors.mean())
            sm.info["metrics"] = r["final"]
            models.append(sm)
            per_image.append(pd.DataFrame({"run": run.path.name, "seed": seed, "model": name, "family": family,
                                           "depth": depth, "site": "network", "metric": "train_error",
                                           "image": np.arange(len(errors)), "value": errors}))
            curves.append(r["curves"])
            grads.append(r["gradients"])
            rel = r["checkpoint"].relative_to(run.path).as_posix()
            finals += [{"run": run.path.name, "seed": seed, "model": name, "family": family, "depth": depth,
                        "site": "network", "metric": k, "value": float(v), "checkpoint": rel}
                       for k, v in {**r["final"], "parameters": float(count_parameters(sm.model))}.items()]
        tables = {"curves": pd.concat(curves, ignore_index=True), "final": pd.DataFrame(finals),
                  "train_errors": pd.concat(per_image, ignore_index=True)}
        if any(len(g) for g in grads):
            tables["gradients"] = pd.concat([g for g in grads if len(g)], ignore_index=True)
        for name, df in tables.items():
            run.add_table(name, df)
    models.sort(key=lambda m: (family_rank(m.family), m.family, m.depth, m.seed))
    return Zoo(models=models, tables=tables, folders=[run.path])


def trained_zoo(run, data: StudyData, s: ZooSettings, seeds: Sequence[int], device: str) -> Zoo:
    """The nets a study trains for itself (no model given), into its own run folder, with its Setup text."""
    run.add_text("Setup", "Networks trained for this run. " + s.describe(seeds, device))
    zoo = train_models(run, data.training_source(), s, seeds, device)
    zoo.data = data.provenance()
    return zoo


# ---- the study ----------------------------------------------------------------------------------

def run(settings: ZooSettings, data: StudyData, *, out: str | Path = "runs", seeds: Sequence[int] = (0,),
        device: str = "auto", scale: str | None = None) -> StudyResult:
    """Train the zoo into a new run folder; returns its tables and its trained models (``result.zoo``)."""
    dev = resolve_device(device).type
    config = study_config(data=data.spec, seeds=seeds, device=device, out=out, scale=scale, settings=settings)
    with study_run("train_zoo", config, title=TITLE, data=data.provenance(), source_file=__file__) as run_:
        zoo = trained_zoo(run_, data, settings, seeds, dev)
        _report(run_, zoo.tables["final"])
    return StudyResult(run_.path, dict(zoo.tables), zoo)


def _report(run_, final: pd.DataFrame) -> None:
    rows = []
    for model, g in final.groupby("model", sort=False):
        row = {"model": model, "parameters": f"{int(g.loc[g['metric'] == 'parameters', 'value'].iloc[0]):,}"}
        for metric, label in (("train_error_percent", "train error"), ("val_error_percent", "val error"),
                              ("test_error_percent", "test error")):
            row[label] = format_mean_std(g.loc[g["metric"] == metric, "value"], unit="%")
        rows.append(row)
    run_.add_headline(pd.DataFrame(rows), title="Final error per model (mean ± std over seeds)")
    run_.add_figure("curves", "line", "curves", x="step", hue="model", style="split",
                    dashes={"train": [4, 2], "val": ""}, query="metric == 'error_percent'",
                    xlabel="iteration", ylabel="error (%)", legend_title="model",
                    title="Training (dashed) and validation (solid) error")


COMMAND = StudyCommand(
    name="train_zoo", run=run, settings=ZooSettings, inputs="data",
    description="Train plain / highway / residual CIFAR nets over depths and seeds; writes checkpoints, training "
                "curves and gradient records for the other studies.")
