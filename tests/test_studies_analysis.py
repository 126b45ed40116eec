"""The analysis studies (lesion, paths, highway) and their ImageNet inputs, end to end at a tiny size.

Each study runs once per module on synthetic data with nets trained for a few steps; the tests read
its run folder and check the tables against independent computations (the lesion context manager,
the gate modules, the binomial distribution, autograd), the figures and the report.
"""
from __future__ import annotations

import base64
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

from resnet_probe.report import open_run

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TINY = ["--data", "synthetic", "--epochs", "1", "--train-limit", "128", "--set", "val_size=64"]
LESION_TINY = ["--k-max", "2", "--n-sets", "2", "--k-swaps", "1", "--n-resamples", "20", "--set", "reorder_sets=2",
               "--set", "attribution_examples=8", "--set", "attribution_methods=('gradient_x_activation',)"]


def _eval_data(study: str, argv: list[str]):
    """The evaluation images a study used, rebuilt from its arguments."""
    import importlib
    from resnet_probe.studies.analysis_inputs import evaluation_data
    from resnet_probe.studies.options import scale_settings
    mod = importlib.import_module(f"resnet_probe.studies.{study}")
    args = mod.build_parser().parse_args(argv)
    return evaluation_data(args, scale_settings(args, mod.QUICK, mod.PAPER))


def _trained_model(run, name: str):
    from resnet_probe.checkpoints import load_model
    models = run.table("models")
    ckpt = models.loc[models["model"] == name, "checkpoint"].iloc[0]
    return load_model(run.path / ckpt)[0]


def check_report(run_dir: Path, expected_tables: set[str]) -> None:
    """Complete run, the tables, a valid non-empty PNG per figure, each embedded in report.html."""
    run = open_run(run_dir)
    assert run.state == "complete"
    assert expected_tables <= set(run.tables), set(run.tables)
    html = (run_dir / "report.html").read_text()
    assert run.figures
    for fig in run.figures:
        png = run_dir / "figures" / f"{fig['name']}.png"
        with Image.open(png) as im:
            im.verify()
            assert im.size[0] > 100 and im.size[1] > 100
        embedded = re.search(rf'<figure id="fig-{re.escape(fig["name"])}"><img src="data:image/png;base64,([^"]+)"',
                             html)
        assert embedded, fig["name"]
        assert base64.b64decode(embedded[1]) == png.read_bytes()
    for name in run.tables:
        assert len(run.table(name)) > 0
        assert {"run", "seed", "model", "site", "metric", "value"} <= set(run.table(name).columns)


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = [*TRAIN_TINY, "--families", "residual", "--depth", "14", "--n-examples", "48", *LESION_TINY,
            "--out", str(out)]
    from resnet_probe.studies.lesion import main
    return main(argv), argv


@pytest.fixture(scope="module")
def highway_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = [*TRAIN_TINY, "--depth", "8", "--n-examples", "32", "--set", "stat_batch=16", "--set", "n_resamples=20",
            "--out", str(out)]
    from resnet_probe.studies.highway import main
    return main(argv), argv


@pytest.mark.parametrize("script", ["lesion", "paths", "highway"])
def test_every_script_answers_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"studies/{script}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "studies" / f"{script}.py"), run_name="__main__")
    assert exit_.value.code == 0
    assert "--scale" in capsys.readouterr().out


