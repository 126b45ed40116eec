"""torch.compile on the training and analysis paths, reproduced on the CPU (inductor's C++ code).

A network trained compiled comes back eager (its compiled code is held beside it), so validation and
test with the probes, folding, lesions and probes give an eager network's results; compiled code runs
only for the batch size it was first given in each mode; a model compiled in place still folds,
lesions and probes to the eager results; compiled calls never pass a recompile limit silently, and
leave torch's process-wide setting alone.
"""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import resnet_probe.models.compiled as compiled_code
from resnet_probe.data import CifarDataModule, make_synthetic
from resnet_probe.lesion import lesion
from resnet_probe.models import build_model, fold_batchnorm
from resnet_probe.models.compiled import CompiledCall, RecompileLimitError, compiled_module
from resnet_probe.probes import probe
from resnet_probe.probes.callback import ProbeCallback
from resnet_probe.train.module import CifarClassifier

from test_lesion_context import _images, _randomise_bn

pytestmark = [pytest.mark.compiled, pytest.mark.usefixtures("one_thread")]

# 56 training images in batches of 16 (16, 16, 16 and a last batch of 8), 24 validation and 24 test
# images in batches of 16 (16 and 8): every mode meets a second, smaller batch size.
DATA = dict(batch_size=16, val_size=24, eval_batch_size=16, augment=False, seed=0)
MODULE = dict(family="residual", depth=8, recipe="fast", epochs=1, seed=0)


def _data() -> CifarDataModule:
    return CifarDataModule.from_source(make_synthetic(n_train=80, n_test=24, seed=0), **DATA)


def _trainer(out, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      precision="64-true", callbacks=[ProbeCallback(every_n_epochs=1, every_n_steps=2, out_dir=out)],
                      **kw)


def _stages(module, out) -> dict:
    """Fit one epoch, then validate and test, each with a ProbeCallback writing into ``out``."""
    trainer = _trainer(out)
    trainer.fit(module, datamodule=_data())
    graphs = counters["stats"]["unique_graphs"]
    (val,) = _trainer(out).validate(module, datamodule=_data(), verbose=False)
    (test,) = _trainer(out).test(module, datamodule=_data(), verbose=False)
    responses = pd.read_csv(out / "probe_responses.csv").set_index(["site", "metric", "step"])["value"]
    return {"val": val, "test": test, "responses": responses.sort_index(), "graphs_after_fit": graphs,
            "graphs": counters["stats"]["unique_graphs"]}


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    """``CifarClassifier(compile=True)`` (on the CPU: opt-in, experimental) through fit, validate and test."""
    torch._dynamo.reset()
    counters.clear()
    module = CifarClassifier(**MODULE, compile=True, compile_mode="default")
    with pytest.warns(UserWarning, match=r"CifarClassifier\(compile=True\) on the CPU is experimental"):
        run = _stages(module, tmp_path_factory.mktemp("compiled"))
    return module, run


def test_a_network_trained_compiled_validates_and_tests_with_the_probes_as_an_eager_one(compiled_run, tmp_path):
    """The compiled network is held beside ``module.model``, which stays eager: ``validate`` and ``test``
    after a compiled ``fit`` open the probes on it and give the eager network's metrics and responses."""
    module, run = compiled_run
    assert module.compiled is not None and module.compiled.module is module.model
    assert compiled_module(module.model) is None and compiled_module(module) is None
    assert run["graphs"] > 0  # compiled code ran
    eager = CifarClassifier(**MODULE, compile=False).double()
    eager.load_state_dict(module.state_dict())
    (val,) = _trainer(tmp_path).validate(eager, datamodule=_data(), verbose=False)
    (test,) = _trainer(tmp_path).test(eager, datamodule=_data(), verbose=False)
    for name, want in (("val", val), ("test", test)):
        assert run[name].keys() == want.keys()
        for key in want:
            assert run[name][key] == pytest.approx(want[key], rel=1e-9), key
    responses = pd.read_csv(tmp_path / "probe_responses.csv").set_index(["site", "metric", "step"])["value"]
    assert len(responses) > 0  # the responses `validate` recorded, as `run["responses"]` holds them
    pd.testing.assert_series_equal(run["responses"], responses.sort_index(), rtol=1e-9)


def test_compiled_code_runs_one_graph_per_mode_and_other_batch_sizes_eagerly(compiled_run):
    """Training batches of 16 and a last one of 8, evaluation batches of 16 and 8: one training graph,
    one with the gradient taps (recording steps) and one evaluation graph (``test``; the validation
    epochs record responses, eagerly); the smaller batches make no graph of their own."""
    module, run = compiled_run
    assert run["graphs_after_fit"] == 2
    assert run["graphs"] == 3
    assert module._compiled_batch == {True: 16, False: 16}


