"""Seeds side by side: S CIFAR nets trained as one grouped network train exactly as S lone nets."""
import copy

import numpy as np
import pytest
import torch

from resnet_probe.models import anatomy, build_model
from resnet_probe.models.grouped import GroupedCifarNet, grouped_cross_entropy
from resnet_probe.probes import probe

SEEDS = [3, 11, 7]
TOL = dict(rtol=1e-5, atol=1e-6)
TOL64 = dict(rtol=1e-10, atol=1e-12)  # float64 computations that agree up to float64 rounding


def lone_models(seeds, **config):
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(build_model(**config))
    return out


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def batches(steps, s, n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, n, 3, size, size, generator=g), torch.randint(0, 10, (s, n), generator=g))
            for _ in range(steps)]


def test_grouped_model_s_is_the_lone_model_built_from_seed_s():
    config = dict(family="highway", depth=8, option="B")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    grouped = GroupedCifarNet(**config, seeds=SEEDS)
    assert torch.equal(torch.get_rng_state(), before), "building the grouped net must not reseed the caller"
    for model, lone in zip(grouped.export(), lone_models(SEEDS, **config)):
        assert list(model.state_dict()) == list(lone.state_dict())
        for key, value in lone.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("family,depth,option", [("residual", 8, "A"), ("plain", 14, "A"), ("highway", 8, "B")])
def test_grouped_sgd_steps_equal_independent_steps(family, depth, option, mode):
    """The forward pass agrees in float32; the SGD steps are compared in float64. In float32 the two
    networks add their convolutions' products in different orders, and a plain net's gradient at its
    stem, a sum with heavy cancellation through 14 layers of batch statistics of 6 images, amplifies
    that rounding: under ATEN_CPU_CAPABILITY=default the stems of plain-14 end 6e-4 apart after one
    step and 8e-3 after two, where float64 agrees to 1e-16."""
    config = dict(family=family, depth=depth, option=option)
    lone = lone_models(SEEDS, **config)
    grouped = GroupedCifarNet(**config, seeds=SEEDS)
    for m in [grouped, *lone]:
        m.train(mode == "train")
    steps = batches(2, len(SEEDS))
    x, y = steps[0]
    with torch.no_grad():  # copies: a forward pass in train mode moves the BN running statistics
        logits = copy.deepcopy(grouped)(x)
        lone_logits = [copy.deepcopy(m)(x[s]) for s, m in enumerate(lone)]
    torch.testing.assert_close(logits, torch.stack(lone_logits), **TOL)
    torch.testing.assert_close(grouped_cross_entropy(logits, y), torch.stack(
        [torch.nn.functional.cross_entropy(z, y[s]) for s, z in enumerate(lone_logits)]), **TOL)

    for m in [grouped, *lone]:
        m.double()
    opt_grouped, opts = sgd(grouped.parameters()), [sgd(m.parameters()) for m in lone]
    for x, y in steps:
        x = x.double()
        losses = grouped_cross_entropy(grouped(x), y)
        lone_losses = [torch.nn.functional.cross_entropy(m(x[s]), y[s]) for s, m in enumerate(lone)]
        torch.testing.assert_close(losses, torch.stack(lone_losses), **TOL64)
        opt_grouped.zero_grad()
        losses.sum().backward()
        opt_grouped.step()
        for opt, loss in zip(opts, lone_losses):
            opt.zero_grad()
            loss.backward()
            opt.step()

    for exported, ref in zip(grouped.export(), lone):
        got, want = exported.state_dict(), ref.state_dict()
        assert list(got) == list(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TOL64, msg=lambda m: f"{key}: {m}")


def test_exported_models_load_as_ordinary_cifarnets_and_give_the_grouped_logits():
    config = dict(family="preact", depth=8, option="C")
    grouped = GroupedCifarNet(**config, seeds=SEEDS).train()
    x, _ = batches(1, len(SEEDS))[0]
    grouped(x)  # move the BatchNorm running statistics away from their initial values
    grouped.eval()
    with torch.no_grad():
        logits = grouped(x)
        for s, exported in enumerate(grouped.export()):
            fresh = build_model(**config).eval()
            fresh.load_state_dict(exported.state_dict())
            assert torch.equal(fresh(x[s]), exported(x[s]))
            torch.testing.assert_close(fresh(x[s]), logits[s], **TOL)
            assert len(anatomy(fresh)) == 3


