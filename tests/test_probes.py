"""Facts about the probes: streaming statistics, sites, hook ownership, outputs never change."""
from __future__ import annotations

import gc
import math
import warnings

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from resnet_probe.models import anatomy, build_model
from resnet_probe.models.compiled import compiled_module
from resnet_probe.probes import SUMMARY_METRICS, ChannelStats, NonFiniteError, native, probe, site_names

FAMILIES = ("plain", "residual", "highway", "preact")


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def _value(df, site, metric, kind=None):
    sel = (df.site == site) & (df.metric == metric)
    if kind is not None:
        sel &= df.kind == kind
    (v,) = df.loc[sel, "value"].tolist()
    return v


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 5, 7, 3, generator=g) * torch.linspace(0.5, 3, 5).view(1, 5, 1, 1) + 4.0
            for n in (3, 11, 1, 6)]


@pytest.fixture(params=["one-read kernel", "torch reductions"])
def cpu_reduction(request, monkeypatch):
    """CPU batches reduced by the one-read kernel, or by PyTorch's reductions (centred or raw)."""
    if request.param == "one-read kernel" and not native.available():
        pytest.skip(native.status())
    monkeypatch.setenv("RESNET_PROBE_NATIVE", "1" if request.param == "one-read kernel" else "0")
    return request.param


def _took_kernel(session) -> bool:
    """Whether the session reduced batches with the one-read kernel (its working buffer exists)."""
    return any(key[0] == "native" for key in session.response._scratch)


# -- streaming statistics --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, rtol, layout", [
    (torch.float32, 1e-6, torch.contiguous_format), (torch.float64, 1e-12, torch.contiguous_format),
    (torch.bfloat16, 1e-6, torch.contiguous_format), (torch.float32, 1e-6, torch.channels_last)])
def test_streaming_std_equals_torch_std_over_the_concatenated_batches(batches, dtype, rtol, layout,
                                                                       cpu_reduction):
    st = ChannelStats()
    for b in batches:
        st.update(b.to(dtype).contiguous(memory_format=layout))
    ref = torch.cat(batches).to(dtype).double()
    per_channel = ref.transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(st.channel_std, per_channel.std(dim=1), rtol=rtol, atol=0)
    torch.testing.assert_close(st.mean, per_channel.mean(dim=1), rtol=rtol, atol=0)
    torch.testing.assert_close(st.global_std, ref.std(), rtol=rtol, atol=0)
    torch.testing.assert_close(st.channel_std_mean, per_channel.std(dim=1).mean(), rtol=rtol, atol=0)
    torch.testing.assert_close(st.norm, ref.norm(), rtol=rtol, atol=0)
    assert st.count == ref.numel() // 5


@pytest.mark.parametrize("parts", [1, 3])
def test_every_summary_metric_follows_its_definition(parts, cpu_reduction):
    """count, mean, std, channel_std_mean and rms of each block of channels, written out from the values."""
    g = torch.Generator().manual_seed(9)
    scale = torch.linspace(0.5, 3, 6).view(1, 6, 1, 1)
    batches = [torch.randn(n, 6, 5, 4, generator=g) * scale + torch.arange(6.0).view(1, 6, 1, 1) - 2
               for n in (4, 1, 7)]
    st = ChannelStats()
    for b in batches:
        st.update(b)
    values = torch.cat(batches).double()
    summary = st.summary(parts).reshape(parts, -1)
    for p, block in enumerate(values.chunk(parts, dim=1)):
        per_channel = block.transpose(0, 1).reshape(block.shape[1], -1)
        n = block.numel()
        mean = block.sum() / n
        expected = {"count": n, "mean": mean,
                    "std": math.sqrt(((block - mean) ** 2).sum() / (n - 1)),
                    "channel_std_mean": sum(math.sqrt(((c - c.mean()) ** 2).sum() / (c.numel() - 1))
                                            for c in per_channel) / len(per_channel),
                    "rms": math.sqrt((block ** 2).sum() / n)}
        for metric, value in expected.items():
            got = summary[p, SUMMARY_METRICS.index(metric)]
            torch.testing.assert_close(got, torch.as_tensor(value, dtype=torch.float64), rtol=1e-6, atol=0,
                                       msg=lambda m: f"{metric}, part {p}: {m}")
        assert st.norms(parts)[p].item() == pytest.approx(math.sqrt((block ** 2).sum()), rel=1e-6)