def test_paper_scale_is_the_papers_setting_and_explicit_options_win():
    from resnet_probe.studies import highway, lesion, paths
    from resnet_probe.studies.options import scale_settings

    def settings(mod, argv):
        args = mod.build_parser().parse_args(argv)
        return scale_settings(args, mod.QUICK, mod.PAPER)

    s = settings(lesion, ["--scale", "paper"])
    assert (s["depth"], s["k_max"], s["n_sets"], s["n_examples"], s["recipe"]) == (110, 20, 100, 10_000, "paper")
    assert set(s["attribution_methods"]) == {"gradient_x_activation", "integrated_gradients", "conductance"}
    assert settings(lesion, ["--scale", "paper", "--k-max", "5", "--mode", "shortcut_only"])["k_max"] == 5
    assert (s["evaluation"], settings(lesion, [])["evaluation"]) == ("compiled", "eager")
    p = settings(paths, ["--scale", "paper"])
    assert (p["depth"], p["n_samples"]) == (110, 1000)          # Veit et al.: ResNet-110, 1,000 paths per length
    assert settings(paths, ["--scale", "paper", "--set", "n_samples=3"])["n_samples"] == 3
    assert settings(highway, ["--scale", "paper"])["families"] == ("highway",)


def test_lesion_tables_agree_with_the_lesion_context_manager(lesion_run):
    from resnet_probe.lesion import lesion
    run_dir, argv = lesion_run
    check_report(run_dir, {"models", "single_block", "k_random", "reorder", "attribution", "block_importance",
                           "importance_pairs"})
    run = open_run(run_dir)
    single, krand = run.table("single_block"), run.table("k_random")
    err = single[single["metric"] == "error_percent"].set_index("site")["value"]
    inc = single[single["metric"] == "error_increase_pp"].set_index("site")["value"]
    intact = krand[(krand["k"] == 0) & (krand["metric"] == "error_percent")]["value"]
    assert np.allclose(intact, intact.iloc[0])
    assert np.allclose(err - inc, intact.iloc[0])                 # paired increase over the same images
    assert single.loc[single["site"] == "stage2.block1", "downsampling"].all()
    data = _eval_data("lesion", argv)
    model = _trained_model(run, "residual-14")
    for block in ("stage1.block2", "stage3.block1"):
        with torch.no_grad(), lesion(model, blocks=[block]):
            wrong = (model(data.images).argmax(-1) != data.labels).double().mean().item()
        assert err[block] == pytest.approx(100 * wrong)
    attr = run.table("attribution")
    assert set(attr["site"]) == set(err.index) and (attr["value"] >= 0).all()


@pytest.mark.compiled
def test_lesion_sweeps_on_the_compiled_network_give_the_eager_tables(lesion_run, tmp_path):
    """``--evaluation compiled`` (BN folded, blocks compiled) on the same checkpoint: same errors, losses to 1e-4."""
    from resnet_probe.studies.lesion import main
    run_dir, argv = lesion_run
    run = open_run(run_dir)
    ckpt = str(run.path / run.table("models")["checkpoint"].iloc[0])
    fast = open_run(main([ckpt, "--data", "synthetic", "--n-examples", "48", *LESION_TINY, "--set",
                          "attribution_methods=()", "--evaluation", "compiled", "--out", str(tmp_path)]))
    assert fast.provenance["config"]["evaluation"] == "compiled"
    for name in ("single_block", "k_random", "reorder"):
        keys = [c for c in ("site", "k", "set", "k_swaps", "metric") if c in run.table(name).columns]
        eager = run.table(name).set_index(keys)["value"].sort_index()
        compiled = fast.table(name).set_index(keys)["value"].sort_index()
        assert compiled.index.equals(eager.index)
        is_error = eager.index.get_level_values("metric").str.startswith("error")
        assert np.array_equal(compiled[is_error], eager[is_error]), name
        assert np.allclose(compiled[~is_error], eager[~is_error], rtol=1e-4, atol=1e-6), name


