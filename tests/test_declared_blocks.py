"""Declared residual blocks and timm ResNets through every tool: reordering, sampled paths, the
batched lesion engine, attribution; what a wrong declaration or an unreadable model is told."""
from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_probe.attribution import block_attributions
from resnet_probe.lesion import evaluate_deletion_sets, reordered, single_block_sweep
from resnet_probe.models import anatomy, declare_block
from resnet_probe.paths import path_gradient_stack, single_path_gradients
from resnet_probe.probes import probe

import user_nets
from test_anatomy_families import CASES, _instance, _randomise_norms

pytestmark = pytest.mark.usefixtures("one_thread")


def _paper_net(dtype=torch.float32, blocks=(2, 1, 1)):
    torch.manual_seed(0)
    model = _randomise_norms(user_nets.PaperResNet(user_nets.BasicBlock, list(blocks))).eval().to(dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 16, 16, generator=g).to(dtype)
    return model, x, torch.randint(0, 10, (3,), generator=g)


def test_blocks_are_numbered_by_stage_in_forward_order():
    model, _, _ = _paper_net()
    a = anatomy(model)
    assert [b.name for b in a] == ["stage1.block1", "stage1.block2", "stage2.block1", "stage3.block1"]
    assert [b.path for b in a] == ["layer1.0", "layer1.1", "layer2.0", "layer3.0"]
    assert [b.downsampling for b in a] == [False, False, True, True]  # LambdaLayer zero-pad vs nn.Sequential()
    assert a[0].shortcut_module is None and a[2].shortcut_module is model.layer2[0].shortcut
    assert [m for _, m in a[0].layers] == [model.layer1[0].bn1, model.layer1[0].bn2]


def test_a_declared_net_runs_reordered_as_written():
    model, x, _ = _paper_net()
    with torch.no_grad():
        with reordered(model, [1, 0, 2, 3]):
            got = model(x)
        out = F.relu(model.bn1(model.conv1(x)))
        out = model.layer3(model.layer2(model.layer1[0](model.layer1[1](out))))
        want = model.linear(F.avg_pool2d(out, out.size(3)).flatten(1))
    assert torch.equal(got, want) and not torch.equal(got, model(x))


def test_single_paths_of_a_declared_net_add_up_to_the_exact_stack():
    """Summed over the C(n, k) paths of each length, single-path gradients give G[k] (float64)."""
    model, x, y = _paper_net(torch.float64)
    n = len(anatomy(model))
    sets = [list(c) for k in range(n + 1) for c in itertools.combinations(range(n), k)]
    paths = single_path_gradients(model, x, y, sets)
    stack = path_gradient_stack(model, x, y)
    lengths = np.array([len(s) for s in sets])
    for k in range(n + 1):
        torch.testing.assert_close(paths[torch.from_numpy(lengths == k)].sum(0), stack[k], rtol=1e-9,
                                   atol=1e-12 * stack.abs().max().item())


ENGINE_CASES = ["paper-resnet-optionA", "user-preact", "user-highway", "timm-seresnext26d_32x4d",
                "timm-resnetblur50", "timm-resnetv2_50d"]


@pytest.mark.parametrize("name", ENGINE_CASES)
def test_the_batched_lesion_engine_equals_one_lesion_context_per_set(name):
    """Bitwise for the batched engine; to float32 rounding with BatchNorm folded into the convs."""
    case = CASES.get(name)
    if case is None:
        pytest.skip("timm is not installed")
    _, model, x, y = _instance(case)
    n = len(anatomy(model))
    sets = [[], [0], [n - 1], [1, 2], list(range(n))]
    for mode in ("zero_branch", "shortcut_only"):
        batched = evaluate_deletion_sets(model, sets, x, y, mode=mode, return_logits=True)
        loop = evaluate_deletion_sets(model, sets, x, y, mode=mode, engine="loop", return_logits=True)
        assert torch.equal(batched.logits, loop.logits), mode
        folded = evaluate_deletion_sets(model, sets, x, y, mode=mode, fold_bn=True, return_logits=True)
        torch.testing.assert_close(folded.logits, loop.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["paper-resnet-optionA", "timm-seresnet18", "timm-resnetv2_18"])