def test_probe_std_matches_torch_std_on_both_reduction_paths(cpu_reduction):
    """Sites whose first batch is near zero-mean switch to raw sums, an offset site stays centred; both exact."""
    torch.manual_seed(3)
    model = build_model("residual", 14)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):  # BN running statistics of the data, as in a trained net
            model(torch.randn(16, 3, 32, 32, generator=g))
        model.eval()
        model.stage3[-1].branch.bn1.bias.fill_(12.0)  # this response: mean ~12, std ~1
    with torch.no_grad(), probe(model, raw=True) as session:
        for n in (5, 2, 7):
            model(torch.randn(n, 3, 32, 32, generator=g))
        took_kernel = _took_kernel(session)
    centred = session.response._centred
    assert centred["stage3.block2.branch.conv1"] is True
    assert sum(not c for c in centred.values()) >= len(centred) // 2  # most sites took raw sums
    assert took_kernel == (cpu_reduction == "one-read kernel")
    for name in session.sites:
        st = session.stats[name]
        ref = session.raw(name).double()
        per_channel = ref.transpose(0, 1).reshape(ref.shape[1], -1)
        torch.testing.assert_close(st.global_std, ref.std(), rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(st.channel_std, per_channel.std(dim=1), rtol=1e-6, atol=0, msg=name)


def test_batches_in_and_out_of_inference_mode_are_recorded_alike(cpu_reduction):
    """Working buffers made in inference mode (a Lightning validation) serve later no-grad batches."""
    torch.manual_seed(4)
    model = build_model("residual", 8).eval()
    g = torch.Generator().manual_seed(4)
    modes = (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad)
    with probe(model, raw=True) as session:
        for mode in modes:  # the first batch decides each site's reduction; the others take it
            with mode():
                model(torch.randn(6, 3, 32, 32, generator=g))
        took_kernel = _took_kernel(session)
    assert not all(session.response._centred.values())  # the raw-sum path was exercised
    assert took_kernel == (cpu_reduction == "one-read kernel")
    for name in session.sites:
        ref = session.raw(name).double()
        assert session.stats[name].count * ref.shape[1] == ref.numel()
        torch.testing.assert_close(session.stats[name].global_std, ref.std(), rtol=1e-6, atol=0, msg=name)


def test_merging_two_halves_equals_streaming_the_whole(batches):
    whole, first, second = ChannelStats(), ChannelStats(), ChannelStats()
    for i, b in enumerate(batches):
        whole.update(b)
        (first if i < 2 else second).update(b)
    merged = first.merge(second)
    assert merged.count == whole.count
    torch.testing.assert_close(merged.moments, whole.moments, rtol=1e-14, atol=0)
    torch.testing.assert_close(merged.channel_std, whole.channel_std, rtol=1e-14, atol=0)
    whole.reset()
    assert whole.count == 0 and torch.count_nonzero(whole.moments) == 0


# -- probing never changes outputs -------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_models():
    """Random-weight torchvision ResNets, built once (their initialisation is the slow part)."""
    torch.manual_seed(0)
    return {"resnet18": torchvision.models.resnet18().eval(), "resnet50": torchvision.models.resnet50().eval()}


@pytest.mark.parametrize("name", [*FAMILIES, "resnet18", "resnet50"])
def test_probed_logits_are_bitwise_equal_to_unprobed_logits(name, torchvision_models):
    torch.manual_seed(0)
    if name in FAMILIES:
        model, x = build_model(name, 20).eval(), torch.randn(2, 3, 32, 32)
    else:
        model, x = torchvision_models[name], torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with probe(model, metrics=("response", "gradient")) as session:
            out = model(x)
        again = model(x)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert _hooks(model) == 0
    df = session.table()
    blocks = anatomy(model).blocks
    assert set(df.kind) >= {"layer", "branch", "shortcut", "out", "ratio"}
    assert df[df.kind == "branch"].site.nunique() == len(blocks)  # every block measured
    assert df.value.notna().all()


# -- sites measure what the anatomy defines ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_each_site_records_the_anatomy_value_it_names(family):
    torch.manual_seed(1)
    model = build_model(family, 14).eval()
    anat = anatomy(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), probe(model, raw=True) as session:
        model(x)
    with torch.no_grad():
        h = anat.stem(x)
        for blk in anat.blocks:
            expected = {"branch": blk.branch(h), "shortcut": blk.shortcut(h), "out": blk.forward(h)}
            if blk.gate_module is not None:
                expected["gate"] = blk.gate(h)
            for kind, value in expected.items():
                assert torch.equal(session.raw(f"{blk.name}.{kind}"), value), (blk.name, kind)
            h = expected["out"]
    st = session.stats["stage2.block1.shortcut"]
    raw = session.raw("stage2.block1.shortcut").double()
    torch.testing.assert_close(st.global_std, raw.std(), rtol=1e-6, atol=0)


def test_torchvision_inplace_blocks_are_measured_before_their_inplace_ops(torchvision_models):
    """BN outputs are later modified by ReLU(inplace) and ``out += identity``; the probe must not see that."""
    torch.manual_seed(2)
    model = torchvision_models["resnet50"]
    anat = anatomy(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), probe(model, sites=["stage1.block1.*", "stage2.block2.*"]) as session:
        model(x)
    with torch.no_grad():  # the reference, without any in-place op
        h = anat.stem(x)
        ref = {}
        for blk in anat.blocks[:5]:
            b = blk.module
            o1 = b.bn1(b.conv1(h))
            o2 = b.bn2(b.conv2(F.relu(o1)))
            o3 = b.bn3(b.conv3(F.relu(o2)))
            s = h if b.downsample is None else b.downsample(h)
            out = F.relu(o3 + s)
            ref[blk.name] = {"branch.conv1": o1, "branch.conv2": o2, "branch.conv3": o3, "branch": o3,
                             "shortcut": s, "out": out}
            h = out
    df = session.table()
    for bname in ("stage1.block1", "stage2.block2"):
        for part, t in ref[bname].items():
            t = t.double()
            per_channel = t.transpose(0, 1).reshape(t.shape[1], -1)
            site = f"{bname}.{part}"
            assert _value(df, site, "std") == pytest.approx(t.std().item(), rel=1e-5), site
            assert _value(df, site, "channel_std_mean") == pytest.approx(
                per_channel.std(dim=1).mean().item(), rel=1e-5), site
            assert _value(df, site, "mean") == pytest.approx(t.mean().item(), rel=1e-5, abs=1e-6), site
            assert _value(df, site, "rms") == pytest.approx(t.square().mean().sqrt().item(), rel=1e-5), site
            assert _value(df, site, "count") == t.numel()
        ratio = ref[bname]["branch"].double().norm() / ref[bname]["shortcut"].double().norm()
        assert _value(df, bname, "norm_ratio", "ratio") == pytest.approx(ratio.item(), rel=1e-5)
    assert df.loc[df.site == "stage1.block1.branch.conv1", "path"].iloc[0] == "layer1.0.bn1"
    assert bool(df.loc[df.site == "stage1.block1.shortcut", "downsampling"].iloc[0])  # Bottleneck layer1.0


def test_highway_gate_mean_and_saturation_follow_their_definitions():
    torch.manual_seed(3)
    model = build_model("highway", 14).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), probe(model, sites="*.gate", raw=True) as session:
        model(x)
    df = session.table()
    t = session.raw("stage2.block2.gate").double()
    assert _value(df, "stage2.block2.gate", "mean") == pytest.approx(t.mean().item(), rel=1e-6)
    frac = ((t < 0.1) | (t > 0.9)).double().mean().item()
    assert _value(df, "stage2.block2.gate", "saturated_fraction") == pytest.approx(frac, rel=1e-12)


