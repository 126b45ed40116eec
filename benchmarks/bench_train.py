"""Training step time: a typical DataLoader + eager loop vs the project's Lightning path vs seeds side by side.

Rows, per architecture, all measured in the same run on the same device:

- ``a_dataloader_eager``: the usual CIFAR script: a torch DataLoader over HWC uint8 images with
  per-image PIL transforms (pad-4 random crop, flip, ToTensor, Normalize), fp32 eager model, SGD.
- ``b_lightning``: ``CifarClassifier`` + ``CifarDataModule`` through a Lightning Trainer; on a GPU
  the data is resident there, bf16 autocast, channels_last and ``torch.compile`` (``--compile-mode``,
  by default ``reduce-overhead``: CUDA graphs); on a CPU the module's own CPU path (fp32 eager,
  CPU-resident batches).
- ``b_lightning_probes``: (b) with the probes on, as a study attaches them: ``ProbeCallback`` on every
  site, recording the per-block gradient norms every ``probe_every`` steps (paper size: 50, the
  callback's default), which is also its timed window, so every window holds exactly one recording
  step (compiled as well: the blocks' gradient taps are a second variant of the graph). Its
  ``probes_vs_off`` is its time over (b)'s; target <= 1.10.
- ``c_grouped_S``: ``GroupedClassifier``: S seeds as one grouped network, each model with its own
  data order (``per_model_train_batches``), same fast path as (b).

Reported: ms per step, ms per *model*-step (a step of S models counts S model-steps), seconds per
epoch of 45k images per model, images per second (all models), peak memory (CUDA: max allocated
during the run, data and weights included; CPU: peak resident set of a forked short run above its
start, see ``harness.peak_memory``) and the speed-up of each row over (a) per model-step. Lightning
rows are timed with a callback that synchronises every ``window`` steps after ``warmup`` steps
(which include compilation); (a) by median over repeats of ``window`` steps. Images are random
uint8 pixels: the step time does not depend on them.

Compiled rows run through ``CifarClassifier`` / ``GroupedClassifier``'s compiled network, which
raises rather than run eagerly when torch.compile reaches its recompile limit
(``resnet_probe.models.compiled``); each architecture starts from an empty compile cache.

Run: ``.venv/bin/python -m benchmarks.bench_train [--device cuda] [--size paper] [--repeats 7]
[--compile-mode default]``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from contextlib import nullcontext

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from benchmarks.harness import default_size, device_name, median_time, peak_memory, record, resolve_device
from resnet_probe.data import CIFAR_MEAN, CIFAR_STD, CifarDataModule, DataSource
from resnet_probe.models import build_model
from resnet_probe.probes.callback import ProbeCallback
from resnet_probe.train.base import COMPILE_MODES
from resnet_probe.train.fit import make_trainer
from resnet_probe.train.grouped import GroupedClassifier, per_model_train_batches
from resnet_probe.train.module import CifarClassifier

EPOCH_IMAGES = 45_000  # training images per epoch in the paper's split
SIZES = {
    # archs: (family, depth); batch: images per model-step; models: S; steps: warm-up and window;
    # probe_every: steps between gradient records in the probes row (also that row's window).
    "small": dict(archs=[("residual", 20)], batch=32, models=2, n_images=512, warmup=3, window=8, probe_every=8),
    "paper": dict(archs=[("residual", 56), ("residual", 110), ("highway", 56)], batch=128, models=8,
                  n_images=EPOCH_IMAGES, warmup=30, window=20, probe_every=50),
}


class _PilCifar(Dataset):
    """HWC uint8 images through per-image PIL transforms, as torchvision's CIFAR10 dataset does."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def random_source(n: int) -> DataSource:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return DataSource("random-pixels", "synthetic", None, True, images, labels, images[:256], labels[:256],
                      tuple(str(k) for k in range(10)), "random uint8 pixels for timing")


def typical_stepper(source: DataSource, family: str, depth: int, batch: int, workers: int, device):
    """One optimizer step per call of a DataLoader + per-image transforms + fp32 eager loop."""
    data = _PilCifar(source.train_images.permute(0, 2, 3, 1).numpy(), source.train_labels.numpy())
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    model = build_model(family, depth).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def batches():
        while True:
            yield from loader
    it = batches()

    def step():
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


class _StepClock(pl.Callback):
    """Host time (after a device sync) every ``window`` optimizer steps once ``warmup`` steps are done."""

    def __init__(self, warmup: int, window: int):
        self.warmup, self.window, self.marks, self.start = warmup, window, [], None

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step >= self.warmup and (step - self.warmup) % self.window == 0:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.marks.append(time.perf_counter())

    def result(self) -> dict:
        ms = [(b - a) * 1e3 / self.window for a, b in zip(self.marks, self.marks[1:])]
        return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "repeats": len(ms),
                "warmup_s": self.marks[0] - self.start}


