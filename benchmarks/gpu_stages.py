"""The rows of ``benchmarks.gpu_check``'s two stages, at GPU size or at the dry run's tiny size.

A stage is a list of ``(name, fn, needs_s)``: ``fn(check)`` returns rows (``gpu_check.measured``);
``needs_s`` is about the least it takes on one H200 with a cold compile cache, and a row is skipped,
with the reason, when less time is left. Rows that compare run their variants in the same process,
one after the other. Targets (one H100/H200): ResNet-56 Lightning step <= 6.5 ms, probes on <= 1.10x
off, 8 x ResNet-56 side by side <= 2.5 ms per model-step, ResNet-110 <= 12.5 ms, Highway-56 <= 8.5 ms;
ResNet-110 evaluation of 10k images <= 75 ms on its best path, the single-block deletion sweep <= 2.0 s,
the k-deletion sweep (k = 1..20, 50 sets each) <= 60 s, the streaming response probe <= 1.10x.

Timing rows use random pixels held on the device (a step's time does not depend on them, see
``bench_train``); only the science run reads the CIFAR-10 pack. Each architecture's rows start from
an empty compile cache, so a row's compile time is its own (later rows of one architecture reuse
the graphs its earlier rows compiled, which their compile time then leaves out).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

from benchmarks.bench_lesion import deletion_case
from benchmarks.bench_probes import eval_overhead_rows, memory_rows
from benchmarks.bench_train import lightning_fit, random_source, typical_stepper
from benchmarks.harness import calibrate_batchnorm, evaluate_in_batches, median_time
from resnet_probe.data import CifarDataModule, default_pack_path, make_synthetic, normalize, resolve_source
from resnet_probe.lesion import evaluate_deletion_sets
from resnet_probe.models import anatomy, build_model, evaluation_model
from resnet_probe.probes import probe
from resnet_probe.train.fit import fit
from resnet_probe.train.module import CifarClassifier

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_PACKAGES = ("captum", "jsonargparse", "nbformat", "nbclient", "ipykernel", "seaborn", "scipy", "pandas",
                     "matplotlib", "triton")
GPU = dict(  # the sizes
    batch=128, warmup=30, window=20, windows=7, probe_every=50, models=8, train_images=45_000, workers=8,
    eval_depth=110, eval_images=10_000, eval_batch=1000, max_batch=16_384, ks=tuple(range(1, 21)), sets_per_k=50,
    loop_sets=10, probe_images=(5000, 10_000), probe_repeats=3, eval_repeats=5, science_batch=128, science_steps=1500,
    science_eval=2000, archs={"ResNet-56": ("residual", 56), "ResNet-110": ("residual", 110),
                              "Highway-56": ("highway", 56)})
DRY = dict(  # every row at a tiny size: a CPU run of the same code, in well under two minutes
    batch=16, warmup=2, window=2, windows=2, probe_every=2, models=2, train_images=192, workers=0,
    eval_depth=8, eval_images=64, eval_batch=32, max_batch=256, ks=(1, 2), sets_per_k=2,
    loop_sets=2, probe_images=(32, 64), probe_repeats=1, eval_repeats=1, science_batch=16, science_steps=3,
    science_eval=32, archs={"ResNet-56": ("residual", 8), "ResNet-110": ("residual", 8),
                            "Highway-56": ("highway", 8)})


def sizes(dry_run: bool) -> dict:
    return DRY if dry_run else GPU


def measured(name: str, value: float | None, unit: str, target: tuple[str, float] | None = None, **details) -> dict:
    """A row: ``value`` in ``unit``, with an optional target ``("<=", limit)``, and details."""
    return {"name": name, "measured": value, "unit": unit, "target": list(target) if target else None, **details}


# ---- stage train ---------------------------------------------------------------------------------------

def train_stage(check) -> list:
    return [("environment", environment_rows, 0),
            ("GPU tests (pytest -m gpu)", gpu_test_rows, 60),
            ("ResNet-56 typical eager loop", lambda c: typical_loop_rows(c, "ResNet-56"), 10),
            ("ResNet-56 Lightning step", lambda c: lightning_rows(c, "ResNet-56"), 60),
            ("ResNet-56 probes on / off", lambda c: lightning_rows(c, "ResNet-56", probes=True), 40),
            (f"{check.size['models']} x ResNet-56 side by side", lambda c: lightning_rows(c, "ResNet-56", grouped=True),
             60),
            ("ResNet-110 Lightning step", lambda c: lightning_rows(c, "ResNet-110"), 90),
            ("Highway-56 Lightning step", lambda c: lightning_rows(c, "Highway-56"), 70)]


def environment_rows(check) -> list[dict]:
    """Versions, the GPU and its driver, and which optional packages import."""
    cuda = check.device.type == "cuda"
    props = torch.cuda.get_device_properties(check.device) if cuda else None
    driver = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or None
    versions = {}
    for name in OPTIONAL_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name) if importlib.util.find_spec(name) else None
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "importable"
    return [measured("environment", None, "", python=platform.python_version(), torch=torch.__version__,
                 cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None, driver=driver,
                 gpu=props.name if props else None, capability=f"{props.major}.{props.minor}" if props else None,
                 gpu_memory_gib=props.total_memory / 2**30 if props else None,
                 cpu_capability=torch.backends.cpu.get_cpu_capability(), packages=versions,
                 missing=[n for n, v in versions.items() if v is None])]


def gpu_test_rows(check) -> list[dict]:
    """``pytest -m gpu`` over the test files that hold GPU tests (dry run: collected only)."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs", *files]
    if check.dry_run:
        cmd.append("--collect-only")
    timeout = max(30.0, min(check.left() - 120, 300.0))
    name = "GPU tests (pytest -m gpu)"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout if isinstance(err.stdout, str) else (err.stdout or b"").decode(errors="replace")
        return [{"name": name, "status": "error", "error": f"no result within {timeout:.0f} s", "tail": out[-3000:]}]
    out = proc.stdout + proc.stderr
    missing = sorted(set(re.findall(r"No module named '([\w.]+)'", out)))
    if missing and proc.returncode != 0:
        return [{"name": name, "status": "skipped", "reason": f"missing package(s): {', '.join(missing)}",
                 "tail": out[-3000:]}]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)\b", out)}
    collected = sum(int(n) for n in re.findall(r"(\d+)(?:/\d+)? tests? collected", out))
    bad = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    ran = counts.get("passed", 0) if not check.dry_run else collected
    return [measured(name, bad if ran and proc.returncode in (0, 1) else None, "failed", ("<=", 0), counts=counts,
                 collected=collected, returncode=proc.returncode, files=files,
                 failures=re.findall(r"^(?:FAILED|ERROR) .*$", out, flags=re.M)[:20], tail=out[-3000:])]