# -- gradients -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["residual", "plain", "highway", "resnet18"])
def test_gradient_norms_equal_direct_grad_and_autograd_of_block_outputs(name, torchvision_models):
    torch.manual_seed(4)
    model = (torchvision_models[name] if name in torchvision_models else build_model(name, 14)).train()
    anat = anatomy(model)
    x = torch.randn(2, 3, 32, 32)

    def forward():
        outs, h = [], anat.stem(x)
        for blk in anat.blocks:
            h = blk.module(h)
            outs.append(h)
        return anat.head(h), outs

    state = {k: v.clone() for k, v in model.state_dict().items()}
    logits, outs = forward()
    act_ref = torch.autograd.grad(F.cross_entropy(logits, torch.arange(2)), outs)
    model.load_state_dict(state)  # BN running statistics back to where they were
    with probe(model, metrics=("response", "gradient")) as session:
        logits2, _ = forward()
        F.cross_entropy(logits2, torch.arange(2)).backward()
        session.record_gradients(step=7)
    assert torch.equal(logits, logits2)
    df = session.table()
    grads = df[df.kind == "gradient"]
    assert set(grads.step) == {7}
    for blk, g in zip(anat.blocks, act_ref):
        direct = torch.sqrt(sum(p.grad.double().square().sum() for p in blk.module.parameters()))
        assert _value(grads, blk.name, "param_grad_norm") == pytest.approx(direct.item(), rel=1e-5)
        assert _value(grads, f"{blk.name}.out", "activation_grad_norm") == pytest.approx(
            g.double().norm().item(), rel=1e-5)
        weights = torch.sqrt(sum(p.detach().double().square().sum() for p in blk.module.parameters()))
        assert _value(grads, blk.name, "param_norm") == pytest.approx(weights.item(), rel=1e-12)
        assert _value(grads, blk.name, "param_count") == sum(p.numel() for p in blk.module.parameters())
        assert _value(grads, f"{blk.name}.out", "activation_count") == g.numel()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    model.eval()