def lightning_fit(source: DataSource, family: str, depth: int, batch: int, models: int | None, device, steps: int,
                  warmup: int, window: int, probes: bool, compile_mode: str) -> dict:
    """Train through Lightning for ``warmup + steps`` steps; single model if ``models`` is None; with
    ``probes``, a ``ProbeCallback`` records the gradient norms every ``window`` steps."""
    cuda = device.type == "cuda"
    total = warmup + steps
    common = dict(family=family, depth=depth, recipe="paper", max_steps=total, compile=cuda,
                  compile_mode=compile_mode, log_every_n_steps=50)
    dm = CifarDataModule.from_source(source, batch_size=batch, val_size=128, drop_last=True,
                                     gpu_resident=True if cuda else False)
    if models is None:
        module, train = CifarClassifier(**common), None
    else:
        seeds = list(range(models))
        module = GroupedClassifier(**common, seeds=seeds, shared_batches=False)
        dm.setup("fit")
        train = per_model_train_batches(dm, seeds)
    clock = _StepClock(warmup, window)
    folder = tempfile.TemporaryDirectory(prefix="bench_train_probes_") if probes else nullcontext()
    with folder as tables:  # the probes' CSV tables, only in the probes row
        callbacks = [clock] + ([ProbeCallback(every_n_steps=window, out_dir=tables)] if probes else [])
        trainer = make_trainer(device.type, max_steps=total, limit_val_batches=0, progress=False,
                               callbacks=callbacks)   # the project's Trainer, as studies and the CLI use it
        if train is None:
            trainer.fit(module, datamodule=dm)
        else:
            trainer.fit(module, train_dataloaders=train)
    return clock.result()


def timed_with_memory(run, short_run, device) -> tuple[dict, int]:
    """``run()``'s timing and peak memory: the same run on CUDA, a forked ``short_run`` on the CPU."""
    if device.type == "cuda":
        out = []
        mem = peak_memory(lambda: out.append(run()), device)
        return out[0], mem
    return run(), peak_memory(short_run, device)


def step_row(arch: str, variant: str, models: int, batch: int, timing: dict, mem: int) -> dict:
    ms = timing["median_ms"]
    return {"arch": arch, "variant": variant, "models": models, "batch_per_model": batch,
            "ms_per_step": ms, "ms_per_model_step": ms / models,
            "s_per_epoch_per_model": ms / models * (EPOCH_IMAGES // batch) / 1e3,
            "images_per_s": models * batch / ms * 1e3, "peak_mem_mb": mem / 2**20,
            "ms_min": timing["min_ms"], "ms_max": timing["max_ms"], "windows": timing["repeats"],
            "warmup_s": timing.get("warmup_s", float("nan"))}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="small (CPU default) or paper (GPU default)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows per row (default: 5 small, 7 paper)")
    p.add_argument("--models", type=int, default=None, help="S, seeds side by side (default: 2 small, 8 paper)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the baseline (0 CPU, 8 GPU)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=COMPILE_MODES[0],
                   help="torch.compile mode of the Lightning rows on CUDA (default: %(default)s, CUDA graphs)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    size = args.size or default_size(device)
    cfg = dict(SIZES[size])
    repeats = args.repeats or (7 if size == "paper" else 5)
    models = args.models or cfg["models"]
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 0)
    batch, warmup, window = cfg["batch"], cfg["warmup"], cfg["window"]
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    print(f"bench_train: {size} size on {device_name(device)} ({device})")

    source = random_source(cfg["n_images"])
    rows = []
    for family, depth in cfg["archs"]:
        arch = f"{family}-{depth}"
        torch._dynamo.reset()  # each architecture compiles from scratch: its rows do not depend on run order
        step = typical_stepper(source, family, depth, batch, workers, device)
        naive = median_time(lambda: [step() for _ in range(window)], repeats=repeats, warmup=1, device=device)
        naive = {k: v / window if k.endswith("_ms") else v for k, v in naive.items()}
        short = typical_stepper(source, family, depth, batch, 0, device)
        naive_mem = peak_memory(lambda: [short() for _ in range(2)], device)
        rows.append(step_row(arch, "a_dataloader_eager", 1, batch, naive, naive_mem))

        variants = (("b_lightning", None, False), ("b_lightning_probes", None, True),
                    (f"c_grouped_{models}", models, False))
        for variant, s, probes in variants:
            win = cfg["probe_every"] if probes else window

            def run(steps=repeats * win, w=warmup, win=win, s=s, probes=probes):
                return lightning_fit(source, family, depth, batch, s, device, steps, w, win, probes, args.compile_mode)
            timing, mem = timed_with_memory(run, lambda run=run: run(steps=1, w=1, win=1), device)
            rows.append(step_row(arch, variant, s or 1, batch, timing, mem))
        by_variant = {r["variant"]: r for r in rows[-1 - len(variants):]}
        for r in by_variant.values():
            r["speedup_vs_a"] = by_variant["a_dataloader_eager"]["ms_per_model_step"] / r["ms_per_model_step"]
        probed = by_variant["b_lightning_probes"]
        probed["probes_vs_off"] = probed["ms_per_step"] / by_variant["b_lightning"]["ms_per_step"]
    config = dict(size=size, repeats=repeats, models=models, batch=batch, warmup_steps=warmup,
                  window_steps=window, baseline_workers=workers, archs=[f"{f}-{d}" for f, d in cfg["archs"]],
                  compile=device.type == "cuda", compile_mode=args.compile_mode,
                  precision="bf16-mixed" if device.type == "cuda" else "32-true",
                  probes_every_n_steps=cfg["probe_every"], targets="paper, one H100: ResNet-56 b_lightning <= 6.5 ms, "
                  "probes_vs_off <= 1.10, ResNet-110 <= 12.5 ms, Highway-56 <= 8.5 ms, c_grouped_8 ResNet-56 "
                  "<= 2.5 ms per model-step")
    record("train", rows, config=config, device=device)
    return rows


if __name__ == "__main__":
    main()
