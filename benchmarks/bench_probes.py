"""Cost of the probes: evaluation with the response probe on vs off, training with the gradient probe.

Measured on ResNet-56 (residual, option A) with random weights whose BN running statistics are
first set from the benchmark images (train-mode forwards), so that activations are normalised as in
a trained net:

- evaluation time over N images with no probe, with the streaming response probe on every site
  (3x3 layer responses, branch, shortcut, block output), on the 3x3 layer responses only (He et al.
  Fig 7), and with the naive alternative (hooks that keep every activation, then ``torch.std``);
  target: streaming <= 10 % slower than no probe. Each case runs on its own copy of the model and
  the cases advance one batch at a time in turn, so that drifting machine load hits all alike;
- peak memory of that evaluation for two N: the streaming probe's state is O(channels), the naive
  capture grows with N;
- the training step (forward, backward, SGD; ms per step over runs of 8 steps, 50 on the GPU) with
  and without the gradient probe recording every step (parameter- and activation-gradient norms);
  target <= 15 % slower.

    .venv/bin/python -m benchmarks.bench_probes                # CPU, small: ~2 min on 2 idle cores
    .venv/bin/python -m benchmarks.bench_probes --size paper   # GPU: 10k images, batch 1000
    .venv/bin/python -m benchmarks.bench_probes --size paper --device cpu --repeats 3  # the same on the CPU: ~30 min
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import (calibrate_batchnorm, default_size, device_name, evaluate_in_batches,
                                evaluation_steps, peak_memory, record, resolve_device, synchronize)
from resnet_probe.models import build_model
from resnet_probe.probes import native, probe

LAYER_SITES = "*.branch.conv*"  # each 3x3 layer's response after BN (He et al. 2016, Fig 7)
SIZES = {  # images evaluated (two values for the memory comparison), eval batch, train batch
    "small": dict(n_eval=(256, 1024), eval_batch=64, train_batch=64, train_steps=8),
    "paper": dict(n_eval=(5000, 10000), eval_batch=1000, train_batch=128, train_steps=50),
}


def _naive_capture(model, images: torch.Tensor, batch: int) -> dict:
    """The naive probe: keep every branch output, then ``torch.std`` over the concatenation."""
    return _finish(_naive_steps(model, images, batch))


def _naive_steps(model, images: torch.Tensor, batch: int):
    """``_naive_capture`` one batch per step (a generator; its last step computes the stds)."""
    kept: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            key = 100 * i + j
            kept[key] = []
            handles.append(block.branch.bn2.register_forward_hook(
                lambda m, a, out, key=key: kept[key].append(out.detach().clone())))
    try:
        yield from evaluation_steps(model, images, batch)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).std() for k, v in kept.items()}


def _streaming(model, images: torch.Tensor, batch: int, sites="*"):
    return _finish(_streaming_steps(model, images, batch, sites))


def _streaming_steps(model, images: torch.Tensor, batch: int, sites="*"):
    """Evaluation under the streaming response probe, one batch per step; returns the session."""
    with probe(model, sites=sites) as session:
        yield from evaluation_steps(model, images, batch)
    return session


def _finish(steps):
    """Run a step generator to its end; returns its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def lockstep(cases: dict, repeats: int, device) -> dict:
    """Time of each case, the cases advanced one step at a time in turn.

    ``cases`` maps a name to a function returning a fresh step generator (set-up, one batch or
    training step per step, finishing work in its last step), each on its own copy of the model.
    Interleaving at the step, not the whole run, and changing which case goes first at every step,
    lets drifting machine load and cache state hit every case alike.

    Returns:
        ``{name: {"median_ms", "min_ms", "ratio"}}``: total time of one run of the case (every step,
        set-up and finish included), and the median over repeats of its ratio to the first case's
        total in the same repeat.
    """
    for make in cases.values():  # warm-up
        _finish(make())
    totals = {n: [] for n in cases}
    for _ in range(repeats):
        running = {n: make() for n, make in cases.items()}
        spent = dict.fromkeys(cases, 0.0)
        step = 0
        while running:
            names = list(running)
            step += 1
            for n in names[step % len(names):] + names[:step % len(names)]:  # each case first in turn
                synchronize(device)
                t0 = time.perf_counter()
                try:
                    next(running[n])
                except StopIteration:
                    del running[n]
                synchronize(device)
                spent[n] += time.perf_counter() - t0
        for n, t in spent.items():
            totals[n].append(t * 1e3)
    base = totals[next(iter(cases))]
    return {n: {"median_ms": statistics.median(t), "min_ms": min(t),
                "ratio": statistics.median(a / b for a, b in zip(t, base))} for n, t in totals.items()}