def test_activation_gradient_norm_of_a_large_float32_batch_matches_float64():
    """A million float32 values per block output: the probe's norm is the float64 norm of the
    gradient up to float32 rounding (its float32 pieces are short sums, added in float64)."""
    torch.manual_seed(5)
    model = build_model("residual", 8).train()
    outs = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)
    hooks = [b.module.register_forward_hook(keep) for b in anatomy(model).blocks]
    try:
        with probe(model, metrics="gradient") as session:
            F.cross_entropy(model(torch.randn(64, 3, 32, 32)), torch.randint(0, 10, (64,))).backward()
            session.record_gradients()
    finally:
        for h in hooks:
            h.remove()
    df = session.table()
    for blk, g in zip(anatomy(model).blocks, [o.grad for o in outs]):
        assert g.numel() >= 2 ** 18
        # float32 pieces, one per (example, channel), added in float64: float32 rounding, not ~1e-4
        assert _value(df, f"{blk.name}.out", "activation_grad_norm") == pytest.approx(
            g.double().norm().item(), rel=1e-6)
    model.zero_grad(set_to_none=True)


def test_a_nested_gradient_session_reads_the_taken_taps_by_hooks_and_agrees_with_them():
    """The outer session holds every block's gradient tap; a session opened inside it reads the same
    gradients by hooks. Both give the same sums, also when the tap is closed before ``record``."""
    torch.manual_seed(11)
    model = build_model("highway", 8).train()
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))
    blocks = len(anatomy(model).blocks)
    with probe(model, metrics="gradient") as outer:
        with probe(model, metrics="gradient") as inner:
            assert outer.gradient.tapped == [True] * blocks and inner.gradient.tapped == [False] * blocks
            assert _hooks(model) == blocks and _taps(model) == blocks
            for _ in range(2):  # two backward passes add up
                F.cross_entropy(model(x), y).backward()
            outer.arm(gradient=False)  # closes the taps; what they measured waits for record
            assert _taps(model) == 0
            outer.record_gradients()
            inner.record_gradients()
        assert _hooks(model) == 0
    keys = ["site", "metric"]
    a, b = (s.table().set_index(keys)["value"].sort_index() for s in (outer, inner))
    pd.testing.assert_series_equal(a, b, rtol=0, atol=0)
    assert (a.xs("activation_grad_norm", level="metric") > 0).all()
    model.zero_grad(set_to_none=True)


def test_a_tap_is_skipped_without_a_backward_pass(monkeypatch):
    """With gradients disabled the block returns its output as is, sink or not."""
    from resnet_probe.models.gradient_tap import GradientTap

    def refuse(*args):
        raise AssertionError("GradientTap ran")
    model = build_model("residual", 8)
    x = torch.randn(2, 3, 32, 32)
    with probe(model, metrics="gradient"):
        monkeypatch.setattr(GradientTap, "apply", refuse)
        with torch.no_grad():
            model(x)
        with pytest.raises(AssertionError, match="GradientTap ran"):
            model(x)


@pytest.mark.parametrize("name", ["residual", "resnet18"])
def test_the_first_nonfinite_gradient_is_the_last_block_output(name, torchvision_models):
    """Backward reaches the last block first: taps and hooks both report that block's output."""
    model = (torchvision_models[name] if name in torchvision_models else build_model(name, 8)).train()
    last = anatomy(model).blocks[-1].name
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="non-finite"), probe(model, metrics="gradient") as session:
        (model(torch.randn(2, 3, 32, 32)).sum() * float("nan")).backward()
        session.record_gradients()
    assert session.nonfinite == f"{last}.out (activation gradient)"
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    model.eval()


