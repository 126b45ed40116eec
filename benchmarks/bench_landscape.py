"""Loss-surface evaluation: many grid points per pass against one forward pass per grid point.

Measured on ResNet-20 (residual, option A) with random weights and random images (the cost does not
depend on either; BN running statistics are set from the images first), two filter-normalised
directions, an ``R`` x ``R`` grid over [-1, 1]^2, all engines of ``resnet_probe.landscape.loss_surface``
in the same run on the same grid points:

- ``loop``: Li et al.'s procedure, the baseline: the point's parameters written into a copy of the
  model, one forward pass over the images per grid point (batches of ``loop_batch``), BN as is;
- ``pointwise``: one grid point per pass through ``functional_call``, BN folded into the
  convolutions, channels-last;
- ``batched``: ``points_per_pass`` grid points per pass (``vmap`` over stacked parameters, BN folded).

Each engine is timed on the first ``timed_points`` grid points (one row of the grid) and its time for
the whole grid extrapolated (every point costs the same). Each row gives the median wall time, the
process CPU time (less sensitive to other processes on a shared machine), the ratio to the loop, the
arithmetic rate (forward FLOPs counted by ``torch.utils.flop_counter``) beside a large matmul's rate
on the same threads, and the largest relative loss difference to the loop on the timed points. Issue target:
batched >= 3x the loop on the CPU at 11 x 11, ResNet-20, 1,000 images.

    .venv/bin/python -m benchmarks.bench_landscape                # CPU, small: 11 x 11, 1,000 images
    .venv/bin/python -m benchmarks.bench_landscape --size paper   # GPU: 51 x 51, 10,000 images
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import calibrate_batchnorm, default_size, device_name, median_time, record, resolve_device
from resnet_probe.landscape import grid_axis, loss_surface, plane_coordinates, random_directions
from resnet_probe.models import build_model

SIZES = {
    "small": dict(images=1000, resolution=11, timed_points=11, batch_size=250, loop_batch=128, points_per_pass=11),
    "paper": dict(images=10000, resolution=51, timed_points=51, batch_size=1000, loop_batch=1000,
                  points_per_pass=51),
}
MATMUL_N = 2048


def _cpu_and_wall(fn, repeats: int, device) -> tuple[float, float]:
    """Median wall time (harness) and median process CPU time of ``fn``, in seconds."""
    cpu = []

    def timed():
        start = time.process_time()
        fn()
        cpu.append(time.process_time() - start)
    wall = median_time(timed, repeats=repeats, warmup=1 if torch.device(device).type == "cuda" else 0,
                       device=device)["median_ms"] / 1e3
    return wall, float(np.median(cpu[-repeats:]))


def _matmul_rate(device, repeats: int) -> float:
    """GFLOP/s of a float32 ``MATMUL_N`` x ``MATMUL_N`` matmul on this device and thread count."""
    a = torch.randn(MATMUL_N, MATMUL_N, device=device)
    ms = median_time(lambda: a @ a, repeats=max(repeats, 3), warmup=1, device=device)["median_ms"]
    return 2 * MATMUL_N ** 3 / (ms / 1e3) / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="small (CPU default) or paper (GPU default)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    size = args.size or default_size(device)
    cfg = dict(SIZES[size])
    torch.manual_seed(0)
    model = build_model("residual", 20).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["images"], 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (cfg["images"],), generator=g).to(device)
    calibrate_batchnorm(model, x, cfg["batch_size"])
    dirs = random_directions(model, 2, seed=0)
    axis = grid_axis(cfg["resolution"], 1.0)
    coords = plane_coordinates(axis, axis)
    timed = coords[:cfg["timed_points"]]
    scale = len(coords) / len(timed)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    flops = counter.get_total_flops() * len(timed) * cfg["images"]
    engines = {"loop": dict(engine="loop", batch_size=cfg["loop_batch"]),
               "pointwise": dict(engine="pointwise", batch_size=cfg["batch_size"]),
               "batched": dict(engine="batched", batch_size=cfg["batch_size"], points_per_pass=cfg["points_per_pass"])}
    losses, rows = {}, []
    peak = _matmul_rate(device, args.repeats)
    for name, opts in engines.items():
        def run(name=name, opts=opts):
            losses[name] = loss_surface(model, dirs, timed, x, y, **opts).loss
        wall, cpu = _cpu_and_wall(run, args.repeats, device)
        rows.append({"engine": name, "grid": f"{cfg['resolution']}x{cfg['resolution']}", "images": cfg["images"],
                     "timed_points": len(timed), "grid_s": wall * scale, "grid_cpu_s": cpu * scale,
                     "gflop_per_s": flops / wall / 1e9, "matmul_gflop_per_s": peak})
    base = rows[0]
    for row in rows:
        row["speedup"] = base["grid_s"] / row["grid_s"]
        row["cpu_speedup"] = base["grid_cpu_s"] / row["grid_cpu_s"]
        row["max_rel_loss_diff"] = float((np.abs(losses[row["engine"]] - losses["loop"]) / losses["loop"]).max())
    config = {"model": "residual-20", "size": size, "device": str(device), "hardware": device_name(device),
              "repeats": args.repeats, "threads": torch.get_num_threads(), **cfg,
              "forward_gflop_per_image": counter.get_total_flops() / 1e9,
              "note": "grid times extrapolated from timed_points grid points (every point costs the same)",
              "target": "batched >= 3x loop on the CPU at 11x11, ResNet-20, 1,000 images"}
    record("landscape", rows, config=config, device=device)


if __name__ == "__main__":
    main()
