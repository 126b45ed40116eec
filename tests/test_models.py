"""Networks of He et al. 2016 / Srivastava et al. 2015 and the block anatomy of every supported ResNet."""
import pytest
import torch
import torchvision

from resnet_probe.models import (FAMILIES, anatomy, blocks_per_stage, build_model, count_parameters,
                                 default_gate_bias)

# He et al. 2016, Table 6: parameters of the CIFAR-10 ResNets (option A).
PAPER_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6, 1202: 19.4e6}


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS))
def test_parameter_counts_equal_the_paper(depth):
    residual = count_parameters(build_model("residual", depth))
    digits = 1 if depth in (110, 1202) else 2
    assert round(residual / 1e6, digits) == pytest.approx(PAPER_PARAMS[depth] / 1e6)
    assert count_parameters(build_model("plain", depth)) == residual


def test_option_a_adds_no_parameters_and_b_c_add_projections():
    a, b, c = (count_parameters(build_model("residual", 20, option=o)) for o in "ABC")
    plain = count_parameters(build_model("plain", 20))
    assert a == plain
    # B: a 1x1 conv + BN at the two stage changes; C: a projection in every one of the 9 blocks.
    assert b == a + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert c > b


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("depth", [20, 56, 110])
def test_forward_shape_for_every_family(family, depth):
    model = build_model(family, depth).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_width_multiplies_filters():
    model = build_model("residual", 20, width=2)
    assert model.stage3[0].branch.conv2.out_channels == 128


@pytest.mark.parametrize("depth,bias", [(8, -1.0), (14, -1.0), (20, -2.0), (32, -3.0), (56, -3.0)])
def test_highway_gate_bias_defaults_by_depth(depth, bias):
    assert default_gate_bias(depth) == bias
    model = build_model("highway", depth)
    for blk in anatomy(model):
        assert torch.all(blk.gate_module.conv.bias == bias)


def test_highway_gate_bias_is_configurable_and_gates_start_carry_biased():
    model = build_model("highway", 20, gate_bias=-4.0).eval()
    assert torch.all(model.stage1[0].gate.conv.bias == -4.0)
    x = model.stem(torch.randn(4, 3, 32, 32))
    assert model.stage1[0].gate(x).mean() < 0.5


@pytest.mark.parametrize("bad,match", [
    (dict(depth=21), "6n\\+2"), (dict(depth=4), "6n\\+2"), (dict(family="dense"), "plain, residual, highway"),
    (dict(option="D"), "A, B, C"), (dict(family="plain", option="B"), "option must be 'A'"),
    (dict(width=0), "width")])
def test_bad_arguments_name_the_valid_values(bad, match):
    with pytest.raises(ValueError, match=match):
        build_model(**{"family": "residual", "depth": 20, **bad})


def test_blocks_per_stage():
    assert [blocks_per_stage(d) for d in (20, 56, 110, 1202)] == [3, 9, 18, 200]


@pytest.mark.parametrize("family", FAMILIES)
def test_anatomy_of_our_families_reproduces_the_forward_pass(family):
    model = build_model(family, 20).eval()
    keys = list(model.state_dict())
    a = anatomy(model)
    assert len(a) == 9 and [b.name for b in a][:4] == ["stage1.block1", "stage1.block2", "stage1.block3",
                                                        "stage2.block1"]
    assert [b.downsampling for b in a] == [False] * 3 + [True, False, False] * 2
    assert (a[0].gate_module is not None) == (family == "highway")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.forward(x), model(x))
        h = a.stem(x)
        for blk in a:
            assert torch.equal(blk.recompose(h), blk.forward(h)), blk.name
            h = blk.forward(h)
    assert list(model.state_dict()) == keys


TORCHVISION = {"resnet18": (8, 3), "resnet34": (16, 3), "resnet50": (16, 4), "resnet101": (33, 4),
               "resnet152": (50, 4), "resnext50_32x4d": (16, 4), "wide_resnet50_2": (16, 4)}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_anatomy_of_torchvision_resnets(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        a = anatomy(model)
        n_blocks, n_down = TORCHVISION[name]
        assert len(a) == n_blocks and sum(b.downsampling for b in a) == n_down
        assert torch.equal(model(x), before) and torch.equal(a.forward(x), before)
        h = a.stem(x)
        blk = a["stage1.block1"]
        assert blk.path == "layer1.0"
        assert torch.equal(blk.recompose(h), blk.forward(h))
    state = model.state_dict()
    assert list(state) == list(keys) and all(torch.equal(state[k], keys[k]) for k in keys)


def test_bottleneck_layer1_0_is_downsampling_though_stride_1():
    a = anatomy(torchvision.models.resnet50())
    assert a["stage1.block1"].downsampling and a["stage1.block1"].module.stride == 1


def test_model_without_residual_blocks_is_refused():
    with pytest.raises(TypeError, match="no recognisable residual blocks"):
        anatomy(torchvision.models.vgg11())


def test_unknown_block_names_the_valid_ones():
    a = anatomy(build_model("residual", 8))
    assert a.resolve(["stage2.block1", 0, "stage3.0"]) == [0, 1, 2]
    with pytest.raises(ValueError, match="stage1.block1, stage2.block1, stage3.block1"):
        a.resolve(["stage4.block1"])
    with pytest.raises(ValueError, match="out of range"):
        a.resolve([7])
