"""Everything GPU-only, checked and measured in one command a stage:
``python -m benchmarks.gpu_check --out DIR [--stage train|eval|all]``.

A GPU machine is lent rarely and briefly (one H200, about 15 minutes of device time, at most 10
minutes a command), so each stage is one command that runs under its own time limit
(``--limit-s``, 470 s) and keeps what it measured whatever happens:

- stage ``train``: the environment (torch, CUDA, driver, GPU, importable optional packages); the
  GPU tests (``pytest -m gpu``); ResNet-56, batch 128, from the GPU-resident pack: the Lightning
  path (compiled, CUDA graphs) against a typical eager DataLoader loop in the same run, with the
  probes on and off; 8 seeds of ResNet-56 side by side; then, while time remains, ResNet-110 and
  Highway-56;
- stage ``eval``: ResNet-110 on the 10k test images as is, BN-folded, compiled, and channels_last
  bf16; the single-block deletion sweep, looped against batched with prefix reuse; a k-deletion
  sweep (k = 1..20, 50 sets each, or the fraction that fits, extrapolated); the probes' overhead and
  memory against N; then, while time remains, a short science run (residual-56 and plain-56).

Each row (``benchmarks.gpu_stages.measured``) is written as soon as it is measured: ``DIR/gpu_check-<stage>.json``
and a markdown summary ``.md`` beside it are rewritten after every row, so a run cut short returns
everything done. Each target prints one line: measured, target, PASS / FAIL. A row that raises is
recorded with its error and the stage goes on; a row that would not fit in the time left is skipped
with the reason; when the time limit comes in the middle of a row, that row is recorded as cut, the
files are written and the process exits (status 3). Compiled code never falls back to eager silently
(``resnet_probe.models.compiled``), and each row records its compile time.

The inductor cache lives in a folder of its own and is packed into DIR after each stage
(``benchmarks.inductor_cache``): send those files back with ``--warm-cache PATH`` to start warm.

``--dry-run --device cpu`` runs every row at a tiny size on the CPU (synthetic data, eager, the GPU
tests only collected) and writes the same files with ``"dry_run": true``; ``tests/test_gpu_check.py``
runs it, so the command cannot rot between GPU loans. ``benchmarks/gpu_carry.sh`` prepares what a GPU
machine without network needs and prints the command line of each stage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from benchmarks import inductor_cache
from benchmarks.gpu_stages import STAGES, sizes
from benchmarks.harness import environment
from resnet_probe.atomic import atomic_write_text
from resnet_probe.train.fit import quiet_lightning

DEFAULT_LIMIT_S = 470  # a stage, compilation included; the machine's start and the transfers come on top
RESULT_FILES_MAX = 8   # files a GPU machine gives back from its output folder
RESULT_BYTES_MAX = 60 * 2**20


class Check:
    """One stage: its rows, its clock, and the files they are written to.

    Args:
        out: the output folder.
        stage: ``train`` or ``eval``.
        limit_s: seconds the stage may take.
        device: the device measured on.
        dry_run: tiny sizes, no targets judged.
    """

    def __init__(self, out: Path, stage: str, limit_s: float, device: torch.device, dry_run: bool):
        self.out, self.stage, self.limit_s, self.device, self.dry_run = out, stage, limit_s, device, dry_run
        self.size = sizes(dry_run)
        self.rows: list[dict] = []
        self.memo: dict = {}  # what later rows of the stage reuse (a reference time, a compiled copy)
        self.start = time.monotonic()
        self.current: str | None = None
        self.env = environment(device)
        self._lock = threading.Lock()

    @property
    def json_path(self) -> Path:
        return self.out / f"gpu_check-{self.stage}.json"

    def left(self) -> float:
        """Seconds left to this stage."""
        return self.limit_s - (time.monotonic() - self.start)

    def run(self, name: str, fn, needs_s: float = 0.0) -> None:
        """Run ``fn(self)``, which returns rows (``gpu_stages.measured``), unless fewer than ``needs_s``
        seconds are left; record its rows, or its error, at once."""
        if self.left() < needs_s:
            self._add({"name": name, "status": "skipped",
                       "reason": f"{self.left():.0f} s left of {self.limit_s:.0f} s; it needs about {needs_s:.0f} s"})
            return
        self.current, t0 = name, time.monotonic()
        try:
            rows = fn(self)
        except Exception as err:  # recorded with its traceback; the stage goes on
            rows = [{"name": name, "status": "error", "error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc()[-3000:]}]
        self.current = None
        for row in rows:
            row.setdefault("seconds", time.monotonic() - t0)
            self._add(row)

    def _add(self, row: dict) -> None:
        with self._lock:
            if "status" not in row:
                row["status"] = judge(row, self.dry_run)
            self.rows.append(row)
            self.write()
            print(line(row), flush=True)

    def cut(self) -> None:
        """The time limit came: record the row in progress as cut and write the files."""
        self._add({"name": self.current or "(between rows)", "status": "cut",
                   "reason": f"the stage's time limit of {self.limit_s:.0f} s came while it ran"})

    def write(self) -> None:
        payload = {"stage": self.stage, "dry_run": self.dry_run, "limit_s": self.limit_s,
                   "elapsed_s": time.monotonic() - self.start, "environment": self.env, "rows": self.rows}
        atomic_write_text(self.json_path, json.dumps(payload, indent=2, default=str) + "\n")
        atomic_write_text(self.json_path.with_suffix(".md"), markdown(payload))


def judge(row: dict, dry_run: bool) -> str:
    """``pass`` / ``fail`` against the row's target, ``info`` without one (``dry-run``: not judged)."""
    target = row.get("target")
    if target is None:
        return "info"
    if dry_run:
        return "dry-run"
    op, limit = target
    value = row.get("measured")
    ok = value is not None and (value <= limit if op == "<=" else value >= limit)
    return "pass" if ok else "fail"


