"""The demo behind ``make demo``: train small plain / highway / residual nets, run every study, one report.

Question: do the three central effects of the papers show up in a few minutes on a CPU?
(1) the degradation problem: a deeper plain net ends with a higher training error than a shallower
one, a deeper residual net does not (He et al. 2016, Fig. 1); (2) residual branches respond less than
the same layers of a plain net (He et al. 2016, Fig. 7); (3) deleting one block of a residual net
hurts far less than deleting one block of a plain net (Veit et al. 2016, Fig. 3).

Steps: ``train_zoo`` (families x depths on the available data: the JPEG pack or CIFAR-10 when found,
synthetic data otherwise, said loudly), then ``degradation``, ``response_std`` and ``gradients`` on
the zoo, then ``lesion``, ``paths`` and ``highway`` on its deepest nets, and a combined report whose
headline table states the three effects with their numbers. Effect (3) is measured here as well: the
per-example top-1 error increase averaged over every single-block deletion of a non-downsampling
block, with a bootstrap 95 % interval over the evaluation images.

Result at quick scale (2 AMD EPYC cores shared with other jobs (load average 4-5), 1 torch thread, JPEG pack,
seed 0; measured 2026-11-23): 7 min 4 s wall in all (training 301 s, lesion 69 s, response_std 9 s, paths 10
s, highway 7 s), peak memory 5 GB; all three effects shown: (1) final training error plain 59.0 -> 65.6 % from
depth 8 to 20 (+6.6 points), residual 57.3 -> 57.2 %; (2) mean branch response std at depth 20: plain 0.973,
residual 0.916 (highway 0.966); (3) mean error increase per non-downsampling block deleted, depth 20: plain
+25.4 points [22.3, 28.5], residual +11.2 [9.4, 13.3] (highway, gate closed: +2.4 [0.9, 4.1]); bootstrap 95 %
intervals over 1,000 test images. Sizes: 4,000 training images, batch 64, 3 epochs, depths 8 and 20 (highway
20 only).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from . import train_zoo
from .options import resolve_data, resolve_device, scale_settings, set_threads, study_parser

QUICK: dict[str, Any] = {**train_zoo.QUICK,
                         "n_examples": 1000,   # test images for response std and the deletion effect
                         "n_resamples": 1000}  # bootstrap resamples of the deletion-effect interval
PAPER: dict[str, Any] = {**train_zoo.PAPER, "n_examples": 10_000, "n_resamples": 1000}
TINY: dict[str, Any] = dict(depths=(8, 14), epochs=1, train_limit=128, val_size=64, test_limit=64, batch_size=64,
                            log_every_n_steps=1, val_every_n_steps=1, grad_every_n_steps=1, n_examples=64,
                            n_resamples=50)
# Overrides that cut each analysis study to seconds with --tiny (names of that study's settings).
TINY_STUDY_ARGS: dict[str, list[str]] = {
    "response_std": ["--n-examples", "64"],
    "lesion": ["--n-examples", "64", "--k-max", "2", "--n-sets", "2", "--k-swaps", "1", "--n-resamples", "20",
               "--set", "reorder_sets=2", "--set", "attribution_examples=8"],
    "paths": ["--n-examples", "8", "--n-samples", "2", "--set", "exact_batch=8", "--set", "sets_per_pass=8",
              "--set", "n_resamples=20"],
    "highway": ["--n-examples", "64", "--set", "stat_batch=32", "--set", "n_resamples=20"],
}
# Analysis studies and the families they analyse; they run on the deepest nets of the zoo (the lesion
# study compares plain with residual; highway gate closing is the highway study's own sweep).
ANALYSIS_STUDIES: dict[str, tuple[str, ...]] = {"lesion": ("plain", "residual"), "paths": ("residual",),
                                                "highway": ("highway",)}
# Quick-scale sizes of the analysis studies that keep the demo within its time budget on a CPU.
QUICK_STUDY_ARGS: dict[str, list[str]] = {
    "lesion": ["--n-examples", "500", "--k-max", "4", "--n-sets", "5", "--k-swaps", "1", "2", "4",
               "--set", "reorder_sets=3", "--set", "attribution_examples=8"],
    "paths": ["--n-examples", "32", "--n-samples", "10"],
    "highway": ["--n-examples", "500"],
}


def deletion_effect(model, images, labels, batch_size: int = 250) -> "np.ndarray":
    """Per-example top-1 error increase (percentage points) averaged over non-downsampling single-block deletions.

    A deleted block outputs its shortcut (``zero_branch``: ``ReLU(S(x))``; highway: gate closed); the
    value for example ``j`` is ``100 * mean_i (error_ij - intact_error_j)`` over the blocks ``i`` whose
    shortcut keeps the shape (Veit et al. 2016 delete only those).

    Returns:
        ``(N,)`` float array.
    """
    import numpy as np
    from ..lesion import evaluate_deletion_sets
    from ..models import anatomy
    keep = [i for i, b in enumerate(anatomy(model).blocks) if not b.downsampling]
    if not keep:
        raise ValueError("the model has no non-downsampling block to delete")
    m = evaluate_deletion_sets(model, [[i] for i in keep], images, labels, batch_size=batch_size)
    return 100.0 * np.mean(m.error - m.intact_error[None], axis=0)


def deletion_table(deepest: "pd.DataFrame", source, settings: dict, seed: int, run_name: str) -> "pd.DataFrame":
    """Effect (3) for the zoo's deepest models (``zoo_checkpoints`` rows): mean error increase per
    deletion, bootstrap CI over images."""
    import numpy as np
    import pandas as pd
    from ..checkpoints import load_model
    from ..data import normalize, random_subset
    from ..lesion import mean_ci
    idx = random_subset(len(source.test_labels), settings["n_examples"], seed, "quickstart-deletion")
    x, y = normalize(source.test_images[idx]), source.test_labels[idx].long()
    rows = []
    for (model_name, family, depth), g in deepest.groupby(["model", "family", "depth"], sort=False):
        per_seed = [deletion_effect(load_model(c)[0], x, y) for c in g["checkpoint"]]
        mean, lo, hi = mean_ci(np.mean(per_seed, axis=0), n_resamples=settings["n_resamples"], seed=seed)
        rows.append({"run": run_name, "seed": -1 if len(g) > 1 else int(g["seed"].iloc[0]), "model": model_name,
                     "family": family, "depth": int(depth), "site": "non-downsampling blocks",
                     "metric": "deletion_error_increase_pp", "value": float(mean[0]), "lo": float(lo[0]),
                     "hi": float(hi[0]), "n_examples": len(y), "n_seeds": len(g)})
    return pd.DataFrame(rows)


def _cell(values, digits: int = 1, unit: str = "") -> str:
    from ..report import format_mean_std
    text = format_mean_std(values, digits=digits, unit=unit)
    return text.replace(" (n=1)", "")


def effects_table(final_error, summary, deletion) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """The headline: one row per effect, one column per family; and a tidy table of the same numbers."""
    import pandas as pd
    families = [f for f in train_zoo.FAMILIES if f in set(final_error["family"])]
    depths = sorted(final_error["depth"].unique())
    shallow, deep = depths[0], depths[-1]
    train = final_error[final_error["split"] == "train"]
    row1 = {"effect": "(1) deeper plain nets train worse (He Fig. 1)",
            "measure": f"final training error, depth {shallow} → {deep} (change in points)"}
    row2 = {"effect": "(2) residual responses are smaller (He Fig. 7)",
            "measure": f"std of the branch output F(x) after its last BN, mean over blocks, depth {deep}"}
    row3 = {"effect": "(3) deleting a residual block hurts far less (Veit Fig. 3)",
            "measure": f"mean error increase over non-downsampling single-block deletions, depth {deep} "
                       "[bootstrap 95 % CI over images]"}
    tidy, numbers = [], {}
    for f in families:
        pair = (train[train["family"] == f].pivot_table(index="seed", columns="depth", values="value")
                .reindex(columns=[shallow, deep]))
        gap = (pair[deep] - pair[shallow]).dropna()
        row1[f] = (f"{_cell(pair[shallow].dropna())} → {_cell(pair[deep].dropna())} % ({_signed(gap)} points)"
                   if len(gap) else f"{_cell(pair[deep].dropna())} % (depth {deep} only)")
        resp = summary[(summary["model"] == f"{f}-{deep}") & (summary["metric"] == "mean_branch_response_std")]["value"]
        row2[f] = _cell(resp, digits=3) if len(resp) else "n/a"
        d = deletion[(deletion["family"] == f) & (deletion["depth"] == deep)]
        row3[f] = (f"{d['value'].iloc[0]:+.1f} pp [{d['lo'].iloc[0]:+.1f}, {d['hi'].iloc[0]:+.1f}]" if len(d) else "n/a")
        numbers[f] = {"gap": float(gap.mean()), "resp": float(resp.mean()) if len(resp) else float("nan"),
                      "del": d[["value", "lo", "hi"]].iloc[0].tolist() if len(d) else [float("nan")] * 3}
        tidy += [{"effect": 1, "model": f"{f}-{deep} vs {f}-{shallow}", "family": f, "metric": "train_error_change_pp",
                  "value": numbers[f]["gap"]},
                 {"effect": 2, "model": f"{f}-{deep}", "family": f, "metric": "mean_branch_response_std",
                  "value": numbers[f]["resp"]},
                 {"effect": 3, "model": f"{f}-{deep}", "family": f, "metric": "deletion_error_increase_pp",
                  "value": numbers[f]["del"][0], "lo": numbers[f]["del"][1], "hi": numbers[f]["del"][2]}]
    p, r = numbers.get("plain"), numbers.get("residual")
    if p and r:
        row1["shown?"] = _verdict(p["gap"] > 0 and r["gap"] < p["gap"])
        row2["shown?"] = _verdict(r["resp"] < p["resp"])
        row3["shown?"] = _verdict(r["del"][2] < p["del"][1])
    return pd.DataFrame([row1, row2, row3]), pd.DataFrame(tidy)


def _signed(values) -> str:
    """``+5.1`` or ``+5.1 ± 0.8 (n=3)``."""
    text = _cell(values)
    return text if text.startswith("-") or text == "n/a" else "+" + text


def _verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def zoo_argv(settings: dict) -> list[str]:
    """``train_zoo`` arguments that make it train with exactly the training settings in ``settings``."""
    return [a for k in train_zoo.QUICK for a in ("--set", f"{k}={settings[k]!r}")]


def main(argv: list[str] | None = None) -> Path:
    """Train the demo zoo, run every study on it, write the combined report; returns its run folder."""
    p = study_parser("quickstart", "Train small plain / highway / residual nets and run every study on them "
                                   "(degradation, response std, gradients, lesion, paths, highway): one report.")
    p.add_argument("--tiny", action="store_true", help="cut every size to seconds (a smoke test, not a result)")
    p.add_argument("--zoo", metavar="RUN_DIR", default=None, help="reuse a train_zoo run instead of training")
    p.add_argument("--studies", nargs="*", default=list(ANALYSIS_STUDIES), metavar="STUDY",
                   help="analysis studies run on the deepest nets of the zoo")
    train_zoo.add_training_options(p)
    p.set_defaults(threads=1)  # see set_threads: one thread is the robust choice on a shared 2-core CPU
    args = p.parse_args(argv)
    set_threads(args.threads)
    quick = {**QUICK, **TINY} if args.tiny else QUICK
    settings = scale_settings(args, quick, PAPER)
    studies = list(args.studies)
    unknown = sorted(set(studies) - set(ANALYSIS_STUDIES))
    if unknown:
        raise SystemExit(f"quickstart: unknown studies {unknown}; valid: {', '.join(ANALYSIS_STUDIES)}")
    start = time.perf_counter()
    import importlib

    from ..report import combine_runs, new_run, open_run
    from . import degradation, gradients, response_std

    common = ["--out", args.out, "--data", args.data, "--scale", args.scale, "--device", args.device,
              "--seeds", *map(str, args.seeds)]
    children, timings, failures = [], {}, []

    def run_study(name: str, fn, extra: list[str]) -> Path | None:
        t = time.perf_counter()
        print(f"quickstart: {name}", flush=True)
        try:
            sizes = TINY_STUDY_ARGS if args.tiny else QUICK_STUDY_ARGS if args.scale == "quick" else {}
            path = fn(extra + common + sizes.get(name, []))
        except Exception as e:  # noqa: BLE001 - one failing study must not hide the others' results
            failures.append(f"{name}: {type(e).__name__}: {e}")
            print(f"quickstart: {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return None
        timings[name] = time.perf_counter() - t
        children.append(path)
        return path

    if args.zoo:
        zoo = Path(args.zoo)
        children.append(zoo)
    else:
        zoo = run_study("train_zoo", train_zoo.main, zoo_argv(settings))
        if zoo is None:
            raise RuntimeError(f"quickstart: training failed: {failures[-1]}")
    deg = run_study("degradation", degradation.main, ["--zoo", str(zoo)])
    resp = run_study("response_std", response_std.main,
                     ["--zoo", str(zoo), "--n-examples", str(settings["n_examples"])])
    run_study("gradients", gradients.main, ["--zoo", str(zoo)])
    models = train_zoo.zoo_checkpoints(zoo)
    deepest = models[models["depth"] == models["depth"].max()]
    for name in studies:
        ckpts = list(deepest[deepest["family"].isin(ANALYSIS_STUDIES[name])]["checkpoint"])
        if not ckpts:
            failures.append(f"{name}: the zoo has no {' or '.join(ANALYSIS_STUDIES[name])} net to analyse")
            continue
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ImportError as e:
            failures.append(f"{name}: cannot import resnet_probe.studies.{name}: {e}")
            continue
        run_study(name, module.main, ckpts)

    source = resolve_data(args.data, 1, settings["n_examples"])
    zoo_run = open_run(zoo)
    config = {**settings, "scale": args.scale, "tiny": args.tiny, "seeds": list(args.seeds), "zoo": str(zoo),
              "studies": studies, "device": resolve_device(args.device).type}
    with new_run("quickstart", out=args.out, config=config, data=zoo_run.provenance.get("data"),
                 source_file=__file__, argv=argv, title="resnet_probe quickstart: why residual nets train") as run:
        deletion = deletion_table(deepest, source, settings, args.seeds[0], run.path.name)
        run.add_table("deletion_effect", deletion)
        if deg is None or resp is None:
            raise RuntimeError(f"quickstart: the headline needs degradation and response_std: {failures}")
        headline, tidy = effects_table(open_run(deg).table("final_error"), open_run(resp).table("summary"), deletion)
        run.add_table("effects", tidy)
        run.add_headline(headline, title="Three effects, measured on this run")
        _texts(run, zoo_run, timings, failures, time.perf_counter() - start)
        run.add_figure("deletion_effect", "bar", "deletion_effect", section="Deletion effect", x="model",
                       lo="lo", hi="hi", query="metric == 'deletion_error_increase_pp'",
                       xlabel="model", ylabel="error increase (percentage points)",
                       title="Mean error increase when one non-downsampling block is deleted",
                       caption="Mean over single-block deletions of the top-1 error increase; error bars: "
                               "bootstrap 95 % interval over evaluation images.")
        combine_runs(run, children)
    print(f"quickstart: finished in {time.perf_counter() - start:.0f} s", flush=True)
    if failures:
        raise RuntimeError("quickstart: some studies failed (the report lists them): " + "; ".join(failures))
    return run.path


def _texts(run, zoo_run, timings: dict, failures: list, seconds: float) -> None:
    data = zoo_run.provenance.get("data") or {}
    if data.get("synthetic") or data.get("kind") == "synthetic":
        run.add_text("Data", "**These nets were trained on SYNTHETIC images, not CIFAR-10** (no CIFAR-10 data was "
                             "found). The three effects are properties of training on natural images at depth; on "
                             "the synthetic set they may not show, and a missing effect here says nothing about "
                             "the papers. Point `--data` at the JPEG pack or a torchvision CIFAR-10 root.")
    run.add_text("How to read the headline", "Each row is one effect; the *shown?* column says whether this run "
                 "reproduces it: (1) the deeper plain net ends with a higher training error while the residual "
                 "net degrades less; (2) the residual net's mean branch response std is below the plain net's; "
                 "(3) the residual net's interval lies entirely below the plain net's. Numbers are mean ± std "
                 "over seeds where there are several.")
    lines = [f"- {k}: {v:.0f} s" for k, v in timings.items()] + [f"- total: {seconds:.0f} s"]
    run.add_text("Timings", "\n".join(lines))
    if failures:
        run.add_text("Studies that failed", "\n".join(f"- {f}" for f in failures))
