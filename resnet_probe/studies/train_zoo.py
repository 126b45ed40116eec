"""Train plain / highway / residual CIFAR nets over depths and seeds: the checkpoints the other studies read.

Question: the input of every other study -- the same networks, trained the same way, kept together.
Each model is trained through the project's LightningModule and written to
``<run>/models/<family>-<depth>-seed<s>/`` (``last.ckpt``, Lightning's ``metrics.csv``, and
``probe_gradients.csv``: per-block parameter-gradient norms recorded by ``ProbeCallback`` every few
steps). Several seeds of one architecture are trained side by side as one grouped network
(``GroupedClassifier``) on a GPU (``--set seeds_side_by_side=True`` / ``False`` forces it on / off): they share
the first seed's validation split, each has its own weights, batch order and augmentation, their
log and gradient norms go to ``<family>-<depth>-seeds<a>-<b>.../`` and each model is exported as an
ordinary ``<family>-<depth>-seed<s>/last.ckpt``. The run's tables are ``curves`` (training /
validation error and loss against the iteration), ``final`` (per model and seed: final train /
validation / test error and loss, steps, seconds, and the ``checkpoint`` path relative to the run
folder) and ``gradients`` (the gradient records of all models).

Scales: ``quick`` trains plain and residual nets of depths 8 and 20 and a highway net of depth 20 on a
few thousand training images for 3 epochs with the one-cycle ``fast`` recipe (CPU, minutes); ``paper`` is He et al. 2016's recipe (45k/5k split, crop + flip,
SGD 0.1 /10 at 32k and 48k, 64k iterations) for depths 20, 32, 44, 56 and 110, for a GPU.

Result at quick scale (2 idle AMD EPYC cores, 1 torch thread, JPEG pack, seed 0; measured 2026-11-23):
training took 22 s (plain-8), 60 s (plain-20), 93 s (highway-20), 22 s (residual-8) and 62 s
(residual-20); final train / test error 59.0 / 57.3 % (plain-8), 65.6 / 62.3 %
(plain-20), 66.3 / 65.6 % (highway-20), 57.3 / 55.8 % (residual-8) and 57.2 / 54.0 % (residual-20), on 4,000
training and 1,000 test images after 3 epochs (189 steps).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .options import resolve_data, resolve_device, scale_settings, set_threads, study_parser

FAMILIES = ("plain", "highway", "residual")
QUICK: dict[str, Any] = dict(
    families=FAMILIES,
    depths={"plain": (8, 20), "highway": (20,), "residual": (8, 20)},  # per family (or one list for all)
    recipe="fast", lr=0.1,               # one-cycle peak learning rate (batch 64)
    epochs=3, max_steps=None,            # training length: epochs (quick) / optimizer steps (paper)
    train_limit=4000, val_size=1000,     # images: training subset, held-out validation images
    test_limit=1000,                     # test images for the final test error
    batch_size=64, augment=False,        # batch 64: twice the optimizer steps of 128 at the same CPU cost
    log_every_n_steps=10,                # optimizer steps between training-curve points
    val_every_n_steps=63,                # optimizer steps between validation-curve points (= 1 epoch)
    grad_every_n_steps=5,                # optimizer steps between gradient-norm records
    seeds_side_by_side="auto",           # several seeds as one grouped network: True, False, "auto" (on CUDA)
    compile=False)                       # torch.compile the network (CUDA only)
PAPER: dict[str, Any] = dict(
    families=FAMILIES, depths=(20, 32, 44, 56, 110),
    recipe="paper", lr=0.1,
    epochs=None, max_steps=64_000,       # 64k iterations, lr /10 at 32k and 48k (He et al. 2016, 4.2)
    train_limit=None, val_size=5000,     # the 45k / 5k split
    test_limit=None,
    batch_size=128, augment=True,
    log_every_n_steps=100,
    val_every_n_steps=2000,
    grad_every_n_steps=500,
    seeds_side_by_side="auto",
    compile=True)


def model_name(family: str, depth: int) -> str:
    """``plain-20``: how models are named in every table."""
    return f"{family}-{depth}"


def family_rank(family: str) -> int:
    """Where a family sorts in tables and figures: plain, highway, residual, then the others."""
    return FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)


def model_grid(settings: dict) -> list[tuple[str, int]]:
    """The ``(family, depth)`` pairs to train, in order.

    ``settings["depths"]`` is either one list of depths for every family or a mapping family -> depths.

    Raises:
        ValueError: the mapping has no depths for one of ``settings["families"]``.
    """
    depths = settings["depths"]
    pairs = []
    for family in settings["families"]:
        chosen = depths.get(family) if isinstance(depths, Mapping) else depths
        if not chosen:
            raise ValueError(f"no depths for family {family!r} in depths={depths!r}; give a list for every "
                             f"family or a mapping with an entry for each of {list(settings['families'])}")
        pairs += [(family, int(d)) for d in chosen]
    return pairs


def _depths_text(settings: dict) -> str:
    depths = settings["depths"]
    if isinstance(depths, Mapping):
        return "; ".join(f"{f} {', '.join(map(str, depths[f]))}" for f in settings["families"])
    return ", ".join(map(str, depths))


def add_training_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the studies that train (``None`` = the scale's setting)."""
    p.add_argument("--families", nargs="+", choices=FAMILIES + ("preact",), default=None)
    p.add_argument("--depths", nargs="+", type=int, default=None, help="depths 6n+2, e.g. 8 20 56")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-steps", dest="max_steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--train-limit", dest="train_limit", type=int, default=None, help="training images")
    p.add_argument("--test-limit", dest="test_limit", type=int, default=None, help="test images")
    p.add_argument("--lr", type=float, default=None, help="initial (paper) or peak (fast) learning rate")