def _source(check):
    return random_source(check.size["train_images"])


def typical_loop_rows(check, label: str) -> list[dict]:
    """The usual CIFAR script's step: DataLoader with per-image PIL transforms, fp32 eager model, SGD."""
    s = check.size
    family, depth = s["archs"][label]
    step = typical_stepper(_source(check), family, depth, s["batch"], s["workers"], check.device)
    timing = median_time(lambda: [step() for _ in range(s["window"])], repeats=s["windows"], warmup=1,
                         device=check.device)
    ms = timing["median_ms"] / s["window"]
    check.memo[f"{label} typical"] = ms
    return [measured(f"{label} typical eager loop step", ms, "ms", arch=f"{family}-{depth}", batch=s["batch"],
                 workers=s["workers"])]


def lightning_rows(check, label: str, probes: bool = False, grouped: bool = False) -> list[dict]:
    """The project's Lightning path (on CUDA: data resident there, bf16, channels_last, compiled with CUDA
    graphs); with ``probes`` a ``ProbeCallback`` recording gradient norms every ``probe_every`` steps;
    ``grouped``: ``models`` seeds side by side."""
    s = check.size
    family, depth = s["archs"][label]
    if not probes and not grouped:
        torch._dynamo.reset()  # this architecture's rows start from an empty compile cache
    counters.clear()
    window = s["probe_every"] if probes else s["window"]
    models = s["models"] if grouped else None
    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
    timing = lightning_fit(_source(check), family, depth, s["batch"], models, check.device, s["windows"] * window,
                           s["warmup"], window, probes, "reduce-overhead")
    ms = timing["median_ms"]
    details = dict(arch=f"{family}-{depth}", batch=s["batch"], warmup_steps=s["warmup"], windows=timing["repeats"],
                   compile_s=max(0.0, timing["warmup_s"] - s["warmup"] * ms / 1e3) if check.device.type == "cuda"
                   else None, warmup_s=timing["warmup_s"],
                   graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                   cudagraph_skips=sum(counters["inductor"]["cudagraph_skips"].values()) if check.device.type == "cuda"
                   else None, peak_mem_mib=torch.cuda.max_memory_allocated(check.device) / 2**20
                   if check.device.type == "cuda" else None, ms_min=timing["min_ms"], ms_max=timing["max_ms"])
    typical = check.memo.get(f"{label} typical")
    if grouped:
        per_model = ms / models
        return [measured(f"{models} x {label} side by side, per model-step", per_model, "ms", ("<=", 2.5),
                     models=models, ms_per_step=ms, speedup_vs_typical=typical / per_model if typical else None,
                     **details)]
    if probes:
        off = check.memo.get(f"{label} lightning")
        return [measured(f"{label} probes on / off", ms / off if off else None, "x", ("<=", 1.10), ms_per_step=ms,
                     probe_every_n_steps=window, **details)]
    check.memo[f"{label} lightning"] = ms
    target = {"ResNet-56": 6.5, "ResNet-110": 12.5, "Highway-56": 8.5}[label]
    return [measured(f"{label} Lightning step (compiled, CUDA graphs)", ms, "ms", ("<=", target),
                 speedup_vs_typical=typical / ms if typical else None, **details)]