# -- session ownership: exact handles, nesting, failure, notebooks ---------------------------------------
def test_unknown_site_raises_listing_the_valid_sites():
    model = build_model("residual", 8)
    with pytest.raises(ValueError, match=r"stage9\.block1\.branch.*valid sites:.*stage1\.block1\.branch\.conv1"):
        probe(model, sites=["stage1.*.branch", "stage9.block1.branch"])
    with pytest.raises(ValueError, match="valid metrics: response, gradient"):
        probe(model, metrics=("activations",))
    assert _hooks(model) == 0
    assert "stage3.block1.shortcut" in site_names(model)


def test_nested_sessions_both_record_and_remove_only_their_own_hooks():
    torch.manual_seed(5)
    model = build_model("plain", 14).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        with probe(model) as outer:
            model(x)
            n_outer = _hooks(model)
            with probe(model, sites="stage2.*") as inner:
                model(x)
            assert _hooks(model) == n_outer
            model(x)
        assert _hooks(model) == 0
        with probe(model) as alone:
            model(x)
    a, b, c = outer.table(), inner.table(), alone.table()
    site = "stage2.block1.shortcut"  # plain nets: the unused parameter-free shortcut, evaluated once per session
    assert _value(a, site, "count") == 3 * _value(c, site, "count")
    assert _value(b, site, "count") == _value(c, site, "count")
    for metric in ("mean", "rms"):  # the outer session saw the same batch three times
        assert _value(a, site, metric) == pytest.approx(_value(c, site, metric), rel=1e-9)
    for metric in ("std", "channel_std_mean", "mean", "rms"):
        assert _value(b, site, metric) == pytest.approx(_value(c, site, metric), rel=1e-9)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("error", [_Stop, KeyboardInterrupt])
def test_no_hook_remains_when_forward_raises(error):
    model = build_model("residual", 14)
    conv = model.stage2[1].branch.conv1

    def boom(*args):
        raise error("stop inside forward")
    conv.forward = boom
    try:
        with pytest.raises(error):
            with probe(model, metrics=("response", "gradient")):
                model(torch.randn(2, 3, 32, 32))
    finally:
        del conv.forward
    assert _hooks(model) == 0


def test_attaching_is_all_or_nothing(monkeypatch):
    model = build_model("residual", 14)
    target = model.stage2[0].branch.bn2
    original = target.register_forward_hook

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot register")
    monkeypatch.setattr(target, "register_forward_hook", refuse)
    with pytest.raises(RuntimeError, match="cannot register"):
        probe(model)
    assert _hooks(model) == 0
    monkeypatch.setattr(target, "register_forward_hook", original)


def test_close_is_idempotent_and_a_dropped_session_removes_its_hooks():
    model = build_model("residual", 8)
    session = probe(model)
    n = _hooks(model)
    assert n > 0
    session = probe(model)  # re-running a notebook cell: the first session is dropped, not stacked
    gc.collect()
    assert _hooks(model) == n
    session.close()
    session.close()
    assert session.closed and _hooks(model) == 0
    gradients = probe(model, metrics="gradient")
    assert _taps(model) == len(anatomy(model).blocks)
    del gradients
    gc.collect()
    assert _taps(model) == 0


def _taps(model: nn.Module) -> int:
    """Blocks whose gradient tap holds a sink."""
    return sum(b.module.grad_sink is not None for b in anatomy(model).blocks)


