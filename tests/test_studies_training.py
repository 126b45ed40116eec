"""The training studies (train_zoo, degradation, response_std, gradients) and the quickstart, at the tiny scale.

One tiny zoo (synthetic data, plain-8/14, highway-14, residual-8/14, two optimizer steps per net) is
trained once per session (``conftest.tiny_zoo``); every study reads it, in Python, as the quickstart
composes them.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import check_report

from resnet_probe.checkpoints import load_model
from resnet_probe.data import CifarDataModule, normalize, random_subset
from resnet_probe.studies import degradation, gradients, quickstart, response_std, train_zoo
from resnet_probe.studies.inputs import load_models
from resnet_probe.studies.train_zoo import ZooSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return load_models([str(tiny_zoo.path)])


def test_zoo_checkpoint_reproduces_its_recorded_test_error(tiny_zoo, tiny_data):
    check_report(tiny_zoo.path, {"curves", "final", "gradients", "train_errors"})
    final = tiny_zoo.tables["final"]
    row = final[(final["model"] == "residual-14") & (final["metric"] == "test_error_percent")].iloc[0]
    model, _ = load_model(tiny_zoo.path / row["checkpoint"])
    s = ZooSettings.tiny()
    dm = CifarDataModule.from_source(tiny_data.source, batch_size=64, val_size=s.val_size, split_seed=0,
                                     train_limit=s.train_limit, test_limit=s.test_limit)
    x, y = dm.splits()["test"]
    with torch.no_grad():
        wrong = (model(normalize(x)).argmax(-1) != y).double().mean().item()
    assert row["value"] == pytest.approx(100 * wrong, abs=1e-4)
    params = final[(final["model"] == "highway-14") & (final["metric"] == "parameters")]["value"].iloc[0]
    plain = final[(final["model"] == "plain-14") & (final["metric"] == "parameters")]["value"].iloc[0]
    assert params > 1.3 * plain                                     # the gate convs: a third conv per block


def test_zoo_records_the_training_error_of_fixed_training_images_in_eval_mode(tiny_zoo, tiny_data):
    """``train_errors``: per image 1 where the trained net (eval mode) is wrong, on the same images for every
    net of a seed; its mean is the ``train_eval_error_percent`` of ``final``."""
    per_image = tiny_zoo.tables["train_errors"]
    s = ZooSettings.tiny()
    images, labels = CifarDataModule.from_source(tiny_data.source, batch_size=64, val_size=s.val_size, split_seed=0,
                                                 train_limit=s.train_limit).splits()["train"]
    idx = random_subset(len(labels), s.train_eval_examples, 0, "train_eval")
    sm = next(m for m in tiny_zoo.zoo.models if m.name == "plain-8")
    with torch.no_grad():
        wrong = (sm.model(normalize(images[idx])).argmax(-1) != labels[idx]).numpy().astype(float)
    mine = per_image[per_image["model"] == "plain-8"].sort_values("image")["value"].to_numpy()
    assert np.array_equal(mine, wrong)
    final = tiny_zoo.tables["final"]
    recorded = final[(final["model"] == "plain-8") & (final["metric"] == "train_eval_error_percent")]["value"]
    assert recorded.iloc[0] == pytest.approx(100 * wrong.mean())


def test_zoo_records_curves_and_gradients_of_every_block(tiny_zoo):
    curves, grads = tiny_zoo.tables["curves"], tiny_zoo.tables["gradients"]
    assert set(curves["split"]) == {"train", "val"} and set(curves["model"]) == {
        "plain-8", "plain-14", "highway-14", "residual-8", "residual-14"}
    blocks = grads[grads["model"] == "residual-14"].groupby("metric")["block"].nunique()
    assert (blocks >= 2).all()


def test_several_seeds_train_side_by_side_and_export_ordinary_checkpoints(tiny_data, tmp_path):
    s = ZooSettings.tiny().only(("residual",), (8,))
    from dataclasses import replace
    result = train_zoo.run(replace(s, seeds_side_by_side="yes"), tiny_data, out=tmp_path, seeds=(0, 1))
    final = result.tables["final"]
    assert sorted(final["seed"].unique()) == [0, 1]
    for sm in result.zoo.models:
        model, info = load_model(sm.source)
        assert info["kind"] == "project" and int(info["hparams"]["seed"]) == sm.seed
    weights = [next(sm.model.parameters()) for sm in result.zoo.models]
    assert not torch.equal(weights[0], weights[1])


def test_seeds_train_side_by_side_on_cuda_unless_told_otherwise():
    s = ZooSettings.tiny()
    assert s.side_by_side([0, 1], "cuda") and not s.side_by_side([0, 1], "cpu") and not s.side_by_side([0], "cuda")
    from dataclasses import replace
    assert replace(s, seeds_side_by_side="yes").side_by_side([0, 1], "cpu")
    assert not replace(s, seeds_side_by_side="no").side_by_side([0, 1], "cuda")


def test_degradation_depth_gap_is_the_paired_mean_over_the_same_training_images(zoo, tiny_data, tmp_path):
    result = degradation.run(degradation.DegradationSettings.tiny(), zoo, None, out=tmp_path)
    check_report(result.path, {"curves", "final_error", "degradation"})
    gap = result.tables["degradation"].set_index("family")
    errors = zoo.tables["train_errors"]
    for family in ("plain", "residual"):
        deep = errors[(errors["family"] == family) & (errors["depth"] == 14)].sort_values("image")["value"]
        shallow = errors[(errors["family"] == family) & (errors["depth"] == 8)].sort_values("image")["value"]
        assert gap.loc[family, "value"] == pytest.approx(100 * (deep.to_numpy() - shallow.to_numpy()).mean())
        assert gap.loc[family, "lo"] <= gap.loc[family, "value"] <= gap.loc[family, "hi"]
    assert "highway" not in gap.index                               # one depth: no gap


def test_response_std_equals_the_std_of_the_layer_output(zoo, tiny_data, tmp_path):
    s = response_std.ResponseSettings(n_examples=32, batch_size=16, group_size=8, n_resamples=50)
    result = response_std.run(s, zoo, tiny_data, out=tmp_path)
    check_report(result.path, {"responses", "groups", "summary", "models"})
    table = result.tables["responses"]
    x, _ = tiny_data.evaluation(32, 0, "response_std")
    sm = next(m for m in zoo.models if m.name == "residual-14")
    block = sm.model.stages[1][1]
    captured = []
    handle = block.branch.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            sm.model(x)
    finally:
        handle.remove()
    row = table[(table["model"] == "residual-14") & (table["site"] == "stage2.block2.branch")
                & (table["metric"] == "response_std")]
    assert row["value"].iloc[0] == pytest.approx(captured[0].double().std().item(), rel=1e-5)
    summary = result.tables["summary"]
    mean = summary[(summary["model"] == "residual-14") & (summary["metric"] == "mean_branch_response_std")].iloc[0]
    branch = table[(table["model"] == "residual-14") & (table["kind"] == "branch") & (table["metric"] == "response_std")]
    assert mean["value"] == pytest.approx(branch["value"].mean())
    assert mean["lo"] <= mean["value"] <= mean["hi"] and mean["lo"] < mean["hi"]


def test_response_groups_pool_back_to_the_whole_set(zoo, tiny_data, tmp_path):
    """The bootstrap's groups hold exact sums: pooling all of them gives each site's std over all images."""
    s = response_std.ResponseSettings(n_examples=32, batch_size=16, group_size=8, n_resamples=10)
    result = response_std.run(s, zoo.models[:1], tiny_data, out=tmp_path)
    groups, table = result.tables["groups"], result.tables["responses"]
    for site, g in groups[groups["kind"] == "branch"].groupby("site"):
        total = g.groupby("metric")["value"].sum()
        pooled = response_std.pooled_std(total["count"], total["sum"], total["sumsq"])
        direct = table[(table["site"] == site) & (table["metric"] == "response_std")]["value"].iloc[0]
        assert pooled == pytest.approx(direct, rel=1e-6)


def test_gradients_are_normalised_by_size_and_by_weight_norm():
    """RMS per parameter = ||g|| / sqrt(#θ); relative gradient = ||g|| / ||θ||; RMS per element = ||dL/dx|| / sqrt(#x)."""
    keys = {"run": "r", "seed": 0, "model": "m", "family": "plain", "depth": 8, "stage": 1, "block": 1,
            "downsampling": False, "step": 3}
    raw = pd.DataFrame([{**keys, "metric": k, "value": v} for k, v in (
        ("param_grad_norm", 6.0), ("param_count", 9.0), ("param_norm", 12.0), ("activation_grad_norm", 2.0),
        ("activation_count", 16.0))])
    out = gradients.normalised(raw).set_index("metric")["value"]
    assert out["param_grad_rms"] == pytest.approx(2.0)
    assert out["relative_param_grad"] == pytest.approx(0.5)
    assert out["activation_grad_rms"] == pytest.approx(0.5)


def test_gradients_study_reports_first_over_last_of_the_normalised_values(zoo, tmp_path):
    result = gradients.run(gradients.GradientSettings.tiny(), zoo, None, out=tmp_path)
    check_report(result.path, {"gradients", "by_block", "first_over_last"})
    per_block, fl = result.tables["by_block"], result.tables["first_over_last"]
    g = per_block[(per_block["model"] == "residual-14") & (per_block["metric"] == "relative_param_grad")]
    g = g.sort_values("block_index")
    ratio = fl[(fl["model"] == "residual-14") & (fl["metric"] == "relative_param_grad_first_over_last")]
    assert ratio["value"].iloc[0] == pytest.approx(g["value"].iloc[0] / g["value"].iloc[-1])


def test_quickstart_states_three_effects_with_intervals_and_verdicts(zoo, tiny_data, tmp_path):
    result = quickstart.run(quickstart.QuickstartSettings.tiny(), zoo, tiny_data, out=tmp_path)
    check_report(result.path, {"effects"})
    state = json.loads((result.path / "report.json").read_text())
    scale, effects = state["headlines"][0], state["headlines"][1]
    assert "optimizer steps" in scale["markdown"] and "test error" in scale["markdown"]
    assert [r[0][:3] for r in effects["rows"]] == ["(1)", "(2)", "(3)"]
    verdicts = [r[effects["columns"].index("verdict")] for r in effects["rows"]]
    assert set(verdicts) <= {"consistent with the paper", "opposite to the paper", "not resolved at this scale"}
    children = {json.loads((result.path / c["path"] / "report.json").read_text())["study"] for c in state["children"]}
    assert children == {"train_zoo", "degradation", "response_std", "gradients", "lesion", "paths", "highway",
                        "similarity"}
    table = result.tables["effects"]
    assert (table["lo"] <= table["value"]).all() and (table["value"] <= table["hi"]).all()


def test_a_verdict_needs_the_whole_interval_on_the_papers_side():
    from resnet_probe.studies.effects import Effect
    assert Effect(2.0, 0.5, 3.0, "").verdict == "consistent with the paper"
    assert Effect(2.0, -0.5, 3.0, "").verdict == "not resolved at this scale"
    assert Effect(-2.0, -3.0, -0.5, "").verdict == "opposite to the paper"


def test_paper_presets_are_the_papers_recipe():
    s = ZooSettings.paper()
    assert (s.recipe, s.lr, s.batch_size, s.max_steps, s.val_size, s.augment, s.train_limit) == (
        "paper", 0.1, 128, 64_000, 5000, True, None)
    assert all(s.depths[f] == (20, 32, 44, 56, 110) for f in s.families)
    from resnet_probe.studies import lesion, paths
    les = lesion.LesionSettings.paper()
    assert (les.k_max, les.n_sets, les.n_examples, les.evaluation) == (20, 100, 10_000, "auto")
    assert paths.PathsSettings.paper().n_samples == 1000             # Veit et al.: 1,000 paths per length
    nets = lesion.trained_nets("paper")
    assert nets.depths == {"plain": (20,), "residual": (110,)}      # the comparison plain net is one that trains
    assert paths.trained_nets("paper").depths == {"residual": (110,)}


def test_settings_refuse_bad_values_naming_the_valid_ones():
    with pytest.raises(ValueError, match="6n\\+2"):
        ZooSettings(depths={"plain": (21,)}, families=("plain",))
    with pytest.raises(ValueError, match="valid: plain, highway, residual, preact"):
        ZooSettings(families=("vgg",))
    with pytest.raises(ValueError, match="exactly one of epochs and max_steps"):
        ZooSettings(epochs=3, max_steps=100)