def test_from_models_and_export_round_trip_exactly():
    models = lone_models(SEEDS, family="residual", depth=8, option="B", width=2)
    for m in models:  # distinct BatchNorm statistics per model
        m.train()(torch.randn(4, 3, 8, 8))
    back = GroupedCifarNet.from_models(models).export()
    for a, b in zip(back, models):
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_a_shared_batch_feeds_every_model_the_same_images():
    grouped = GroupedCifarNet("residual", 8, seeds=SEEDS).eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        shared = grouped(x)
        stacked = grouped(x.expand(len(SEEDS), *x.shape))
    assert shared.shape == (len(SEEDS), 5, 10)
    torch.testing.assert_close(shared, stacked, rtol=0, atol=0)
    torch.testing.assert_close(grouped_cross_entropy(shared, torch.zeros(5, dtype=torch.long)),
                               grouped_cross_entropy(shared, torch.zeros(3, 5, dtype=torch.long)))


def test_channels_last_layout_gives_the_same_logits_and_option_a_padding_keeps_it():
    grouped = GroupedCifarNet("residual", 8, option="A", seeds=SEEDS).eval()
    x = torch.randn(len(SEEDS), 4, 3, 16, 16)
    pad = grouped.stage2[0].shortcut
    h = torch.randn(4, 16 * len(SEEDS), 8, 8)
    h_last = h.contiguous(memory_format=torch.channels_last)
    assert pad(h_last).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pad(h_last), pad(h), rtol=0, atol=0)
    with torch.no_grad():
        ref = grouped(x)
        grouped.to(memory_format=torch.channels_last)
        got = grouped.forward_grouped(grouped.stack_inputs(x).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_gradients_equal_lone_gradients_on_cuda_in_channels_last():
    config = dict(family="highway", depth=8, option="A")
    lone = [m.cuda() for m in lone_models(SEEDS, **config)]
    grouped = GroupedCifarNet(**config, seeds=SEEDS).cuda().to(memory_format=torch.channels_last)
    (x, y), = batches(1, len(SEEDS), size=32)
    x, y = x.cuda(), y.cuda()
    grouped_cross_entropy(grouped.forward_grouped(
        grouped.stack_inputs(x).contiguous(memory_format=torch.channels_last)), y).sum().backward()
    for s, m in enumerate(lone):
        torch.nn.functional.cross_entropy(m(x[s]), y[s]).backward()
    # cuDNN may use TF32 for convolutions: compare at TF32 precision
    for name, p in grouped.named_parameters():
        got = p.grad.reshape(len(SEEDS), -1)
        want = torch.stack([dict(m.named_parameters())[name].grad.reshape(-1) for m in lone])
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3, msg=lambda m: f"{name}: {m}")


def test_bad_inputs_raise_naming_what_is_accepted():
    with pytest.raises(ValueError, match="one architecture"):
        GroupedCifarNet.from_models([build_model("residual", 8), build_model("plain", 8)])
    with pytest.raises(ValueError, match="non-empty list of integers"):
        GroupedCifarNet("residual", 8, seeds=[])
    with pytest.raises(ValueError, match="valid families"):
        GroupedCifarNet("dense", 8, seeds=[0])
    grouped = GroupedCifarNet("residual", 8, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"per-model batches \(S=2"):
        grouped(torch.randn(3, 2, 3, 8, 8))
    with pytest.raises(TypeError, match=r"2 models side by side; analyse each one: GroupedCifarNet.export"):
        anatomy(grouped)  # lesions and paths would delete a block of every model at once


@pytest.mark.parametrize("family,option", [("residual", "A"), ("highway", "B")])
def test_grouped_probes_give_each_models_own_statistics(family, option):
    """Per model: every response statistic and gradient norm a probe on the lone model records for the
    same batch (float64; option A pads each model's channel block, highway adds gates)."""
    config = dict(family=family, depth=8, option=option)
    lone = [m.double() for m in lone_models(SEEDS, **config)]
    grouped = GroupedCifarNet.from_models(lone)
    x, y = batches(1, len(SEEDS))[0]
    x = x.double()
    metrics = ("response", "gradient")
    with probe(grouped, metrics=metrics) as session:
        grouped_cross_entropy(grouped(x), y).sum().backward()
        session.record_gradients(step=3)
    got = session.table()
    assert sorted(got["model_index"].unique()) == [0, 1, 2]
    keys = ["site", "kind", "metric", "step"]
    for s, model in enumerate(lone):
        with probe(model, metrics=metrics) as lone_session:
            torch.nn.functional.cross_entropy(model(x[s]), y[s]).backward()
            lone_session.record_gradients(step=3)
        want = lone_session.table().set_index(keys)["value"].sort_index()
        mine = got[got["model_index"] == s].set_index(keys)["value"].sort_index()
        assert mine.index.equals(want.index)
        assert {"std", "norm_ratio", "param_grad_norm", "activation_grad_norm"} <= set(want.index.get_level_values(2))
        if family == "highway":
            assert "saturated_fraction" in set(want.index.get_level_values(2))
        np.testing.assert_allclose(mine.to_numpy(), want.to_numpy(), rtol=1e-9, atol=1e-12)
    assert "model_index" in session._repr_html_()