def test_paths_stack_sums_to_autograd_and_lengths_are_binomial(lesion_run, tmp_path):
    from resnet_probe.studies.paths import main
    ckpt = open_run(lesion_run[0]).path / open_run(lesion_run[0]).table("models")["checkpoint"].iloc[0]
    run_dir = main([str(ckpt), "--data", "synthetic", "--n-examples", "8", "--n-samples", "3", "--out", str(tmp_path)])
    check_report(run_dir, {"distribution", "path_gradients", "path_samples", "effective_paths"})
    run = open_run(run_dir)
    dist = run.table("distribution")
    n = int(dist["path_length"].max())
    assert n == 6
    assert np.allclose(dist["value"], stats.binom.pmf(np.arange(n + 1), n, 0.5))
    bands = run.table("effective_paths").set_index(["estimator", "metric"])["value"]
    assert bands[("exact", "stack_sum_rel_error")] < 1e-4
    for est in ("exact", "sampled"):
        assert 0 <= bands[(est, "band_lo")] <= bands[(est, "band_hi")] <= n and bands[(est, "band_share")] >= 0.9
    grads = run.table("path_gradients")
    share = grads[grads["metric"] == "share"].groupby("estimator")["value"].sum()
    assert np.allclose(share, 1.0)
    exact = grads[(grads["estimator"] == "exact")].pivot_table(index="path_length", columns="metric", values="value")
    assert np.allclose(exact["per_path_magnitude"] * exact.index.map(lambda k: stats.binom.pmf(k, n, 0.5) * 2 ** n),
                       exact["gradient_norm"])


def test_paths_refuses_a_gated_net(highway_run, tmp_path):
    from resnet_probe.studies.paths import main
    run = open_run(highway_run[0])
    ckpt = run.path / run.table("models")["checkpoint"].iloc[0]
    with pytest.raises(ValueError, match="highway gates"):
        main([str(ckpt), "--data", "synthetic", "--n-examples", "4", "--out", str(tmp_path)])


def test_highway_gate_statistics_equal_the_gates_own_outputs(highway_run):
    from resnet_probe.lesion import lesion
    from resnet_probe.models import anatomy
    run_dir, argv = highway_run
    check_report(run_dir, {"models", "gates", "gate_closing"})
    run = open_run(run_dir)
    gates, closing = run.table("gates"), run.table("gate_closing")
    data = _eval_data("highway", argv)
    model = _trained_model(run, "highway-8")
    anat = anatomy(model)
    means = gates[gates["metric"] == "gate_mean"].set_index("site")["value"]
    with torch.no_grad():
        h = anat.stem(data.images)
        for b in anat.blocks:
            assert means[b.name] == pytest.approx(b.gate(h).double().mean().item(), rel=1e-5)
            h = b.module(h)
    assert ((means > 0) & (means < 1)).all()
    err = closing[closing["metric"] == "error_percent"].set_index("site")["value"]
    with torch.no_grad(), lesion(model, blocks=["stage2.block1"], mode="shortcut_only"):
        wrong = (model(data.images).argmax(-1) != data.labels).double().mean().item()
    assert err["stage2.block1"] == pytest.approx(100 * wrong)     # a closed gate is a deleted block


def test_train_zoo_folders_give_the_models_of_the_families_a_study_reads(lesion_run, highway_run, tmp_path):
    from resnet_probe.report import new_run
    from resnet_probe.studies.analysis_inputs import expand_checkpoints
    rows = []
    for run_dir, family, depth, seed in ((lesion_run[0], "residual", 14, 3), (highway_run[0], "highway", 8, 5)):
        run = open_run(run_dir)
        ckpt = run.path / run.table("models")["checkpoint"].iloc[0]
        rows.append({"model": f"{family}-{depth}", "family": family, "depth": depth, "seed": seed,
                     "metric": "test_error_percent", "value": 50.0, "checkpoint": str(ckpt)})
    with new_run("train_zoo", out=tmp_path) as zoo:
        zoo.add_table("final", pd.DataFrame(rows))
    picked = expand_checkpoints([str(zoo.path)], ("residual", "preact"))
    assert len(picked) == 1 and picked[0][1] == 3 and picked[0][0].endswith("last.ckpt")
    assert {seed for _, seed in expand_checkpoints([str(zoo.path)], ("plain", "highway", "residual"))} == {3, 5}
    with pytest.raises(ValueError, match="no model of a family"):
        expand_checkpoints([str(zoo.path)], ("plain",))