def line(row: dict) -> str:
    """One printed line: the row's status, what it measured, and its target."""
    status = row["status"].upper()
    value = row.get("measured")
    text = f"{status:8} {row['name']}"
    if value is not None:
        text += f": {value:.4g} {row.get('unit', '')}".rstrip()
    if row.get("target"):
        op, limit = row["target"]
        text += f" (target {op} {limit:g} {row.get('unit', '')})".replace(" )", ")")
    if row.get("compile_s") is not None:
        text += f"; compile {row['compile_s']:.1f} s"
    for key in ("reason", "error"):
        if row.get(key):
            text += f"; {row[key]}"
    return text


def markdown(payload: dict) -> str:
    env = payload["environment"]
    head = (f"## gpu_check, stage {payload['stage']}{' (dry run)' if payload['dry_run'] else ''}\n\n"
            f"{env['hardware']} ({env['device']}), torch {env['torch']}, CUDA {env['cuda']}, git {env['git']}, "
            f"{env['date']}; {payload['elapsed_s']:.0f} s of {payload['limit_s']:.0f} s\n\n"
            "| status | row | measured | target | compile s | seconds | notes |\n|---|---|---|---|---|---|---|\n")
    body = []
    for r in payload["rows"]:
        value = "" if r.get("measured") is None else f"{r['measured']:.4g} {r.get('unit', '')}"
        target = f"{r['target'][0]} {r['target'][1]:g}" if r.get("target") else ""
        compile_s = "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        notes = r.get("reason") or r.get("error") or r.get("note") or ""
        body.append(f"| {r['status']} | {r['name']} | {value} | {target} | {compile_s} | "
                    f"{r.get('seconds', 0):.1f} | {str(notes).replace('|', '/')} |")
    return head + "\n".join(body) + "\n"


def _pack_cache(check: Check, cache_dir: Path) -> None:
    others = [p for p in check.out.iterdir() if p.is_file() and p not in inductor_cache.parts(check.out)]
    result = inductor_cache.pack(cache_dir, check.out, RESULT_FILES_MAX - len(others),
                                 RESULT_BYTES_MAX - sum(p.stat().st_size for p in others))
    check.env["inductor_cache"] = {"dir": str(cache_dir), **result}
    check.write()


def run_stage(stage: str, out: Path, limit_s: float, device: torch.device, dry_run: bool, cache_dir: Path) -> Check:
    """Run one stage's rows in order under its time limit; returns the finished ``Check``."""
    check = Check(out, stage, limit_s, device, dry_run)
    check.write()

    def time_up():
        try:
            check.cut()
            _pack_cache(check, cache_dir)
            print(f"gpu_check: stage {stage} stopped at its time limit; results in {check.json_path}", flush=True)
        finally:
            os._exit(3)  # the row in progress may hold the GPU for minutes more: end the process now

    watchdog = threading.Timer(limit_s, time_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        with quiet_lightning():
            for name, fn, needs_s in STAGES[stage](check):
                check.run(name, fn, needs_s)
    finally:
        watchdog.cancel()
    _pack_cache(check, cache_dir)
    return check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the results (created)")
    p.add_argument("--stage", choices=("train", "eval", "all"), default="all")
    p.add_argument("--device", default="cuda", help="cuda (default) or, with --dry-run, cpu")
    p.add_argument("--dry-run", action="store_true", help="every row at a tiny size (the CPU check of this command)")
    p.add_argument("--limit-s", type=float, default=DEFAULT_LIMIT_S, help="seconds per stage (default %(default)s)")
    p.add_argument("--warm-cache", type=Path, default=None,
                   help="folder holding inductor-cache.tar.gz.part* files of an earlier run, to start warm")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="the inductor cache folder (default: a new temporary one, packed into --out)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU; on a machine without one use --dry-run --device cpu")
    if device.type != "cuda" and not args.dry_run:
        p.error(f"--device {args.device} measures nothing worth keeping; use --dry-run for the CPU check")
    if args.warm_cache is not None and not inductor_cache.parts(args.warm_cache):
        p.error(f"--warm-cache {args.warm_cache} holds no {inductor_cache.PREFIX}* files")
    args.out.mkdir(parents=True, exist_ok=True)
    # set here, whatever an import set it to: inductor reads it whenever it compiles (also in pytest's processes)
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="gpu_check-inductor-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir.resolve())
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: a thread pool only waits on a busy machine
    if args.warm_cache is not None:
        print(f"gpu_check: {inductor_cache.unpack(args.warm_cache, cache_dir) / 2**20:.1f} MiB of inductor cache "
              f"restored into {cache_dir}", flush=True)
    stages = ("train", "eval") if args.stage == "all" else (args.stage,)
    for stage in stages:
        print(f"gpu_check: stage {stage} on {device}{' (dry run)' if args.dry_run else ''}, "
              f"limit {args.limit_s:.0f} s", flush=True)
        check = run_stage(stage, args.out, args.limit_s, device, args.dry_run, cache_dir)
        print(f"gpu_check: stage {stage} done in {time.monotonic() - check.start:.0f} s; {check.json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