def test_a_disarmed_probe_has_no_hooks_and_records_only_while_armed():
    """Passes while disarmed leave no trace: the results equal those of sessions open only for the
    armed passes."""
    torch.manual_seed(2)
    model = build_model("residual", 8)
    x = torch.randn(4, 3, 32, 32)
    keys = ["site", "kind", "metric"]
    session = probe(model, metrics=("response", "gradient"))
    blocks = len(anatomy(model).blocks)
    assert _hooks(model) > 0 and _taps(model) == blocks
    session.arm(response=False, gradient=False)
    assert _hooks(model) == 0 and session.armed == {"response": False, "gradient": False}
    model(x).sum().backward()  # not recorded
    assert _taps(model) == 0
    session.arm(gradient=True)  # a CIFAR net's gradients are read by the blocks' taps, not by hooks
    assert _hooks(model) == 0 and _taps(model) == blocks and session.armed["gradient"]
    model.zero_grad()
    model(x).sum().backward()
    session.record_gradients()
    session.arm(response=True, gradient=False)
    with torch.no_grad():
        model(x[:3])
    session.arm(response=False)
    assert _hooks(model) == 0 and _taps(model) == 0
    table = session.table().set_index(keys)["value"].sort_index()

    with probe(model, metrics="gradient") as gradients:
        model.zero_grad()
        model(x).sum().backward()
        gradients.record_gradients()
    with torch.no_grad(), probe(model) as responses:
        model(x[:3])
    fresh = pd.concat([responses.table(), gradients.table()]).set_index(keys)["value"].sort_index()
    pd.testing.assert_series_equal(table, fresh)
    session.close()
    assert session.armed == {"response": False, "gradient": False}
    with pytest.raises(RuntimeError, match="closed"):
        session.arm(response=True)
    armed = probe(model)
    armed.close()  # closed while armed
    assert armed.armed == {"response": False}
    with pytest.raises(RuntimeError, match="closed"):
        armed.arm(response=True)
    assert _hooks(model) == 0


@pytest.mark.compiled
@pytest.mark.filterwarnings("ignore")
def test_a_model_compiled_after_the_probe_is_attached_records_the_eager_values(one_thread):
    """Hooks excluded from compilation: the same statistics (gates included) as an uncompiled run."""
    torch.manual_seed(8)
    model = build_model("highway", 8).eval()
    x = torch.randn(6, 3, 32, 32) + 0.5
    keys = ["site", "kind", "metric"]
    tables = []
    for compiled in (False, True):
        with torch.no_grad(), probe(model) as session:
            if compiled:
                model.compile()
            model(x)
            model(x[:4])
        tables.append(session.table().set_index(keys)["value"].sort_index())
    assert compiled_module(model) == "" and _hooks(model) == 0
    pd.testing.assert_series_equal(tables[1], tables[0], rtol=1e-5)


def test_a_compiled_wrapper_is_looked_through_and_compiled_parts_are_refused():
    """``torch.compile(model)`` is probed on ``model``; a block compiled in place is refused, naming it
    (hooks around it would run and hooks inside it would not)."""
    model = build_model("residual", 8)
    with probe(torch.compile(model)) as session:
        assert session.model is model and _hooks(model) > 0
    model.stage2[0].compile()
    with pytest.raises(RuntimeError, match="'stage2.0' of the model runs compiled code"):
        probe(model)
    assert _hooks(model) == 0


def test_a_gradient_tap_keeps_its_sink_across_armings():
    """The sink a block's tap writes into is one tensor for the session's lifetime (a compiled graph
    takes it as a static input: CUDA graphs re-record when its address changes), emptied by each record."""
    torch.manual_seed(6)
    model = build_model("residual", 8).train()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    blocks = [b.module for b in anatomy(model).blocks]
    sinks = []
    with probe(model, metrics="gradient") as session:
        for _ in range(3):
            session.arm(gradient=True)
            sinks.append([b.grad_sink for b in blocks])
            F.cross_entropy(model(x), y).backward()
            session.record_gradients()
            session.arm(gradient=False)
            assert all(b.grad_sink is None for b in blocks)
            model.zero_grad()
    assert all(s is first and s.data_ptr() == first.data_ptr() for step in sinks for s, first in zip(step, sinks[0]))
    norms = session.table().query("metric == 'activation_grad_norm'").pivot(index="site", columns="step",
                                                                             values="value")
    assert (norms[0] > 0).all() and (norms[1] == norms[0]).all() and (norms[2] == norms[0]).all()


def test_a_meta_model_is_refused_when_the_probe_attaches():
    model = build_model("residual", 8).to("meta")
    with pytest.raises(ValueError, match=r"the model is on the meta device .*model.to_empty\(device='cpu'\)"):
        probe(model)
    assert _hooks(model) == 0