# ---- ImageNet inputs -------------------------------------------------------------------------------

@pytest.fixture
def image_folder(tmp_path):
    """Three class folders of random JPEG / PNG images of several sizes, plus one all-white PNG."""
    rng = np.random.default_rng(0)
    root = tmp_path / "val"
    for c, cls in enumerate(("n01", "n02", "n03")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            size = (int(rng.integers(230, 300)), int(rng.integers(230, 300)))
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            ext = "JPEG" if (c + i) % 2 else "png"
            Image.fromarray(pixels).save(root / cls / f"img{i}.{ext}")
    Image.fromarray(np.full((240, 260, 3), 255, np.uint8)).save(root / "n03" / "white.png")
    return root


def test_imagefolder_gives_normalised_center_crops_labelled_by_sorted_folder(image_folder):
    from resnet_probe.studies.imagenet import IMAGENET_MEAN, IMAGENET_STD, load_imagefolder
    d = load_imagefolder(image_folder)
    assert d.images.shape == (7, 3, 224, 224) and d.classes == ("n01", "n02", "n03")
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    white = d.images[d.files.index(str(Path("n03") / "white.png"))]
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(white, expected[:, None, None].expand_as(white), atol=1e-6)
    sub = load_imagefolder(image_folder, limit=4, seed=3)
    assert len(sub.labels) == 4 and len(set(sub.files)) == 4 and sub.n_total == 7
    assert load_imagefolder(image_folder, limit=4, seed=3).files == sub.files
    with pytest.raises(FileNotFoundError, match="class-per-folder"):
        load_imagefolder(image_folder / "n01")


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_missing_weights_error_names_the_exact_path(hub_dir, image_folder, tmp_path):
    from resnet_probe.studies.imagenet import WeightsNotFoundError, load_study_model
    from resnet_probe.studies.lesion import main
    expected = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsNotFoundError, match=re.escape(str(expected))):
        load_study_model("torchvision:resnet18", weights="IMAGENET1K_V1", download=False)
    with pytest.raises(WeightsNotFoundError, match=re.escape(str(expected))):
        main(["torchvision:resnet18", "--weights", "IMAGENET1K_V1", "--no-download", "--data",
              f"imagefolder={image_folder}", "--out", str(tmp_path / "runs")])
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        load_study_model("torchvision:resnet18", weights="IMAGENET9K", download=False)


def test_cached_weights_are_loaded_from_the_hub_cache(hub_dir):
    import torchvision
    from resnet_probe.studies.imagenet import load_study_model
    reference = torchvision.models.resnet18(weights=None)
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), hub_dir / "checkpoints" / "resnet18-f37072fd.pth")
    model, info = load_study_model("torchvision:resnet18", weights="ResNet18_Weights.IMAGENET1K_V1", download=False)
    assert info["kind"] == "torchvision-weights"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference.eval()(x))
    with pytest.raises(ValueError, match="not for resnet18"):
        load_study_model("torchvision:resnet18", weights="ResNet50_Weights.IMAGENET1K_V2", download=False)


def test_lesion_of_a_random_torchvision_resnet_on_an_image_folder(image_folder, tmp_path):
    from resnet_probe.studies.lesion import main
    run_dir = main(["torchvision:resnet18", "--data", f"imagefolder={image_folder}", "--limit", "4",
                    "--mode", "shortcut_only", *LESION_TINY, "--set", "attribution_methods=()",
                    "--out", str(tmp_path)])
    check_report(run_dir, {"models", "single_block", "k_random", "reorder"})
    run = open_run(run_dir)
    assert "attribution" not in run.tables
    assert run.provenance["data"]["kind"] == "imagefolder" and run.provenance["data"]["n_test"] == 4
    single = run.table("single_block")
    assert (single["mode"] == "shortcut_only").all() and set(single["model"]) == {"resnet18 (random init)"}
    assert len(single[single["metric"] == "kl"]) == 8             # resnet18: 8 BasicBlocks
