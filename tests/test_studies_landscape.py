"""The landscape and shattered-gradients studies end to end at the tiny scale, on the tiny zoo's nets.

Their tables are checked against independent computations: the surface's centre is the checkpoint's own
loss on images of its own training split; the shattered study's correlations are those of the lines
rebuilt by hand; fresh nets at initialisation are measured beside the trained ones, and more depths at
initialisation only.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import check_report

from resnet_probe.data import normalize, train_val_split
from resnet_probe.shattered import correlation_with_start, input_gradients, random_line
from resnet_probe.studies import landscape, shattered
from resnet_probe.studies.command import main
from resnet_probe.studies.inputs import Zoo
from resnet_probe.studies.train_zoo import ZooSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def nets(tiny_zoo, depth=8):
    return [m for m in tiny_zoo.zoo.models if m.depth == depth and m.family in ("plain", "residual")]


@pytest.fixture(scope="module")
def landscape_run(tiny_zoo, tiny_data, tmp_path_factory):
    return landscape.run(landscape.LandscapeSettings.tiny(), Zoo(nets(tiny_zoo)), tiny_data,
                         out=tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def shattered_run(tiny_zoo, tiny_data, tmp_path_factory):
    return shattered.run(shattered.ShatteredSettings.tiny(), Zoo(nets(tiny_zoo)), tiny_data,
                         out=tmp_path_factory.mktemp("runs"))


def test_the_surface_centre_is_the_checkpoints_loss_on_images_of_its_own_training_split(landscape_run, tiny_data):
    s = landscape.LandscapeSettings.tiny()
    check_report(landscape_run.path, ("surface", "slice", "curvature", "summary", "models"))
    tiny = ZooSettings.tiny()
    source = tiny_data.training_source()
    train_idx = train_val_split(len(source.train_labels), tiny.val_size, 0)[0][:tiny.train_limit]
    own = normalize(source.train_images[train_idx]).flatten(1)
    surface, summary = landscape_run.tables["surface"], landscape_run.tables["summary"]
    for sm in landscape_run.zoo.models:
        x, y, what = landscape.training_images(sm, tiny_data, s.n_examples, sm.seed)
        assert "its own training images" in what and len(y) == s.n_examples
        assert all(bool((own == img).all(dim=1).any()) for img in x.flatten(1))    # each one a training image
        with torch.no_grad():
            loss = float(F.cross_entropy(sm.model(x), y))
        rows = surface[(surface["model"] == sm.name) & (surface["metric"] == "loss")]
        assert len(rows) == s.resolution ** 2
        centre = rows[(rows["alpha"] == 0) & (rows["beta"] == 0)]["value"]
        assert float(centre.iloc[0]) == pytest.approx(loss, rel=1e-5)
        mine = summary[summary["model"] == sm.name].set_index("metric")["value"]
        assert mine["loss_at_origin"] == pytest.approx(loss, rel=1e-5)
        assert 0 <= mine["nonconvex_fraction"] <= 1 and mine["max_loss_on_plane"] >= loss
        line = landscape_run.tables["slice"]
        at_zero = line[(line["model"] == sm.name) & (line["metric"] == "loss") & (line["alpha"] == 0)]["value"]
        assert float(at_zero.iloc[0]) == pytest.approx(loss, rel=1e-5)


def test_the_nonconvex_fraction_is_the_mean_of_the_curvature_maps_flags(landscape_run):
    curv, summary = landscape_run.tables["curvature"], landscape_run.tables["summary"]
    for model, g in curv[curv["metric"] == "nonconvex"].groupby("model"):
        lam = curv[curv["model"] == model].pivot_table(index=["alpha", "beta"], columns="metric", values="value")
        flags = (lam["lambda_min"] < 0) & (lam["lambda_min"].abs() > 0.01 * lam["lambda_max"].abs())
        assert np.array_equal(flags.to_numpy(), lam["nonconvex"].to_numpy() == 1)
        got = summary[(summary["model"] == model) & (summary["metric"] == "nonconvex_fraction")]["value"]
        assert float(got.iloc[0]) == pytest.approx(g["value"].mean())


def test_shattered_correlations_equal_the_lines_rebuilt_by_hand(shattered_run, tiny_data):
    s = shattered.ShatteredSettings.tiny()
    check_report(shattered_run.path, ("correlation", "lengths", "models"))
    corr = shattered_run.tables["correlation"]
    x, y = tiny_data.evaluation(s.n_examples, 0, "shattered")
    for sm in shattered_run.zoo.models:
        line = random_line(x[0], s.radii, torch.Generator().manual_seed(sm.seed))   # the first line of the seed
        expected = correlation_with_start(input_gradients(sm.model.eval(), line, y[0].repeat(len(line))))[1:]
        got = corr[(corr["model"] == sm.name) & (corr["state"] == "trained") & (corr["line"] == "random")
                   & (corr["line_index"] == 0)].sort_values("distance")["value"].to_numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
        fresh = corr[(corr["model"] == sm.name) & (corr["state"] == "initialisation")]
        assert len(fresh) == len(corr[(corr["model"] == sm.name) & (corr["state"] == "trained")])


def test_shattered_adds_more_depths_at_initialisation_only(shattered_run):
    lengths = shattered_run.tables["lengths"]
    states = lengths.groupby("model")["state"].agg(lambda v: tuple(sorted(set(v))))
    assert states["plain-8"] == states["residual-8"] == ("initialisation", "trained")
    assert states["plain-14"] == states["residual-14"] == ("initialisation",)      # init_depths of the tiny preset


def test_landscape_from_the_command_line_reads_enough_synthetic_training_images(tiny_zoo, tmp_path):
    ckpt = tiny_zoo.path / "models" / "residual-8-seed0" / "last.ckpt"
    assert main("landscape", [str(ckpt), "--scale", "tiny", "--data", "synthetic", "--settings.n_examples", "48",
                              "--settings.hessian_iters", "2", "--out", str(tmp_path)]) == 0
    (run_dir,) = (tmp_path / "landscape").iterdir()
    assert "48 training images" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("study, argv, message", [
    ("landscape", ["--settings.resolution", "4"], "resolution must be odd and at least 3"),
    ("landscape", ["--settings.engine", "fast"], "expected one of auto, batched, pointwise, loop; got fast"),
    ("landscape", ["--settings.hessian_examples", "999"], "cannot exceed n_examples"),
    ("shattered", ["--settings.init_depths", "[10]"], "init_depths must be 6n+2"),
    ("shattered", ["--settings.target", "probability"], "expected one of logit, loss; got probability"),
])
def test_bad_settings_exit_2_in_one_line_before_any_run_folder(study, argv, message, tmp_path, capsys):
    assert main(study, [*argv, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