# ---- stage eval ----------------------------------------------------------------------------------------

def eval_stage(check) -> list:
    return [("environment", environment_rows, 0),
            ("ResNet-110 evaluation paths", evaluation_rows, 60),
            ("single-block deletion sweep", single_sweep_rows, 40),
            ("k-deletion sweep", k_sweep_rows, 30),
            ("probe overhead and memory", probe_rows, 40),
            ("science run", science_rows, 120)]


def _evaluation_inputs(check):
    """ResNet-110 (random weights, BN statistics set from the images) and random images on the device."""
    s = check.size
    if "eval_inputs" not in check.memo:
        torch.manual_seed(0)
        model = build_model("residual", s["eval_depth"]).to(check.device)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(s["eval_images"], 3, 32, 32, generator=g).to(check.device)
        y = torch.randint(0, 10, (s["eval_images"],), generator=g).to(check.device)
        calibrate_batchnorm(model, x, s["eval_batch"])
        check.memo["eval_inputs"] = model, x, y
    return check.memo["eval_inputs"]


def _autocast(check, bf16: bool):
    return torch.autocast(check.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def evaluation_rows(check) -> list[dict]:
    """One pass over the images: as is (fp32, NCHW), BN folded, folded and compiled block by block, and
    that in channels_last under bf16 autocast. The dry run does not compile (CPU)."""
    s = check.size
    model, x, _ = _evaluation_inputs(check)
    compile_path = "folded" if check.dry_run else "compiled"
    variants = [("as is, fp32, NCHW", lambda: model, False, x),
                ("BN folded, fp32", lambda: evaluation_model(model, "folded", channels_last=False), False, x),
                ("folded + compiled, fp32", lambda: evaluation_model(model, compile_path, channels_last=False), False, x),
                ("folded + compiled, channels_last bf16", lambda: evaluation_model(model, compile_path, channels_last=True),
                 True, x.contiguous(memory_format=torch.channels_last))]
    rows, best = [], None
    for name, build, bf16, images in variants:
        net = build()
        with _autocast(check, bf16):
            start = time.perf_counter()
            evaluate_in_batches(net, images, s["eval_batch"])  # compiles, where it does
            if check.device.type == "cuda":
                torch.cuda.synchronize(check.device)
            first_s = time.perf_counter() - start
            ms = median_time(lambda: evaluate_in_batches(net, images, s["eval_batch"]), repeats=s["eval_repeats"],
                             warmup=1, device=check.device)["median_ms"]
        if "bf16" in name:
            check.memo["eval_fast"] = net
        compiles = "compiled" in name and not check.dry_run
        rows.append(measured(f"ResNet-{s['eval_depth']} evaluation, {name}", ms, "ms", images=len(images),
                             batch=s["eval_batch"], compile_s=max(0.0, first_s - ms / 1e3) if compiles else None,
                             note=None if compiles or "compiled" not in name else "dry run: folded, not compiled"))
        best = rows[-1] if best is None or ms < best["measured"] else best
    rows.append(measured("ResNet-110 evaluation of 10k images, best path", best["measured"], "ms", ("<=", 75.0),
                     path=best["name"], arch=f"residual-{s['eval_depth']}", images=len(x)))
    return rows


def _sweep_inputs(check):
    model, x, y = _evaluation_inputs(check)
    if check.device.type == "cuda":  # NHWC, as bench_lesion measures on CUDA
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fast = check.memo.get("eval_fast") or evaluation_model(model, "folded")
    return model, fast, x, y


def single_sweep_rows(check) -> list[dict]:
    """Each of the 54 blocks deleted on its own over every image: the loop of ``lesion`` contexts against
    the batched engine (prefix reuse, per-sample gates) as is, BN-folded and on the compiled copy."""
    s = check.size
    model, fast, x, y = _sweep_inputs(check)
    n = len(anatomy(model).blocks)
    cfg = {"batch_size": s["eval_batch"], "max_batch": s["max_batch"]}
    rows: list[dict] = []
    with _autocast(check, check.device.type == "cuda"):
        deletion_case(rows, "single-block sweep", model, fast, [[i] for i in range(n)], x, y, cfg, 1, check.device)
    r = rows[0]
    best = min(r["batched_ms"], r["batched_bn_folded_ms"], r["batched_compiled_ms"])
    check.memo["per_set_s"] = best / 1e3 / n
    return [measured(f"single-block deletion sweep, {n} x {len(x)} images, looped", r["loop_ms"] / 1e3, "s",
                 **{k: v for k, v in r.items() if k != "case"}),
            measured(f"single-block deletion sweep, {n} x {len(x)} images, batched with prefix reuse", best / 1e3, "s",
                 ("<=", 2.0), speedup=r["loop_ms"] / best)]


def k_sweep_rows(check) -> list[dict]:
    """k random blocks deleted (k = 1..20, 50 sets each) on the fastest copy; when the time left does not
    allow every set, the fraction that fits, and the full sweep's time extrapolated from it."""
    s = check.size
    model, fast, x, y = _sweep_inputs(check)
    n = len(anatomy(model).blocks)
    total = len(s["ks"]) * s["sets_per_k"]
    per_set = check.memo.get("per_set_s")
    budget = max(5.0, min(60.0, check.left() - 150))  # leave time for the probe rows
    per_k = s["sets_per_k"] if per_set is None else max(1, min(s["sets_per_k"], int(budget / per_set / len(s["ks"]))))
    rng = np.random.default_rng(0)
    sets = [sorted(rng.choice(n, size=min(k, n), replace=False).tolist()) for k in s["ks"] for _ in range(per_k)]
    kw = dict(batch_size=s["eval_batch"], max_batch=s["max_batch"])
    with _autocast(check, check.device.type == "cuda"):
        batched = median_time(lambda: evaluate_deletion_sets(fast, sets, x, y, **kw), repeats=1, warmup=0,
                              device=check.device)["median_ms"] / 1e3
        loop = median_time(lambda: evaluate_deletion_sets(model, sets[:s["loop_sets"]], x, y, engine="loop", **kw),
                           repeats=1, warmup=0, device=check.device)["median_ms"] / 1e3
    full = batched * total / len(sets)
    return [measured(f"k-deletion sweep (k = {s['ks'][0]}..{s['ks'][-1]}, {s['sets_per_k']} sets each), batched",
                 full, "s", ("<=", 60.0), sets_measured=len(sets), sets_total=total, fraction=len(sets) / total,
                 measured_s=batched, extrapolated=len(sets) < total,
                 loop_s_extrapolated=loop * total / min(len(sets), s["loop_sets"]))]


def probe_rows(check) -> list[dict]:
    """The streaming response probe's evaluation overhead (ResNet-56), and peak memory against N."""
    s = check.size
    torch.manual_seed(0)
    model = build_model("residual", 56 if not check.dry_run else 8).to(check.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(max(s["probe_images"]), 3, 32, 32, generator=g).to(check.device)
    calibrate_batchnorm(model, images, s["eval_batch"])
    overhead = eval_overhead_rows(model, images, s["eval_batch"], s["probe_repeats"], check.device)
    rows = [measured(f"probe overhead: {r['case']}", r["ratio_vs_no_probe"], "x",
                 ("<=", 1.10) if "streaming response probe (all sites)" in r["case"] else None,
                 median_ms=r["median_ms"], images=r["images"]) for r in overhead]
    for r in memory_rows(model, images, s["probe_images"], s["eval_batch"], check.device):
        rows.append(measured(f"probe memory, {r['images']} images: streaming probe peak", r["streaming_bytes"] / 2**20,
                         "MiB", **{k: v for k, v in r.items() if k != "case"}))
    return rows


def _pack_source(check):
    """The CIFAR-10 pack for the science run (``$RESNET_PROBE_DATA`` or the shared pack), or ``None``."""
    if check.dry_run:
        return make_synthetic(n_train=160, n_test=64, seed=0)
    env = os.environ.get("RESNET_PROBE_DATA")
    path = Path(env) if env and Path(env).is_file() else default_pack_path()
    return None if path is None else resolve_source(f"pack={path}")


def science_rows(check) -> list[dict]:
    """Residual-56 and plain-56 trained one after the other for the steps that fit (fast recipe, bf16,
    eager), then on test images: error, mean branch response std, single-block deletion effect."""
    s = check.size
    source = _pack_source(check)
    if source is None:
        return [{"name": "science run", "status": "skipped", "reason": "the CIFAR-10 pack was not found "
                 "(set RESNET_PROBE_DATA)"}]
    cuda = check.device.type == "cuda"
    steps = s["science_steps"] if check.dry_run else max(100, min(s["science_steps"], int((check.left() - 60) / 2 / 0.03)))
    x = normalize(source.test_images[:s["science_eval"]]).to(check.device)
    y = source.test_labels[:s["science_eval"]].long().to(check.device)
    rows = []
    for family in ("residual", "plain"):
        depth = 56 if not check.dry_run else 8
        dm = CifarDataModule.from_source(source, batch_size=s["science_batch"], val_size=0, drop_last=True,
                                         gpu_resident=cuda, seed=0)
        module = CifarClassifier(family, depth, recipe="fast", max_steps=steps, seed=0, compile=False)
        start = time.perf_counter()
        trainer = fit(module, dm, device=check.device.type, progress=False, limit_val_batches=0)
        seconds = time.perf_counter() - start
        net = module.model.eval()
        with torch.no_grad(), probe(net, sites="*.branch") as session:
            test_error = (net(x).argmax(1) != y).double().mean().item()
        branch_std = session.table().query("metric == 'std'")["value"].mean()
        n = len(anatomy(net).blocks)
        deleted = evaluate_deletion_sets(net, [[i] for i in range(n)], x, y, batch_size=s["eval_batch"])
        increase = (deleted.error.mean(axis=1) - deleted.intact_error.mean()) * 100
        rows.append(measured(f"science: {family}-{depth} after {steps} steps, test error", test_error * 100, "%",
                         train_error=float(trainer.callback_metrics.get("train_error", float("nan"))) * 100,
                         mean_branch_response_std=branch_std, single_block_deletion_pp_mean=float(increase.mean()),
                         single_block_deletion_pp_max=float(increase.max()), train_s=seconds, images=len(x),
                         data=source.name))
    return rows


STAGES = {"train": train_stage, "eval": eval_stage}