def _curves(raw: "pd.DataFrame", validations: list[tuple[int, dict]], keys: dict, model: str = "") -> "pd.DataFrame":
    """Tidy training curves: error in percent and loss against the optimizer step.

    Training points are Lightning's ``train_*_step`` records in ``raw`` (its ``metrics.csv``: the mean over
    the batches since the previous record, in training mode); validation points are ``(step, metrics)``
    after ``step`` optimizer steps. ``model`` is the suffix of one model's columns in a side-by-side run
    (``/model1``), else empty.
    """
    import pandas as pd
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


def _validation_recorder():
    """A callback keeping ``(optimizer steps done, {val metric: value})`` after every validation."""
    import pytorch_lightning as pl

    class ValidationCurve(pl.Callback):
        def __init__(self):
            self.points: list[tuple[int, dict[str, float]]] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            m = trainer.callback_metrics
            if "val_error" in m and not trainer.sanity_checking:
                self.points.append((int(trainer.global_step),
                                    {k: float(v) for k, v in m.items() if k.startswith("val_")}))

    return ValidationCurve()


def _training_run(module, dm, out_dir: Path, settings: dict, device: str, run_name: str, name: str):
    """The Trainer of one zoo training (the module's recipe length, CSV log, validation every
    ``val_every_n_steps``) with its gradient-norm callback (``probe_gradients.csv``), and its
    validation-curve callback."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from ..probes.callback import ProbeCallback

    s = settings
    grads = ProbeCallback(sites="*", every_n_epochs=0, every_n_steps=s["grad_every_n_steps"], out_dir=out_dir,
                          run=run_name, model_name=name)
    validations = _validation_recorder()
    limits = module.trainer_limits
    steps = limits["max_steps"] if limits["max_steps"] >= 0 else limits["max_epochs"] * dm.steps_per_epoch
    cuda = device == "cuda"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
        **limits, logger=CSVLogger(out_dir, name="", version=""), callbacks=[grads, validations],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=s["log_every_n_steps"],
        val_check_interval=min(s["val_every_n_steps"], steps), check_val_every_n_epoch=None)
    return trainer, validations


def _train_and_evaluate(trainer, module, fit: dict, val: dict, test: dict) -> dict[str, Any]:
    """``trainer.fit(module, **fit)``, then validate and test (``**val``, ``**test``: their data);
    returns the seconds of training, the final ``train_*`` metrics and the validation / test metrics."""
    start = time.perf_counter()
    trainer.fit(module, **fit)
    seconds = time.perf_counter() - start
    train = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train_")}
    return {"seconds": seconds, "train": train, "val": trainer.validate(module, verbose=False, **val)[0],
            "test": trainer.test(module, verbose=False, **test)[0]}


def _data(source, settings: dict, seed: int):
    from ..data import CifarDataModule
    s = settings
    return CifarDataModule.from_source(source, batch_size=s["batch_size"], val_size=s["val_size"], split_seed=seed,
                                       train_limit=s["train_limit"], test_limit=s["test_limit"],
                                       augment=s["augment"], seed=seed)


def _final(result: dict, steps: int, model: str = "") -> dict[str, float]:
    """The ``final`` table's metrics of one model from ``_train_and_evaluate``'s result."""
    nan = float("nan")
    train, val, test = result["train"], result["val"], result["test"]
    return {"train_error_percent": 100 * train.get("train_error" + model, nan),
            "train_loss": train.get("train_loss" + model, nan),
            "val_error_percent": 100 * val["val_error" + model], "val_loss": val["val_loss" + model],
            "test_error_percent": 100 * test["test_error" + model], "test_loss": test["test_loss" + model],
            "steps": float(steps), "train_seconds": result["seconds"]}


def _gradients(out_dir: Path, family: str, depth: int) -> "pd.DataFrame":
    import pandas as pd

    from ..probes.callback import GRADIENTS_CSV
    path = out_dir / GRADIENTS_CSV
    return pd.read_csv(path).assign(family=family, depth=depth) if path.is_file() else pd.DataFrame()


def fit_model(family: str, depth: int, seed: int, source, settings: dict, out_dir: Path, device: str = "cpu",
              run_name: str = "") -> dict[str, Any]:
    """Train one network, record its curves and gradient norms, evaluate it, save ``last.ckpt``.

    Args:
        family: ``plain``, ``highway``, ``residual`` (or ``preact``).
        depth: 6n+2.
        seed: seeds the weights, the validation split and the batch order.
        source: the ``DataSource`` to train on.
        settings: a scale's settings (see ``QUICK`` / ``PAPER``).
        out_dir: the model's folder (created).
        device: ``cpu`` or ``cuda``.
        run_name: the ``run`` column of the tables.

    Returns:
        ``{"final": {metric: value}, "curves": DataFrame, "gradients": DataFrame, "checkpoint": Path}``.
    """
    import pandas as pd

    from ..atomic import atomic_path
    from ..train import CifarClassifier
    from ..train.quick import quiet_lightning

    s = settings
    out_dir.mkdir(parents=True, exist_ok=True)
    dm = _data(source, s, seed)
    module = CifarClassifier(family, depth, recipe=s["recipe"], lr=s["lr"], epochs=s["epochs"],
                             max_steps=s["max_steps"], seed=seed, log_every_n_steps=s["log_every_n_steps"],
                             compile=s["compile"] and device == "cuda")
    name = model_name(family, depth)
    with quiet_lightning():
        trainer, validations = _training_run(module, dm, out_dir, s, device, run_name, name)
        data = {"datamodule": dm}
        result = _train_and_evaluate(trainer, module, data, data, data)
    ckpt = out_dir / "last.ckpt"
    with atomic_path(ckpt) as tmp:
        trainer.save_checkpoint(tmp, weights_only=False)
    keys = {"run": run_name, "seed": seed, "model": name, "family": family, "depth": depth}
    return {"final": _final(result, trainer.global_step),
            "curves": _curves(pd.read_csv(out_dir / "metrics.csv"), validations.points, keys),
            "gradients": _gradients(out_dir, family, depth), "checkpoint": ckpt}


def fit_side_by_side(family: str, depth: int, seeds: list[int], source, settings: dict, models_dir: Path,
                     device: str = "cpu", run_name: str = "") -> list[dict[str, Any]]:
    """Train one network per seed as one grouped network (``GroupedClassifier``), as ``fit_model`` would each.

    Model ``s`` starts from seed ``seeds[s]``'s weights and gets its own batch order and augmentation
    (seeded ``seeds[s]``); the models share the validation split of ``seeds[0]`` and are validated and
    tested on the same images. The run's log (``metrics.csv`` with per-model columns) and gradient norms
    (``probe_gradients.csv``, one row per model) go to ``<models_dir>/<name>-seeds<a>-<b>...``; each
    model is exported as an ordinary checkpoint, ``<models_dir>/<name>-seed<s>/last.ckpt``.

    Returns:
        one ``fit_model`` result per seed, in order (``train_seconds`` is the shared training time).
    """
    import pandas as pd

    from ..train.grouped import GroupedClassifier, per_model_train_batches
    from ..train.quick import quiet_lightning

    s = settings
    name = model_name(family, depth)
    out_dir = models_dir / f"{name}-seeds{'-'.join(map(str, seeds))}"
    out_dir.mkdir(parents=True, exist_ok=True)
    dm = _data(source, s, seeds[0])
    dm.setup("fit")
    module = GroupedClassifier(family, depth, seeds=seeds, recipe=s["recipe"], lr=s["lr"], epochs=s["epochs"],
                               max_steps=s["max_steps"], log_every_n_steps=s["log_every_n_steps"],
                               compile=s["compile"] and device == "cuda")
    with quiet_lightning():
        trainer, validations = _training_run(module, dm, out_dir, s, device, run_name, name)
        result = _train_and_evaluate(
            trainer, module, {"train_dataloaders": per_model_train_batches(dm, seeds),
                              "val_dataloaders": dm.val_dataloader()},
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


def train_models(run, source, settings: dict, seeds, device: str = "cpu") -> dict[str, "pd.DataFrame"]:
    """Train every (family, depth, seed) of ``settings`` into ``run``'s folder and add its tables.

    Several seeds are trained side by side as one grouped network (``fit_side_by_side``) where
    ``trains_side_by_side`` says so; otherwise one at a time (``fit_model``). Adds the tables ``curves``,
    ``final`` and ``gradients`` to ``run`` after each (family, depth) (so an interrupted run keeps the
    finished models) and returns them.
    """
    import pandas as pd
    curves, finals, grads = [], [], []
    seeds = list(seeds)
    side_by_side = trains_side_by_side(settings, seeds, device)
    for family, depth in model_grid(settings):
        name = model_name(family, depth)
        if side_by_side:
            print(f"train_zoo: training {name} seeds {', '.join(map(str, seeds))} side by side", flush=True)
            results = fit_side_by_side(family, depth, seeds, source, settings, run.path / "models", device,
                                       run.path.name)
        else:
            results = []
            for seed in seeds:
                print(f"train_zoo: training {name} seed {seed}", flush=True)
                out = run.path / "models" / f"{name}-seed{seed}"
                results.append(fit_model(family, depth, seed, source, settings, out, device, run.path.name))
        for seed, r in zip(seeds, results):
            curves.append(r["curves"])
            grads.append(r["gradients"])
            rel = r["checkpoint"].relative_to(run.path).as_posix()
            finals += [{"run": run.path.name, "seed": seed, "model": name, "family": family, "depth": depth,
                        "metric": k, "value": float(v), "checkpoint": rel} for k, v in r["final"].items()]
        run.add_table("curves", pd.concat(curves, ignore_index=True))
        run.add_table("final", pd.DataFrame(finals))
        if any(len(g) for g in grads):
            run.add_table("gradients", pd.concat([g for g in grads if len(g)], ignore_index=True))
    return {"curves": run.table("curves"), "final": run.table("final"),
            "gradients": run.table("gradients") if "gradients" in run.tables else pd.DataFrame()}


def zoo_checkpoints(run_dir: str | Path) -> "pd.DataFrame":
    """The models of a ``train_zoo`` run: one row per model and seed with its absolute ``checkpoint`` path.

    Columns: ``model, family, depth, seed, checkpoint`` (plain, highway, residual, then other families; by
    depth and seed within a family).

    Raises:
        ValueError: the folder is not a ``train_zoo`` run with trained models.
    """
    from ..report import open_run
    run = open_run(run_dir)
    if "final" not in run.tables or "checkpoint" not in run.table("final").columns:
        raise ValueError(f"{run_dir} is not a train_zoo run (no 'final' table with checkpoints); "
                         "make one with `python studies/train_zoo.py`")
    df = run.table("final")[["model", "family", "depth", "seed", "checkpoint"]].drop_duplicates()
    df["checkpoint"] = [str(run.path / c) for c in df["checkpoint"]]
    df["_rank"] = df["family"].map(family_rank)
    return df.sort_values(["_rank", "family", "depth", "seed"]).drop(columns="_rank").reset_index(drop=True)


def data_sizes(settings: dict) -> tuple[int | None, int | None]:
    """Training and test images a scale uses (``None`` = all), to size a synthetic set."""
    n_train = None if settings.get("train_limit") is None else settings["train_limit"] + settings["val_size"]
    return n_train, settings.get("test_limit")


def trains_side_by_side(settings: dict, seeds, device: str) -> bool:
    """Whether several ``seeds`` are trained as one grouped network: ``settings["seeds_side_by_side"]`` is
    ``True``, or ``"auto"`` on CUDA. On a CPU it saves nothing (residual-20, 2 seeds, quick settings, 2 cores:
    156 s side by side vs 160 s one at a time with 1 thread, 89 s vs 82 s with 2), so ``"auto"`` trains
    them one at a time there.

    Raises:
        ValueError: a setting other than ``True``, ``False`` or ``"auto"``.
    """
    choice = settings.get("seeds_side_by_side", "auto")
    if choice not in (True, False, "auto"):
        raise ValueError(f"seeds_side_by_side must be True, False or 'auto'; got {choice!r}")
    return len(list(seeds)) > 1 and (choice is True or (choice == "auto" and device == "cuda"))


def describe(settings: dict, seeds, device: str = "cpu") -> str:
    """One Markdown paragraph stating the training setup."""
    length = (f"{settings['max_steps']:,} iterations" if settings["max_steps"] else f"{settings['epochs']} epochs")
    images = "all training images" if settings["train_limit"] is None else f"{settings['train_limit']:,} training images"
    tests = "all" if settings["test_limit"] is None else f"{settings['test_limit']:,}"
    together = (f" The seeds of each network were trained side by side as one grouped network, sharing seed "
                f"{seeds[0]}'s validation split, each with its own initialisation, batch order and augmentation."
                if trains_side_by_side(settings, seeds, device) else "")
    return (f"Families {', '.join(settings['families'])}; depths {_depths_text(settings)}; "
            f"seeds {', '.join(map(str, seeds))}. Recipe `{settings['recipe']}` (lr {settings['lr']}), {length}, "
            f"batch {settings['batch_size']}, {images} ({settings['val_size']:,} held out for validation), "
            f"augmentation {'pad-4 crop + flip' if settings['augment'] else 'off'}; test error on "
            f"{tests} test images.{together}")


def parse_zoo_study(name: str, description: str, zoo_help: str | None, argv: list[str] | None,
                    quick: dict, paper: dict) -> tuple[argparse.Namespace, dict]:
    """Parse a zoo study's command line (common options, ``--zoo RUN_DIR`` unless ``zoo_help`` is
    ``None``, the training options) and set the thread count; returns the arguments and the
    scale's settings."""
    p = study_parser(name, description)
    if zoo_help is None:
        p.set_defaults(zoo=None)
    else:
        p.add_argument("--zoo", metavar="RUN_DIR", default=None, help=zoo_help)
    add_training_options(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    settings = scale_settings(args, quick, paper)
    trains_side_by_side(settings, args.seeds, "cpu")  # a bad value fails before any run folder exists
    return args, settings


class ZooInput:
    """The trained nets a downstream study (degradation, gradients) reads: a ``--zoo`` run or nets trained here.

    Build it from the parsed arguments before the study's run folder exists (``data`` and ``config``
    go into its provenance), then call ``tables(run)`` inside the run.

    Args:
        args: parsed study arguments (``zoo``, ``data``, ``seeds``, ``scale``, ``device``).
        settings: the scale's training settings.
        needs: the tables a ``--zoo`` run must hold; ``tables`` reads only these from it.

    Raises:
        ValueError: the ``--zoo`` run lacks one of the ``needs`` tables.
    """

    def __init__(self, args: argparse.Namespace, settings: dict, needs: tuple[str, ...] = ()):
        from ..report import open_run
        self.args, self.settings, self.needs = args, settings, tuple(needs)
        self.zoo = open_run(args.zoo) if args.zoo else None
        if self.zoo is not None:
            for name in self.needs:
                if name not in self.zoo.tables:
                    raise ValueError(f"{args.zoo}: the train_zoo run has no {name!r} table")
            self.source = None
            self.data = self.zoo.provenance.get("data")
            self.config = {"zoo": str(self.zoo.path.resolve()), "zoo_config": self.zoo.provenance.get("config")}
        else:
            self.source = resolve_data(args.data, *data_sizes(settings))
            self.data = self.source.provenance()
            self.device = resolve_device(args.device).type
            self.config = {**settings, "scale": args.scale, "seeds": list(args.seeds), "device": self.device}

    def tables(self, run, what: str = "", extra: str = "") -> dict[str, "pd.DataFrame"]:
        """The zoo's tables: the ``needs`` tables read from the ``--zoo`` run, or all of ``curves``,
        ``final`` and ``gradients`` trained into ``run``.

        Args:
            run: the study's run; its Setup section says where ``what`` came from, plus ``extra``.
        """
        if self.zoo is not None:
            run.add_text("Setup", f"{what} read from the train_zoo run `{self.zoo.path}`.{extra}")
            return {name: self.zoo.table(name) for name in self.needs}
        run.add_text("Setup", describe(self.settings, self.args.seeds, self.device) + extra)
        return train_models(run, self.source, self.settings, self.args.seeds, self.device)


def main(argv: list[str] | None = None) -> Path:
    """Train the zoo and write its run folder; returns the folder."""
    args, settings = parse_zoo_study(
        "train_zoo", "Train plain / highway / residual CIFAR nets over depths and seeds; writes checkpoints "
                     "and training curves for the other studies.", None, argv, QUICK, PAPER)
    from ..report import new_run
    zoo = ZooInput(args, settings)  # no --zoo: the nets are trained here
    with new_run("train_zoo", out=args.out, config=zoo.config, data=zoo.data, source_file=__file__,
                 argv=argv, title="Model zoo: plain / highway / residual") as run:
        _report(run, zoo.tables(run)["final"])
    return run.path


def _report(run, final) -> None:
    from ..report import format_mean_std
    import pandas as pd
    rows = []
    for (model, family, depth), g in final.groupby(["model", "family", "depth"], sort=False):
        row = {"model": model}
        for metric, label in (("train_error_percent", "train error"), ("val_error_percent", "val error"),
                              ("test_error_percent", "test error")):
            row[label] = format_mean_std(g.loc[g["metric"] == metric, "value"], unit="%")
        rows.append(row)
    run.add_headline(pd.DataFrame(rows), title="Final error per model (mean ± std over seeds)")
    run.add_figure("curves", "line", "curves", x="step", hue="model", style="split",
                   dashes={"train": [4, 2], "val": ""}, query="metric == 'error_percent'",
                   xlabel="iteration", ylabel="error (%)", legend_title="model",
                   title="Training (dashed) and validation (solid) error")