def _train_steps(model, opt, x, y, steps: int, session=None):
    """``steps`` training steps (forward, backward, SGD), one per generator step, for ``lockstep``."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if session is not None:
            session.record_gradients()
        opt.step()
        yield


def eval_overhead_rows(model, images: torch.Tensor, batch: int, repeats: int, device) -> list[dict]:
    """Evaluation of ``images`` with no probe, the streaming probe (all sites; 3x3 layer responses) and
    the naive capture, each on its own copy of ``model``, advanced in lockstep."""
    copies = [copy.deepcopy(model) for _ in range(4)]  # one per case: a probe hooks only its own copy
    evals = lockstep({
        "eval, no probe": lambda: evaluation_steps(copies[0], images, batch),
        "eval, streaming response probe (all sites)": lambda: _streaming_steps(copies[1], images, batch),
        "eval, streaming response probe (3x3 layer responses)":
            lambda: _streaming_steps(copies[2], images, batch, LAYER_SITES),
        "eval, naive capture + torch.std (branch sites)": lambda: _naive_steps(copies[3], images, batch),
    }, repeats, device)
    return [{"case": name, "images": len(images), "median_ms": t["median_ms"], "min_ms": t["min_ms"],
             "ratio_vs_no_probe": t["ratio"]} for name, t in evals.items()]


def memory_rows(model, images: torch.Tensor, ns, batch: int, device) -> list[dict]:
    """Peak memory of evaluating the first ``n`` images, for each ``n`` in ``ns``: no probe, the
    streaming probe (its state is O(channels)) and the naive capture (it grows with ``n``)."""
    rows = []
    for n in ns:
        sub = images[:n]
        state = _streaming(model, sub, batch).state_bytes()
        rows.append({"case": "peak memory", "images": n,
                     "no_probe_bytes": peak_memory(lambda: evaluate_in_batches(model, sub, batch), device),
                     "streaming_bytes": peak_memory(lambda: _streaming(model, sub, batch), device),
                     "naive_capture_bytes": peak_memory(lambda: _naive_capture(model, sub, batch), device),
                     "probe_state_bytes": state})
    return rows


def train_overhead_rows(x: torch.Tensor, y: torch.Tensor, steps: int, repeats: int, device) -> list[dict]:
    """Training steps of ResNet-56 on ``(x, y)`` with and without the gradient probe recording each step."""
    plain = build_model("residual", 56).to(device).train()
    probed = copy.deepcopy(plain)  # same network and weights; only this one is probed
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_probed = torch.optim.SGD(probed.parameters(), lr=0.01, momentum=0.9)
    with probe(probed, metrics=("gradient",)) as session:
        timed = lockstep({
            "train step, no probe": lambda: _train_steps(plain, opt_plain, x, y, steps),
            "train step, gradient probe every step": lambda: _train_steps(probed, opt_probed, x, y, steps, session),
        }, repeats, device)
        session.gradient.reset()
    return [{"case": name, "batch": len(x), "median_ms": t["median_ms"] / steps, "min_ms": t["min_ms"] / steps,
             "ratio_vs_no_probe": t["ratio"]} for name, t in timed.items()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="small (CPU default) or paper (GPU default: 10k images)")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds per comparison")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    size = args.size or default_size(device)
    cfg = SIZES[size]
    torch.manual_seed(0)
    model = build_model("residual", 56).to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(max(cfg["n_eval"]), 3, 32, 32, generator=g).to(device)
    b = cfg["eval_batch"]
    calibrate_batchnorm(model, images, b)
    rows = eval_overhead_rows(model, images, b, args.repeats, device)
    rows += memory_rows(model, images, cfg["n_eval"], b, device)
    x = torch.randn(cfg["train_batch"], 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (cfg["train_batch"],), generator=g).to(device)
    rows += train_overhead_rows(x, y, cfg["train_steps"], args.repeats, device)

    config = {"model": "residual-56", "size": size, "device": str(device), "hardware": device_name(device),
              "repeats": args.repeats, "threads": torch.get_num_threads(), **cfg,
              "cpu_reduction": "one-read kernel" if native.available() else native.status(),
              "targets": "streaming eval <= 1.10x, gradient-probe train step <= 1.15x"}
    record("probes", rows, config=config, device=device)


if __name__ == "__main__":
    main()
