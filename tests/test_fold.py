"""Folding BatchNorm into the convolutions gives the same network, on which lesions and probes still work."""
from contextlib import nullcontext

import pytest
import torch
import torchvision

from resnet_probe.lesion import evaluate_deletion_sets, single_block_sweep
from resnet_probe.models import anatomy, build_model
from resnet_probe.models.fold import count_batchnorms, fold_batchnorm
from resnet_probe.probes import probe

from test_lesion_context import _images, _randomise_bn

pytestmark = pytest.mark.usefixtures("one_thread")


MODELS = {  # name: (constructor, BatchNorms left after folding)
    "plain-14": (lambda: build_model("plain", 14), 0),
    "residual-14 option B": (lambda: build_model("residual", 14, option="B"), 0),
    "highway-14": (lambda: build_model("highway", 14), 0),
    "preact-14": (lambda: build_model("preact", 14), 6 + 1),  # each block's first BN and the head's precede no conv
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 0),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 0),
}


@pytest.mark.parametrize("name", MODELS)
def test_folded_network_computes_the_same_logits_without_batchnorm(name):
    build, left = MODELS[name]
    torch.manual_seed(0)
    model = build()
    _randomise_bn(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(3, 32 if not name.startswith("resnet") else 64)
    folded = fold_batchnorm(model)
    assert count_batchnorms(folded) == left < count_batchnorms(model)
    with torch.no_grad():
        ref = model(x)  # rounding differences grow with the logits' scale (about 100 for resnet50 here)
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        torch.testing.assert_close(fold_batchnorm(model.double())(x.double()), model(x.double()),
                                   rtol=1e-10, atol=1e-12)
    model.float()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert anatomy(folded).names == anatomy(model).names


def test_lesion_sweep_and_probe_on_the_folded_copy_match_the_original():
    torch.manual_seed(1)
    model = build_model("residual", 20)
    _randomise_bn(model)
    model.eval()
    folded = fold_batchnorm(model)
    x, y = _images(6, 32), torch.arange(6)
    sets = [[], [0], [4], [2, 5], [3, 6, 7]]
    ref = evaluate_deletion_sets(model, sets, x, y, return_logits=True)
    for fast in (evaluate_deletion_sets(folded, sets, x, y, return_logits=True),
                 evaluate_deletion_sets(model, sets, x, y, return_logits=True, fold_bn=True)):
        torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert count_batchnorms(model) > 0  # fold_bn=True evaluated a folded copy
    sweeps = [single_block_sweep(model, x, y, n_resamples=20, fold_bn=fold) for fold in (False, True)]
    assert list(sweeps[0]["block"]) == list(sweeps[1]["block"]) == anatomy(model).names
    torch.testing.assert_close(torch.tensor(sweeps[1]["loss"].to_numpy()), torch.tensor(sweeps[0]["loss"].to_numpy()),
                               rtol=1e-4, atol=1e-6)
    with torch.no_grad(), probe(model, sites="*.branch") as a, probe(folded, sites="*.branch") as b:
        model(x)
        folded(x)
    for site in a.sites:
        torch.testing.assert_close(b.stats[site].channel_std, a.stats[site].channel_std, rtol=1e-4, atol=1e-6)


def test_a_channels_last_network_folds_into_channels_last_convolutions_with_the_same_logits():
    """Evaluation in NHWC: the folded copy keeps the layout (or takes it when asked), and computes the same."""
    from resnet_probe.models import evaluation_model

    torch.manual_seed(3)
    model = build_model("residual", 14, option="B")
    _randomise_bn(model)
    model.eval()
    x = _images(4, 32)
    with torch.no_grad():
        ref = model(x)
    nchw = evaluation_model(model, "folded")
    convs = lambda net: [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    assert not any(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs(nchw)
                   if c.kernel_size != (1, 1))
    for folded in (evaluation_model(model, "folded", channels_last=True),
                   fold_batchnorm(model.to(memory_format=torch.channels_last))):
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs(folded))
        with torch.no_grad():
            torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.compiled
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_compiled_copy_compiles_every_block_and_the_lesion_engine_matches_eager(device):
    """Folded and compiled block by block (inductor): the same logits and deletion results as the eager
    net, for every row count the engine uses, without raising torch's process-wide recompile limit;
    probes refuse the copy; the original stays eager; on the CPU the copy says it is experimental."""
    torch.manual_seed(2)
    model = build_model("residual", 14)
    _randomise_bn(model)
    model.eval().to(device)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # CUDA: float32 convolutions, for a float32 tolerance
    try:
        _check_compiled_copy(model, device)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _check_compiled_copy(model, device):
    import torch._dynamo.utils

    from resnet_probe.models import EVALUATION_PATHS, evaluation_model
    from resnet_probe.models.compiled import compiled_module

    limit = torch._dynamo.config.recompile_limit
    with pytest.warns(UserWarning, match="on the CPU is experimental") if device == "cpu" else nullcontext():
        compiled = evaluation_model(model, "compiled")
    assert compiled_module(model) is None and evaluation_model(model, "eager") is model
    assert count_batchnorms(compiled) == 0
    blocks = [b.module for b in anatomy(compiled).blocks]
    assert all(compiled_module(b) == "" for b in blocks)
    x, y = _images(8, 32).to(device), torch.arange(8, device=device) % 10
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled(x[:3]), model(x[:3]), rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] > 0  # compiled code ran
    sets = [[], [0], [3], [1, 4], [2, 3, 5]]
    ref = evaluate_deletion_sets(model, sets, x, y, return_logits=True)
    fast = evaluate_deletion_sets(compiled, sets, x, y, return_logits=True, max_batch=20)  # passes of 16 rows
    torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert torch._dynamo.config.recompile_limit == limit  # the process-wide setting is left as it was
    with pytest.raises(RuntimeError, match="'stem' of the model runs compiled code.*folded copy"):
        probe(compiled)
    with pytest.raises(ValueError, match="valid paths: " + ", ".join(EVALUATION_PATHS)):
        evaluation_model(model, "graphed")
