"""The analysis studies (lesion, paths, highway) and their ImageNet inputs, end to end at the tiny scale.

Each study runs once per module on the tiny zoo's nets (synthetic data); the tests check its tables
against independent computations (explicit forwards, the gate modules, the binomial distribution,
autograd) and its report.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import check_report
from PIL import Image
from scipy import stats

from resnet_probe.models import anatomy
from resnet_probe.report import open_run
from resnet_probe.studies import highway, lesion, paths
from resnet_probe.studies.inputs import Zoo, load_models

LESION_TINY = lesion.LesionSettings(n_examples=48, batch_size=64, k_max=2, n_sets=2, k_swaps=(1,), reorder_sets=2,
                                    n_resamples=20, attribution_examples=8,
                                    attribution_methods=("gradient_x_activation",), attribution_steps=4)


@pytest.fixture(scope="module")
def lesion_run(tiny_zoo, tiny_data, tmp_path_factory):
    """The lesion study on the tiny zoo's plain-14 and residual-14."""
    models = [m for m in tiny_zoo.zoo.models if m.depth == 14 and m.family in ("plain", "residual")]
    return lesion.run(LESION_TINY, Zoo(models), tiny_data, out=tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def highway_run(tiny_zoo, tiny_data, tmp_path_factory):
    s = highway.HighwaySettings(n_examples=32, stat_batch=16, batch_size=32, n_resamples=20)
    return highway.run(s, Zoo(tiny_zoo.zoo.of(["highway"])), tiny_data, out=tmp_path_factory.mktemp("runs"))


def _model(result, name: str):
    return next(m.model for m in result.zoo.models if m.name == name)


def _errors(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(-1) != y).double().mean().item()


def test_lesion_tables_agree_with_explicit_deletions(lesion_run, tiny_data):
    """Each single-block error equals the error of the net with that block's output replaced by ReLU(S(x))."""
    check_report(lesion_run.path, {"models", "single_block", "k_random", "reorder", "attribution",
                                   "block_importance", "importance_pairs", "deletion_per_image"})
    single = lesion_run.tables["single_block"]
    res = single[single["model"] == "residual-14"]
    err = res[res["metric"] == "error_percent"].set_index("site")["value"]
    inc = res[res["metric"] == "error_increase_pp"].set_index("site")["value"]
    krand = lesion_run.tables["k_random"]
    intact = krand[(krand["model"] == "residual-14") & (krand["k"] == 0) & (krand["metric"] == "error_percent")]
    assert np.allclose(err - inc, intact["value"].iloc[0])          # paired increase over the same images
    x, y = tiny_data.evaluation(48, 0, "lesion")
    model = _model(lesion_run, "residual-14")
    anat = anatomy(model)
    for name in ("stage1.block2", "stage3.block1"):
        h = anat.stem(x)
        with torch.no_grad():
            for b in anat.blocks:
                h = torch.relu(b.shortcut(h)) if b.name == name else b.module(h)
            wrong = 100.0 * (anat.head(h).argmax(-1) != y).double().mean().item()
        assert err[name] == pytest.approx(wrong)
    per_image = lesion_run.tables["deletion_per_image"]
    mean_row = res[res["metric"] == "mean_error_increase_pp"]["value"].iloc[0]
    assert per_image[per_image["model"] == "residual-14"]["value"].mean() == pytest.approx(mean_row)
    identity = res[(res["metric"] == "error_increase_pp") & ~res["downsampling"]]["value"]
    assert identity.mean() == pytest.approx(mean_row)                # the mean over identity-shortcut blocks


def test_a_plain_net_keeps_its_stage_change_blocks_and_random_sets_skip_downsampling(lesion_run):
    """Deleting a plain block at a stage change would insert a shortcut the net never had: not deleted.
    Random k-sets draw from the identity-shortcut blocks only (the default), as Veit et al. deleted."""
    single = lesion_run.tables["single_block"]
    plain = single[(single["model"] == "plain-14") & (single["metric"] == "error_percent")]
    residual = single[(single["model"] == "residual-14") & (single["metric"] == "error_percent")]
    assert not plain["downsampling"].any() and len(plain) == 4      # 6 blocks, 2 at stage changes
    assert residual["downsampling"].sum() == 2 and len(residual) == 6
    krand = lesion_run.tables["k_random"]
    deleted = krand.loc[krand["k"] > 0, "deleted"].str.split("+").explode()
    assert set(deleted) <= {"stage1.block1", "stage1.block2", "stage2.block2", "stage3.block2"}
    assert (krand["drawn_from"] == "non_downsampling").all()


def test_random_sets_can_draw_from_every_block(tiny_zoo, tiny_data, tmp_path):
    from dataclasses import replace
    s = replace(LESION_TINY, k_random_blocks="all", k_max=6, n_sets=3, attribution_methods=())
    model = [m for m in tiny_zoo.zoo.models if m.name == "residual-14"]
    result = lesion.run(s, Zoo(model), tiny_data, out=tmp_path)
    krand = result.tables["k_random"]
    assert krand["k"].max() == 6 and (krand["drawn_from"] == "all").all()


def test_a_plain_net_deeper_than_20_layers_is_labelled_degraded():
    from resnet_probe.studies.lesion_report import role
    assert role("plain", 20) == "plain comparison"
    assert "degraded" in role("plain", 56) and role("residual", 110) == "residual"


def test_paths_study_separates_veits_sampled_total_from_the_exact_net_gradient(tiny_zoo, tiny_data, tmp_path):
    s = paths.PathsSettings(n_examples=8, exact_batch=8, n_samples=3, sets_per_pass=8, n_resamples=20)
    result = paths.run(s, Zoo(tiny_zoo.zoo.of(["residual"])[-1:]), tiny_data, out=tmp_path)
    check_report(result.path, {"distribution", "path_gradients", "path_samples", "effective_paths"})
    dist = result.tables["distribution"]
    n = int(dist["path_length"].max())
    assert n == 6 and np.allclose(dist["value"], stats.binom.pmf(np.arange(n + 1), n, 0.5))
    bands = result.tables["effective_paths"].set_index(["estimator", "metric"])["value"]
    assert bands[("exact", "stack_sum_rel_error")] < 1e-4
    for est in ("exact", "sampled"):
        assert 0 <= bands[(est, "band_lo")] <= bands[(est, "band_hi")] <= n and bands[(est, "band_share")] >= 0.9
    grads = result.tables["path_gradients"]
    sampled = grads[grads["estimator"] == "sampled"].pivot_table(index="path_length", columns="metric",
                                                                 values="value")
    n_paths = np.array([stats.binom.pmf(k, n, 0.5) * 2 ** n for k in sampled.index])
    assert np.allclose(sampled["total_magnitude"], n_paths * sampled["per_path_magnitude"])   # Veit, Fig. 6c
    exact = grads[grads["estimator"] == "exact"]
    assert set(exact["metric"]) == {"net_gradient_norm", "net_share"}
    assert np.isclose(exact.loc[exact["metric"] == "net_share", "value"].sum(), 1.0)
    headline = open_run(result.path).provenance   # the run's report names both quantities apart
    text = (result.path / "report.md").read_text()
    assert "Veit: sampled total magnitude" in text and "net gradient band (exact" in text
    assert headline["command"].startswith("resnet-probe paths --config")


def test_paths_refuses_a_gated_net_before_making_a_run_folder(tiny_zoo, tiny_data, tmp_path):
    with pytest.raises(ValueError, match="highway gates"):
        paths.run(paths.PathsSettings.tiny(), Zoo(tiny_zoo.zoo.of(["highway"])), tiny_data, out=tmp_path)
    assert not (tmp_path / "paths").exists()


def test_highway_gate_statistics_equal_the_gates_own_outputs(highway_run, tiny_data):
    from resnet_probe.lesion import lesion as lesioned
    check_report(highway_run.path, {"models", "gates", "gate_closing"})
    gates, closing = highway_run.tables["gates"], highway_run.tables["gate_closing"]
    x, y = tiny_data.evaluation(32, 0, "highway")
    model = _model(highway_run, "highway-14")
    anat = anatomy(model)
    means = gates[gates["metric"] == "gate_mean"].set_index("site")["value"]
    with torch.no_grad():
        h = anat.stem(x)
        for b in anat.blocks:
            assert means[b.name] == pytest.approx(b.gate(h).double().mean().item(), rel=1e-5)
            h = b.module(h)
    assert ((means > 0) & (means < 1)).all()
    err = closing[closing["metric"] == "error_percent"].set_index("site")["value"]
    with lesioned(model, blocks=["stage2.block1"], mode="shortcut_only"):
        assert err["stage2.block1"] == pytest.approx(_errors(model, x, y))   # a closed gate is a deleted block
    models = highway_run.tables["models"]
    params = models[models["metric"] == "parameters"]["value"].iloc[0]
    assert params == sum(p.numel() for p in model.parameters())
    assert "parameters" in (highway_run.path / "report.md").read_text()


def test_train_zoo_folders_give_the_models_of_the_families_a_study_reads(tiny_zoo):
    zoo = load_models([str(tiny_zoo.path)], ("residual", "preact"))
    assert [m.name for m in zoo.models] == ["residual-8", "residual-14"]
    assert zoo.folders == [tiny_zoo.path] and {"curves", "final", "train_errors"} <= set(zoo.tables)
    assert all(m.source.endswith("last.ckpt") for m in zoo.models)
    everything = load_models([str(tiny_zoo.path)])
    assert [m.family for m in everything.models] == ["plain", "plain", "highway", "residual", "residual"]
    with pytest.raises(ValueError, match="no model of a family"):
        load_models([str(tiny_zoo.path)], ("preact",))


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


def test_missing_weights_error_names_the_exact_path_before_any_run_folder(hub_dir, image_folder, tmp_path, capsys):
    from resnet_probe.studies.command import main
    from resnet_probe.studies.imagenet import WeightsNotFoundError, load_study_model
    expected = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsNotFoundError, match=re.escape(str(expected))):
        load_study_model("torchvision:resnet18", weights="IMAGENET1K_V1", download=False)
    code = main("lesion", ["torchvision:resnet18", "--weights", "IMAGENET1K_V1", "--download", "false", "--data",
                           f"imagefolder={image_folder}", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and str(expected) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
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
    from dataclasses import replace

    from resnet_probe.studies.inputs import load_data
    data = load_data(f"imagefolder={image_folder}", n_test=4)
    s = replace(LESION_TINY, n_examples=4, mode="shortcut_only", attribution_methods=())
    result = lesion.run(s, load_models(["torchvision:resnet18"]), data, out=tmp_path)
    check_report(result.path, {"models", "single_block", "k_random", "reorder"}, synthetic=False)
    run = open_run(result.path)
    assert "attribution" not in run.tables
    assert run.provenance["data"]["kind"] == "imagefolder" and run.provenance["data"]["n_test"] == 4
    single = result.tables["single_block"]
    assert (single["mode"] == "shortcut_only").all() and set(single["model"]) == {"resnet18 (random init)"}
    assert len(single[(single["metric"] == "kl")]) == 8             # resnet18: 8 BasicBlocks
    assert isinstance(single, pd.DataFrame)