# ---- Lightning: GroupedClassifier ------------------------------------------------------------------

def _fit(module, train, val, steps, callbacks=()):
    import pytorch_lightning as pl
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _synthetic_loaders():
    from torch.utils.data import DataLoader, TensorDataset
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g))

    def shuffled(seed):
        return DataLoader(data, batch_size=8, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(seed))
    return shuffled, DataLoader(data, batch_size=16)


@pytest.mark.filterwarnings("ignore:You called `self.log")
def test_grouped_fit_trains_each_model_as_a_lone_classifier_on_its_own_data_order(tmp_path):
    import pandas as pd

    from resnet_probe.probes.callback import ProbeCallback
    from resnet_probe.train.grouped import GroupedClassifier, PerModelBatches
    from resnet_probe.train.module import CifarClassifier

    shuffled, val = _synthetic_loaders()
    hp = dict(family="residual", depth=8, recipe="paper", max_steps=4, warmup=False, log_every_n_steps=2)
    grouped = GroupedClassifier(seeds=[5, 9], shared_batches=False, **hp)
    probes = [ProbeCallback(every_n_epochs=1, every_n_steps=2, out_dir=tmp_path / name) for name in ("grouped", "lone")]
    metrics = _fit(grouped, PerModelBatches([shuffled(100), shuffled(200)]), val, steps=4,  # one epoch
                   callbacks=[probes[0]])
    assert {"val_error", "val_error/model0", "val_error/model1", "train_loss_step/model1"} <= set(metrics)

    # model 1: the second channel block, its own seed and its own data order
    lone = CifarClassifier(seed=9, **hp)
    lone_metrics = _fit(lone, shuffled(200), val, steps=4, callbacks=[probes[1]])
    assert metrics["val_error/model1"] == pytest.approx(lone_metrics["val_error"], abs=1e-6)
    assert metrics["val_loss/model1"] == pytest.approx(lone_metrics["val_loss"], rel=1e-4)
    exported = grouped.model.export()[1].state_dict()
    for key, value in lone.model.state_dict().items():
        torch.testing.assert_close(exported[key], value, **TOL)

    # the probe callback's tables: one row per model, labelled with its seed; model 1's are the lone run's
    keys = ["site", "metric", "step"]
    for table in ("probe_responses.csv", "probe_gradients.csv"):
        rows = pd.read_csv(tmp_path / "grouped" / table)
        assert sorted(rows["seed"].unique()) == [5, 9]
        mine = rows[rows["seed"] == 9].set_index(keys)["value"].sort_index()
        want = pd.read_csv(tmp_path / "lone" / table).set_index(keys)["value"].sort_index()
        pd.testing.assert_series_equal(mine, want, rtol=1e-5)


@pytest.mark.compiled
@pytest.mark.filterwarnings("ignore")
def test_grouped_steps_run_the_compiled_network_and_match_eager_ones(tmp_path, one_thread):
    """``GroupedClassifier(compile=True)`` (on the CPU by opt-in) runs every training step through its
    compiled network, recording steps included: two graphs (with and without the gradient taps' sinks),
    no break, the same weights and gradient-probe rows as an eager fit, in float64."""
    import pandas as pd
    import pytorch_lightning as pl
    from torch._dynamo.utils import counters

    from resnet_probe.probes.callback import ProbeCallback
    from resnet_probe.train.grouped import GroupedClassifier, PerModelBatches

    shuffled, _ = _synthetic_loaders()
    weights, rows = {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        module = GroupedClassifier(family="residual", depth=8, seeds=[5, 9], recipe="fast", max_steps=3,
                                   compile=compiled).double()
        trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             precision="64-true", callbacks=[ProbeCallback(every_n_epochs=0, every_n_steps=2,
                                                                           out_dir=tmp_path / str(compiled))])
        trainer.fit(module, train_dataloaders=PerModelBatches([shuffled(100), shuffled(200)]))
        captured = counters["stats"]["calls_captured"]
        assert (captured > 0) == compiled
        # steps 0 and 2 record through the taps, step 1 runs without them: a graph for each
        assert counters["stats"]["unique_graphs"] == 2 * compiled and not counters["graph_break"]
        weights[compiled] = torch.cat([p.detach().reshape(-1) for p in module.model.parameters()])
        rows[compiled] = pd.read_csv(tmp_path / str(compiled) / "probe_gradients.csv").set_index(
            ["seed", "site", "metric", "step"])["value"].sort_index()
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-12, atol=1e-14)
    assert sorted(rows[False].index.unique("step")) == [0, 2]
    pd.testing.assert_series_equal(rows[True], rows[False], rtol=1e-12)


