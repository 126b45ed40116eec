"""Sharded lesion sweep: the single-block sweep of ResNet-50 in one process and split over two processes.

Measured on torchvision's ResNet-50 (16 Bottleneck blocks) with random weights (no download; BN
running statistics set from the images first) on a fixed set of random 224 x 224 images: the
single-block deletion sweep (``single_block_sweep``, batched engine, chunks of ``batch_size``
images), timed

- in one process with one thread (the baseline),
- in one process with two threads (what the second core gives without sharding),
- over two processes of one thread each (gloo on the CPU, ``resnet_probe.shards.Shard``: each rank
  evaluates its chunks, the per-image values are gathered in image order, both ranks compute the
  table), started with ``torch.multiprocessing`` and timed from a barrier to a barrier,

and each row says whether its table equals the baseline's bit for bit (means, bootstrap bounds).

    .venv/bin/python -m benchmarks.bench_shard                 # CPU: ~3-5 min on 2 cores
    .venv/bin/python -m benchmarks.bench_shard --images 64 --repeats 3
"""
from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from benchmarks.harness import calibrate_batchnorm, device_name, record
from resnet_probe.lesion import single_block_sweep
from resnet_probe.shards import Shard


def _setup(images: int, batch_size: int):
    """ResNet-50 with random weights (seed 0), BN statistics set from the images, and the images."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (images,), generator=g)
    calibrate_batchnorm(model, x, batch_size)
    return model, x, y


def _sweep(model, x, y, batch_size: int, shard: Shard | None) -> pd.DataFrame:
    return single_block_sweep(model, x, y, batch_size=batch_size, n_resamples=200, shard=shard)


def one_process(images: int, batch_size: int, threads: int, repeats: int) -> tuple[list[float], pd.DataFrame]:
    """Seconds of each repeat of the sweep in this process with ``threads`` threads, and its table."""
    torch.set_num_threads(threads)
    model, x, y = _setup(images, batch_size)
    times, table = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        table = _sweep(model, x, y, batch_size, None)
        times.append(time.perf_counter() - t0)
    return times, table


def _rank(rank: int, world: int, init: str, images: int, batch_size: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    try:
        shard = Shard(rank, world, timeout_s=1800)
        model, x, y = _setup(images, batch_size)
        times, table = [], None
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            table = _sweep(model, x, y, batch_size, shard)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            Path(out).write_bytes(pickle.dumps((times, table)))
    finally:
        dist.destroy_process_group()


def sharded(world: int, images: int, batch_size: int, repeats: int) -> tuple[list[float], pd.DataFrame]:
    """Seconds of each repeat of the sweep split over ``world`` one-thread gloo processes, and rank 0's table."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.pkl"
        mp.start_processes(_rank, args=(world, f"file://{tmp}/init", images, batch_size, repeats, str(out)),
                           nprocs=world, start_method="spawn")
        return pickle.loads(out.read_bytes())


def identical(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    except AssertionError:
        return False
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32, help="evaluation images (224 x 224)")
    p.add_argument("--batch-size", type=int, default=8, help="images per chunk, the unit the ranks share out")
    p.add_argument("--repeats", type=int, default=2, help="timed sweeps per configuration (the first included)")
    args = p.parse_args(argv)
    base_times, base = one_process(args.images, args.batch_size, 1, args.repeats)
    cases = [("1 process, 1 thread", 1, 1, base_times, base)]
    t2, table2 = one_process(args.images, args.batch_size, 2, args.repeats)
    cases.append(("1 process, 2 threads", 1, 2, t2, table2))
    tp, tablep = sharded(2, args.images, args.batch_size, args.repeats)
    cases.append(("2 processes (gloo), 1 thread each", 2, 1, tp, tablep))
    rows = []
    for name, procs, threads, times, table in cases:
        best = min(times)
        rows.append({"case": name, "processes": procs, "threads_per_process": threads, "images": args.images,
                     "sets": len(table), "best_s": best, "times_s": [round(t, 2) for t in times],
                     "speedup_vs_1_thread": min(base_times) / best, "table_identical_to_1_process": identical(base, table)})
        print(f"{name}: best {best:.2f} s of {[round(t, 2) for t in times]}, speed-up "
              f"{min(base_times) / best:.2f}x, table identical: {rows[-1]['table_identical_to_1_process']}", flush=True)
    config = {"model": "torchvision resnet50, random weights, BN statistics from the images", "blocks": 16,
              "images": args.images, "resolution": 224, "batch_size": args.batch_size, "repeats": args.repeats,
              "hardware": device_name("cpu"), "sweep": "single_block_sweep, batched engine, n_resamples=200",
              "note": "time of the sweep call (gather and bootstrap included), process start and imports excluded; "
                      "best of the repeats"}
    record("shard", rows, config=config, device="cpu")


if __name__ == "__main__":
    main()