def test_attribution_and_sweeps_name_every_block(name):
    case = CASES.get(name)
    if case is None:
        pytest.skip("timm is not installed")
    _, model, x, y = _instance(case)
    anat = anatomy(model)
    att = block_attributions(model, x, y)
    assert list(att["block"]) == anat.names and att["share"].sum() == pytest.approx(1.0)
    assert (att["attribution"] > 0).all()
    sweep = single_block_sweep(model, x, y, n_resamples=20)
    assert list(sweep["block"]) == anat.names and list(sweep["path"]) == [b.path for b in anat]


def test_gate_sites_of_a_declared_highway_block():
    _, model, x, _ = _instance(CASES["user-highway"])
    with torch.no_grad(), probe(model, sites="*.gate", raw=True) as s:
        model(x)
        gate = s.raw("stage1.block1.gate")
    assert torch.equal(gate, model.blocks[0].gate(model.stem(x)))


# ---- what users are told -----------------------------------------------------------------------

def test_a_model_without_known_blocks_is_told_what_is_supported_and_how_to_declare():
    with pytest.raises(TypeError) as err:
        anatomy(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    msg = str(err.value)
    for part in ("no recognisable residual blocks", "torchvision", "timm ResNet", "resnetv2_*",
                 "declare_block(BasicBlock, branch=['conv1', 'bn1', F.relu, 'conv2', 'bn2']",
                 "shortcut='shortcut', combine='relu'"):
        assert part in msg


@pytest.mark.parametrize("kwargs, match", [
    (dict(branch=["conv1"], combine="mul"), "unknown combine 'mul'; valid: relu"),
    (dict(branch=["conv1"], combine="gate"), "gate= names the gate submodule exactly when combine='gate'"),
    (dict(branch=lambda block, x: x), "needs layers="),
    (dict(branch=["conv1", F.relu]), "must end in a submodule"),
    (dict(branch=[]), "non-empty list"),
    (dict(branch=["conv1"], shortcut=nn.Identity()), "shortcut is a submodule name"),
])
def test_a_bad_declaration_is_refused_naming_the_valid_choices(kwargs, match):
    class Block(nn.Module):
        pass
    with pytest.raises(ValueError, match=match):
        declare_block(Block, **kwargs)


class _Add(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


declare_block(_Add, branch=["conv"], combine="add")


def test_a_declared_name_missing_from_the_block_names_its_submodules():
    class Misdeclared(_Add):
        pass

    declare_block(Misdeclared, branch=["conv"], shortcut="skip", combine="add")
    with pytest.raises(TypeError, match=r"0\.0 \(Misdeclared\) has no submodule 'skip'.*its submodules: conv"):
        anatomy(nn.Sequential(nn.Sequential(Misdeclared())))


class _SkipsOver(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1, self.b2 = _Add(), _Add()

    def forward(self, x):
        a = self.b1(x)
        return a + self.b2(a)


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = _Add()

    def forward(self, x):
        return self.b1(x) if x.sum() > 0 else x


@pytest.mark.parametrize("net, match", [(_SkipsOver, "uses the output of block b1 outside the next block"),
                                        (_Branches, "torch.fx could not trace its forward")])
def test_a_forward_that_is_not_one_chain_of_blocks_is_refused(net, match):
    with pytest.raises(TypeError, match=match):
        anatomy(net())


def test_reading_a_declared_net_keeps_no_reference_to_it():
    model, _, _ = _paper_net()
    anatomy(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_timm_block_ending_in_another_activation_is_refused():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, act_layer="silu", layers=(1, 1, 1, 1))
    with pytest.raises(TypeError, match="layer1.0 ends in SiLU; the anatomy reads blocks whose output is"):
        anatomy(model)


def test_the_toolkit_imports_and_reads_models_without_timm():
    code = """
import sys
sys.modules["timm"] = None  # import timm now fails, as where it is not installed
import torch
from resnet_probe.checkpoints import CheckpointError, load_model
from resnet_probe.lesion import lesion
from resnet_probe.models import anatomy, build_model
from resnet_probe.probes import probe
model = build_model("residual", 8).eval()
x = torch.randn(1, 3, 8, 8)
with torch.no_grad(), probe(model), lesion(model, [0]):
    model(x)
try:
    load_model("timm:resnet18")
except CheckpointError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "timm models need the timm package (pip install timm)" in out.stdout