@pytest.mark.filterwarnings("ignore:You called `self.log")
def test_exported_checkpoints_load_as_ordinary_classifiers_with_the_grouped_logits(tmp_path):
    from resnet_probe.checkpoints import load_model
    from resnet_probe.train.grouped import GroupedClassifier
    from resnet_probe.train.module import CifarClassifier

    shuffled, val = _synthetic_loaders()
    grouped = GroupedClassifier(family="highway", depth=8, seeds=[1, 2], shared_batches=True, recipe="fast",
                                max_steps=2)
    _fit(grouped, shuffled(0), val, steps=2)
    paths = grouped.export_checkpoints(tmp_path / "ckpts")
    assert [p.name for p in paths] == ["model0-seed1.ckpt", "model1-seed2.ckpt"]
    nested = grouped.export_checkpoints(tmp_path, filename="net-seed{seed}/last.ckpt")
    assert nested == [tmp_path / "net-seed1" / "last.ckpt", tmp_path / "net-seed2" / "last.ckpt"]
    assert all(torch.equal(torch.load(a, weights_only=False)["state_dict"][k], v)
               for a, b in zip(paths, nested) for k, v in torch.load(b, weights_only=False)["state_dict"].items())
    with pytest.raises(ValueError, match=r"unknown field \('s'\); valid fields: \{index\}, \{seed\}"):
        grouped.export_checkpoints(tmp_path, filename="m{s}.ckpt")
    with pytest.raises(ValueError, match="same path"):
        grouped.export_checkpoints(tmp_path, filename="all.ckpt")
    x = next(iter(val))[0]
    with torch.no_grad():
        logits = grouped.eval()(x)
        for s, path in enumerate(paths):
            raw = torch.load(path, weights_only=True)
            assert raw["hyper_parameters"]["seed"] == [1, 2][s] and raw["grouped"]["model_index"] == s
            lone = CifarClassifier.load_from_checkpoint(path).eval()
            assert lone.hparams.family == "highway" and lone.hparams.recipe == "fast"
            torch.testing.assert_close(lone(x), logits[s], **TOL)
            model, info = load_model(path)
            assert info["kind"] == "project"
            torch.testing.assert_close(model(x), logits[s], **TOL)


def test_per_model_batches_are_the_lone_runs_batches_with_the_model_seeds():
    from resnet_probe.data import CifarDataModule, make_synthetic
    from resnet_probe.train.grouped import per_model_train_batches

    source = make_synthetic(n_train=96, n_test=16, seed=0)
    kw = dict(batch_size=16, val_size=32, drop_last=True, gpu_resident=False)
    per_model = per_model_train_batches(CifarDataModule.from_source(source, **kw), [4, 8])
    assert len(per_model) == 4
    x, y = next(iter(per_model))
    assert x.shape == (2, 16, 3, 32, 32) and y.shape == (2, 16)
    assert not torch.equal(y[0], y[1])
    for s, seed in enumerate([4, 8]):
        lone_x, lone_y = next(iter(CifarDataModule.from_source(source, seed=seed, **kw).train_dataloader()))
        assert torch.equal(x[s], lone_x) and torch.equal(y[s], lone_y)


@pytest.mark.filterwarnings("ignore")
def test_grouped_run_resumed_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path):
    """Per-model stateful loaders restart at the saved batch, and the schedule keeps its length."""
    import pytorch_lightning as pl

    from resnet_probe.data import CifarDataModule, make_synthetic
    from resnet_probe.train.grouped import GroupedClassifier, per_model_train_batches

    source = make_synthetic(n_train=120, n_test=16, seed=0)

    def fit(ckpt_path=None, every=None):
        dm = CifarDataModule.from_source(source, val_size=0, batch_size=20, seed=0, augment=True)
        dm.setup("fit")
        module = GroupedClassifier(family="residual", depth=8, seeds=[4, 6], recipe="fast", epochs=2,
                                   log_every_n_steps=2)
        callbacks = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1,
                                                  filename="{step}")] if every else []
        trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=bool(every), callbacks=callbacks,
                             limit_val_batches=0)
        trainer.fit(module, train_dataloaders=per_model_train_batches(dm, [4, 6]), ckpt_path=ckpt_path)
        return module, trainer

    whole, _ = fit(every=4)                                   # 6 steps an epoch: step 4 is mid epoch 1
    resumed, trainer = fit(ckpt_path=tmp_path / "step=4.ckpt")
    assert trainer.global_step == 12
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
