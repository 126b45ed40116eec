"""Lesion sweeps: the batched engine against a naive loop of ``lesion`` context-manager evaluations.

Measured on ResNet-110 (residual, option A, 54 blocks) with random weights and random images
(the cost does not depend on either; BN running statistics are set from the images first, so that
logits have a trained net's scale), both paths in the same run, same metrics computed:

- the single-block sweep (54 deletion sets): prefix cache + per-sample gates vs 54 full forward
  passes under ``with lesion(model, [i])``;
- a k-deletion sweep (paper: k = 1..20, 50 random sets each; small: fewer): batched vs loop;
- the batched sweeps again with BN folded into the convolutions (``fold_bn=True``) and on the folded
  copy compiled block by block (``evaluation_model(model, "compiled")``), and one evaluation pass of
  the intact net eager, folded and compiled (compilation, done once before timing, reported apart).

On CUDA the network, its folded copies and the images are channels_last (NHWC).

Each row reports the engine's and the loop's median time, their ratio, and whether the two paths
gave the same per-example predictions and losses (bitwise on CPU). Issue targets on one H100:
single sweep <= 2.0 s, k-sweep <= 60 s over the 10k test images.

    .venv/bin/python -m benchmarks.bench_lesion                # CPU, small: ~1-2 min on 2 cores
    .venv/bin/python -m benchmarks.bench_lesion --size paper   # GPU: 10k images
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from benchmarks.harness import (calibrate_batchnorm, default_size, device_name, evaluate_in_batches, median_time,
                                record, resolve_device)
from resnet_probe.lesion import evaluate_deletion_sets
from resnet_probe.lesion.engine import default_max_batch
from resnet_probe.models import build_model, evaluation_model, fold_batchnorm

SIZES = {
    # images, examples per chunk, most rows per batched pass (None: the engine's default for the
    # device), k values, sets per k,
    # and how many k-sweep sets the (slow) loop times, its total extrapolated from them
    "small": dict(images=64, batch_size=64, max_batch=None, ks=(1, 2, 3, 4, 5), sets_per_k=4,
                  loop_sets=20),
    "paper": dict(images=10000, batch_size=1000, max_batch=16384, ks=tuple(range(1, 21)),
                  sets_per_k=50, loop_sets=100),
}


def deletion_case(rows, name, model, compiled, sets, x, y, cfg, repeats, device, loop_sets=None):
    """Time the batched engine on ``sets`` (BN as is, folded, and on the ``compiled`` copy) and the loop
    on ``loop_sets`` of them."""
    kw = dict(batch_size=cfg["batch_size"], max_batch=cfg["max_batch"])
    out = {}

    def batched(key, net, **extra):
        out[key] = evaluate_deletion_sets(net, sets, x, y, engine="batched", **extra, **kw)

    loop_subset = sets if loop_sets is None else sets[:loop_sets]

    def loop():
        out["loop"] = evaluate_deletion_sets(model, loop_subset, x, y, engine="loop", **kw)

    warmup = _warmup(device)
    t_batched = median_time(lambda: batched("as_is", model), repeats=repeats, warmup=warmup,
                            device=device)["median_ms"]
    t_folded = median_time(lambda: batched("folded", model, fold_bn=True), repeats=repeats, warmup=warmup,
                           device=device)["median_ms"]
    t_compiled = median_time(lambda: batched("compiled", compiled), repeats=repeats, warmup=1,
                             device=device)["median_ms"]
    t_loop = median_time(loop, repeats=repeats, warmup=0, device=device)["median_ms"]
    t_loop_total = t_loop * len(sets) / len(loop_subset)
    a, f, c, b = out["as_is"], out["folded"], out["compiled"], out["loop"]
    m = len(loop_subset)
    rows.append({
        "case": name, "images": len(x), "sets": len(sets), "batched_ms": t_batched,
        "batched_bn_folded_ms": t_folded, "batched_compiled_ms": t_compiled, "loop_ms": t_loop_total,
        "loop_sets_timed": m, "speedup": t_loop_total / t_batched, "speedup_bn_folded": t_loop_total / t_folded,
        "speedup_compiled": t_loop_total / t_compiled,
        "same_predictions": bool(np.array_equal(a.error[:m], b.error)),
        "max_abs_loss_diff": float(np.abs(a.loss[:m] - b.loss).max()),
        "bn_folded_max_abs_loss_diff": float(np.abs(f.loss[:m] - b.loss).max()),
        "compiled_max_abs_loss_diff": float(np.abs(c.loss[:m] - b.loss).max()),
        "compiled_same_predictions": bool(np.array_equal(c.error[:m], b.error)),
    })


def _warmup(device) -> int:
    """Untimed runs before timing: one on CUDA (lazy initialisation); none on a CPU."""
    return 1 if torch.device(device).type == "cuda" else 0


def evaluation_case(rows, model, compiled, x, cfg, repeats, device) -> None:
    """Time one pass of the intact model over the images: BN as is, folded into the convolutions, and
    the folded copy compiled block by block (compiled, and its first pass run, before timing)."""
    folded = fold_batchnorm(model)
    batch = cfg["batch_size"]
    warmup = _warmup(device)
    start = time.perf_counter()
    evaluate_in_batches(compiled, x, batch)  # compiles
    compile_s = time.perf_counter() - start
    t = {name: median_time(lambda net=net: evaluate_in_batches(net, x, batch), repeats=max(repeats, 3),
                           warmup=warmup, device=device)["median_ms"]
         for name, net in (("as_is", model), ("folded", folded), ("compiled", compiled))}
    rows.append({"case": "evaluation of the intact net", "images": len(x), "sets": 1, "eval_ms": t["as_is"],
                 "eval_bn_folded_ms": t["folded"], "speedup_bn_folded": t["as_is"] / t["folded"],
                 "eval_compiled_ms": t["compiled"], "speedup_compiled": t["as_is"] / t["compiled"],
                 "compile_s": compile_s})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="small (CPU default) or paper (GPU default: 10k images)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="fp32 (CPU default) or bf16 autocast (CUDA default)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    size = args.size or default_size(device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    cfg = dict(SIZES[size])
    if cfg["max_batch"] is None:
        cfg["max_batch"] = default_max_batch(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    torch.manual_seed(0)
    model = build_model("residual", 110).to(device)
    n = sum(len(s) for s in model.stages)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["images"], 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (cfg["images"],), generator=g).to(device)
    calibrate_batchnorm(model, x, cfg["batch_size"])
    if device.type == "cuda":  # NHWC, the layout bf16 / TF32 convolutions run in without transposes
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    rows: list[dict] = []
    with autocast:
        measure(rows, model, n, x, y, cfg, args.repeats, device)
    config = {"model": "residual-110", "blocks": n, "size": size, "device": str(device),
              "channels_last": device.type == "cuda",
              "hardware": device_name(device), "repeats": args.repeats, "precision": precision,
              "threads": torch.get_num_threads(), **cfg,
              "note": "loop_ms over all sets, extrapolated from loop_sets_timed random sets when fewer",
              "targets": "H100, 10k images: single sweep <= 2.0 s, k-sweep <= 60 s"}
    record("lesion", rows, config=config, device=device)


def measure(rows, model, n, x, y, cfg, repeats, device) -> None:
    compiled = evaluation_model(model, "compiled")
    evaluation_case(rows, model, compiled, x, cfg, repeats, device)
    deletion_case(rows, "single-block sweep", model, compiled, [[i] for i in range(n)], x, y, cfg, repeats, device)
    rng = np.random.default_rng(0)
    k_sets = [sorted(rng.choice(n, size=k, replace=False).tolist())
              for k in cfg["ks"] for _ in range(cfg["sets_per_k"])]
    loop_ids = rng.permutation(len(k_sets))[:cfg["loop_sets"]]
    timed_first = set(loop_ids.tolist())
    k_sets = [k_sets[i] for i in loop_ids] + [s for i, s in enumerate(k_sets) if i not in timed_first]
    deletion_case(rows, f"k-deletion sweep (k={cfg['ks'][0]}..{cfg['ks'][-1]}, {cfg['sets_per_k']} sets each)",
          model, compiled, k_sets, x, y, cfg, repeats, device, loop_sets=cfg["loop_sets"])


if __name__ == "__main__":
    main()