def test_folding_lesioning_and_probing_a_network_trained_compiled_give_the_eager_results(compiled_run):
    module, _ = compiled_run
    net = module.model.eval()
    eager = build_model("residual", 8).double().eval()
    eager.load_state_dict(net.state_dict())
    x = _images(4, 32).double()
    with torch.no_grad():
        assert torch.equal(fold_batchnorm(net)(x), fold_batchnorm(eager)(x))
        with lesion(net, ["stage2.block1"]), lesion(eager, ["stage2.block1"]):
            assert torch.equal(net(x), eager(x))
        with probe(net) as mine, probe(eager) as want:
            net(x)
            eager(x)
    pd.testing.assert_frame_equal(mine.table(), want.table())


def test_folding_lesioning_and_probing_a_model_compiled_in_place_give_the_eager_results():
    """``model.compile()`` after it ran: folding and lesions work on it; a probe warns that its hooks did
    not run, and records the eager values when the model runs under the "force_eager" stance."""
    torch.manual_seed(4)
    model = build_model("residual", 8)
    _randomise_bn(model)
    model.eval()
    reference = copy.deepcopy(model)
    x = _images(4, 32)
    model.compile()
    with torch.no_grad():
        model(x)  # traced without any hook
        torch.testing.assert_close(fold_batchnorm(model)(x), fold_batchnorm(reference)(x), rtol=1e-5, atol=1e-5)
        with lesion(model, ["stage2.block1"]), lesion(reference, ["stage2.block1"]):
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        with probe(reference) as want:
            reference(x)
        with pytest.warns(UserWarning, match="none of the probe's hooks ran.*force_eager"), probe(model) as silent:
            model(x)
        assert silent.table().empty
        with probe(model) as mine, torch.compiler.set_stance("force_eager"):
            model(x)
    pd.testing.assert_frame_equal(mine.table(), want.table())
    assert compiled_module(model) == ""


def test_a_probe_on_a_model_whose_compiled_wrapper_already_ran_says_so():
    """``torch.compile(model)`` ran before the probe was attached: the probe (on the wrapper or on the
    model) warns at that forward pass, and records under the "force_eager" stance; a gradient probe
    whose taps are hooks says which block it could not measure."""
    torch.manual_seed(5)
    model = build_model("residual", 8).train()
    wrapper = torch.compile(model)
    x, y = _images(4, 32), torch.arange(4)
    F.cross_entropy(wrapper(x), y).backward()  # traced without any hook
    for target in (wrapper, model):
        with pytest.warns(UserWarning, match="none of the probe's hooks ran"), probe(target) as session:
            wrapper(x)
        assert session.model is model and session.table().empty
    with probe(wrapper) as session, torch.compiler.set_stance("force_eager"):
        wrapper(x)
    assert set(session.table()["metric"]) >= {"std", "mean"}
    with probe(model, metrics="gradient") as holder:
        F.cross_entropy(wrapper(x), y).backward()  # traced again, with the taps in the blocks' slots
        with probe(model, metrics="gradient") as hooked:
            assert not any(hooked.gradient.tapped)  # the slots are taken: these taps are hooks
            F.cross_entropy(wrapper(x), y).backward()
            with pytest.warns(UserWarning, match="activation gradient of stage3.block1 was not measured"):
                hooked.record_gradients()
        holder.record_gradients()
    assert (holder.table()["value"] > 0).all()


class _Scale(nn.Module):
    """A network of its own class: its compiled variants share no cache with any other test's."""

    def forward(self, x):
        return 2 * x


def test_compiled_calls_fail_loudly_at_the_recompile_limit_and_leave_the_process_setting(monkeypatch):
    monkeypatch.setattr(compiled_code, "RECOMPILE_LIMIT", 2)
    process_limit = torch._dynamo.config.recompile_limit
    call = CompiledCall(_Scale(), dynamic=False)
    call(torch.ones(2))
    call(torch.ones(3))  # a second static variant: at the limit
    assert torch._dynamo.config.recompile_limit == process_limit
    with pytest.raises(RecompileLimitError, match="limit of 2 compiled variants of one function"):
        call(torch.ones(4))
    assert torch._dynamo.config.recompile_limit == process_limit
    assert not torch._dynamo.config.fail_on_recompile_limit_hit