def test_a_std_undefined_at_one_value_per_channel_warns_once_and_says_why():
    """A batch of one 4x4 image leaves stage 3 with 1x1 maps: one value per channel, no unbiased std."""
    model = build_model("residual", 8).eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(10))
    with torch.no_grad(), probe(model, sites=["stage2.block1.out", "stage3.block1.*"]) as session:
        model(x[:1])
        with pytest.warns(RuntimeWarning, match=r"channel_std_mean is NaN at stage3\.block1\.branch\.conv1, "
                                                r"stage3\.block1\.branch\.conv2, stage3\.block1\.branch and "
                                                r"2 more: each channel there has held one value .*at least two"):
            df = session.table()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert session.table().equals(df)  # said once
        assert math.isnan(_value(df, "stage3.block1.out", "channel_std_mean"))
        assert not math.isnan(_value(df, "stage3.block1.out", "std"))  # 64 values together
        assert not math.isnan(_value(df, "stage2.block1.out", "channel_std_mean"))  # 2x2 maps
        model(x[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert session.table()["value"].notna().all()  # two values per channel: defined


# -- non-finite values -------------------------------------------------------------------------------
def test_first_nonfinite_site_is_reported():
    torch.manual_seed(6)
    model = build_model("residual", 14).eval()
    with torch.no_grad():
        model.stage2[1].branch.bn1.weight[3] = float("nan")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="stage2.block2.branch.conv1"):
        with probe(model) as session:
            model(x)
    assert session.nonfinite == "stage2.block2.branch.conv1"
    with torch.no_grad(), pytest.raises(NonFiniteError) as info:
        with probe(model, strict=True):
            model(x)
    assert info.value.site == "stage2.block2.branch.conv1"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with probe(model, sites="stage1.*") as clean:
            model(x)
    assert clean.nonfinite is None


# -- results ------------------------------------------------------------------------------------------
def test_state_memory_is_independent_of_the_number_of_examples():
    model = build_model("residual", 8).eval()
    sizes = []
    for n in (2, 16):
        with torch.no_grad(), probe(model) as session:
            model(torch.randn(n, 3, 32, 32))
        sizes.append(session.state_bytes())
    assert sizes[0] == sizes[1] > 0


def test_table_is_tidy_and_renders_in_a_notebook():
    model = build_model("highway", 8).eval()
    with torch.no_grad(), probe(model) as session:
        model(torch.randn(2, 3, 32, 32))
    df = session.table()
    assert list(df.columns) == ["site", "stage", "block", "kind", "metric", "value", "downsampling", "path", "step"]
    assert set(df.kind) == {"layer", "branch", "shortcut", "out", "gate", "ratio"}
    assert {"std", "channel_std_mean", "norm_ratio", "saturated_fraction"} <= set(df.metric)
    branch = df[(df.kind == "branch") & (df.metric == "std")]
    assert list(branch.site) == ["stage1.block1.branch", "stage2.block1.branch", "stage3.block1.branch"]
    html = session._repr_html_()
    assert "<table" in html and "stage3.block1.branch" in html and "channel_std_mean" in html


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probe_matches_cpu_and_keeps_outputs_bitwise_under_bf16_autocast():
    torch.manual_seed(7)
    model = build_model("residual", 20).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad(), probe(model) as on_cpu:
        model(x)
    model, x = model.cuda(), x.cuda()
    with torch.no_grad():
        ref = model(x)
        with probe(model) as on_gpu:
            out = model(x)
        assert torch.equal(out, ref)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref16 = model(x)
            with probe(model) as in_bf16:
                out16 = model(x)
        assert torch.equal(out16, ref16)
    a, b = on_cpu.table(), on_gpu.table()
    assert a.site.tolist() == b.site.tolist()
    assert b.value.to_numpy() == pytest.approx(a.value.to_numpy(), rel=1e-3, abs=1e-5)
    c = in_bf16.table()
    assert c[c.metric == "std"].value.to_numpy() == pytest.approx(a[a.metric == "std"].value.to_numpy(), rel=0.05)
    assert next(iter(on_gpu.stats.values())).moments.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gradient_taps_of_a_model_moved_to_cuda_while_recording_equal_those_opened_there():
    """Taps opened on the CPU keep their sinks there; the norms measured on the GPU still reach them."""
    torch.manual_seed(12)
    model = build_model("residual", 8).train()
    x, y = torch.randn(4, 3, 32, 32).cuda(), torch.randint(0, 10, (4,)).cuda()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tables = []
    for opened_on_cpu in (True, False):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        if not opened_on_cpu:
            model.cuda()
        with probe(model, metrics="gradient") as session:
            model.cuda()
            F.cross_entropy(model(x), y).backward()
            session.record_gradients()
        tables.append(session.table().set_index(["site", "metric"])["value"].sort_index())
        model.cpu()
    pd.testing.assert_series_equal(tables[0], tables[1], rtol=1e-6)
