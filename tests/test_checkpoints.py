"""Model files load safely: weights_only always, refusals explained, mismatches named."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torchvision

from resnet_probe.checkpoints import (CheckpointError, UnsafeCheckpointError, UnsafeLoadWarning, load_model,
                                      read_checkpoint)
from resnet_probe.models import CifarNet, anatomy


class _CreatesFile:
    """Unpickling this object runs ``open(path, "w")``: a stand-in for any malicious payload."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def tv_files(tmp_path_factory) -> dict[str, Path]:
    """Random-weight torchvision resnet18 / resnet50 state_dicts saved the way users download them."""
    d = tmp_path_factory.mktemp("tv")
    files = {}
    for arch in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None)
        files[arch] = d / f"{arch}.pth"
        torch.save(model.state_dict(), files[arch])
    return files


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("given", [True, False], ids=["arch-given", "arch-inferred"])
def test_torchvision_state_dict_loads_with_identical_weights(tv_files, arch, given):
    model, info = load_model(tv_files[arch], arch=arch if given else None)
    reference = torch.load(tv_files[arch], weights_only=True)
    assert info["kind"] == "torchvision" and info["arch"] == arch and info["path"] == str(tv_files[arch])
    assert type(model) is type(getattr(torchvision.models, arch)())
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert len(anatomy(model).blocks) == (8 if arch == "resnet18" else 16)


def test_torchvision_name_gives_random_weight_model():
    model, info = load_model("torchvision:resnet50")
    assert info == {"kind": "torchvision-random", "arch": "resnet50", "hparams": {}, "path": None}
    assert model.fc.out_features == 1000


def test_project_state_dict_inside_module_prefix_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    net = CifarNet("highway", 14).eval()
    ckpt = {"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {"family": "highway", "depth": 14, "option": "A", "width": 1,
                                 "gate_bias": None, "num_classes": 10, "recipe": "paper"}}
    path = tmp_path / "net.ckpt"
    torch.save(ckpt, path)
    model, info = load_model(path)
    x = torch.randn(4, 3, 32, 32)
    assert info["kind"] == "project" and info["arch"] == "highway-14"
    assert info["hparams"]["recipe"] == "paper"
    assert torch.equal(model(x), net(x))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _CreatesFile(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert str(path) in message and "arbitrary code" in message
    assert "allow_unsafe=True" in message and "--allow_unsafe_load" in message
    assert re.search(r"\b(io|builtins)\.open\b", message)  # names what the file asks to call
    assert not marker.exists()


def test_allow_unsafe_loads_knowingly(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.pt"
    torch.save({"payload": _CreatesFile(str(marker))}, path)
    for _ in range(2):   # named every time it is unpickled
        with pytest.warns(UnsafeLoadWarning, match=re.escape(str(path))):
            obj = read_checkpoint(path, allow_unsafe=True)  # no refusal: the payload runs, as the user accepted
        obj["payload"].close()
    assert marker.exists()


def test_pickled_module_needs_allow_unsafe(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(torchvision.models.resnet18(), path)
    with pytest.raises(UnsafeCheckpointError, match="torchvision.models.resnet.ResNet"):
        load_model(path)
    model, info = load_model(path, allow_unsafe=True)
    assert info["kind"] == "module" and isinstance(model, torchvision.models.ResNet)


def test_legacy_raw_pickle_with_payload_is_refused(tmp_path):
    import pickle
    marker = tmp_path / "created_by_unpickling"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps(_CreatesFile(str(marker)), protocol=4))
    with pytest.raises(UnsafeCheckpointError, match=r"\b(io|builtins)\.open\b"):
        load_model(path)
    assert not marker.exists()


def _assert_names(err: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(err.value)
    assert str(path) in message, message
    for w in words:
        assert w in message, message


def test_truncated_file_is_a_checkpoint_error(tv_files, tmp_path):
    path = tmp_path / "truncated.pth"
    data = tv_files["resnet18"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    _assert_names(err, path, "truncated")
    assert not isinstance(err.value, UnsafeCheckpointError)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"hello, not a checkpoint\n"],
                         ids=["random-bytes", "empty", "text"])
def test_not_a_checkpoint_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    _assert_names(err, path)
    assert not isinstance(err.value, UnsafeCheckpointError)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nothing.pth")


def test_tensor_dict_matching_no_architecture_names_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    _assert_names(err, path, "missing keys", "unexpected keys", "encoder.weight", "conv1.weight")


def test_resnet18_weights_loaded_as_resnet50_names_mismatch(tv_files):
    with pytest.raises(CheckpointError) as err:
        load_model(tv_files["resnet18"], arch="resnet50")
    _assert_names(err, tv_files["resnet18"], "resnet50", "missing keys", "layer1.0.conv3.weight",
                  "shape mismatches", "layer1.0.conv1.weight")


def test_unknown_arch_lists_valid_ones(tv_files):
    with pytest.raises(CheckpointError, match="resnet18, resnet34"):
        load_model(tv_files["resnet18"], arch="vgg16")


# ---- timm ResNets: timm:NAME and state_dict files with arch="timm:NAME" ----------------------------

def test_timm_name_gives_random_weight_model_read_by_the_anatomy():
    timm = pytest.importorskip("timm")
    model, info = load_model("timm:resnet18")
    assert info == {"kind": "timm-random", "arch": "timm:resnet18", "hparams": {}, "path": None}
    assert isinstance(model, timm.models.resnet.ResNet) and not model.training
    assert len(anatomy(model).blocks) == 8


def test_timm_state_dict_loads_with_identical_weights_given_its_arch(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    saved = timm.create_model("seresnet18", pretrained=False, num_classes=7)  # SE: no torchvision match
    path = tmp_path / "seresnet18.pth"
    torch.save(saved.state_dict(), path)
    model, info = load_model(path, arch="timm:seresnet18")
    assert info == {"kind": "timm", "arch": "timm:seresnet18", "hparams": {}, "path": str(path)}
    assert model.fc.out_features == 7
    reference = saved.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="a timm model's file needs arch='timm:NAME'"):
        load_model(path)


def test_timm_resnetv2_state_dict_reads_its_classes_from_the_conv_head(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    path = tmp_path / "v2.pth"
    torch.save(timm.create_model("resnetv2_18", pretrained=False, num_classes=5).state_dict(), path)
    model, _ = load_model(path, arch="timm:resnetv2_18")
    assert model.num_classes == 5


@pytest.mark.parametrize("source, arch", [("timm:vit_tiny_patch16_224", None), ("unused.pth", "timm:vgg16")])
def test_unknown_timm_name_lists_the_valid_ones(source, arch):
    pytest.importorskip("timm")
    with pytest.raises(CheckpointError, match=r"unknown timm ResNet '(vit_tiny_patch16_224|vgg16)'; valid: .*"
                                              r"resnet18, .*seresnext50_32x4d, .*wide_resnet50_2, .*resnetv2_50"):
        load_model(source, arch=arch)
