"""Facts about the one-read CPU kernel behind the probes' statistics: exact float64 sums, or no kernel at all."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from resnet_probe.probes import native
from resnet_probe.probes.stats import ChannelStats, batch_moments

needs_kernel = pytest.mark.skipif(not native.available(), reason=native.status())


def _reference(x: torch.Tensor) -> torch.Tensor:
    per_channel = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return torch.stack((per_channel.sum(1), per_channel.square().sum(1)))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 5, 9, 11), (64, 16, 32, 32), (3, 4), (1, 3, 1, 1), (2, 6, 5),
                                   (4, 3, 16), (4, 3, 17)])  # planes of one and one-plus-a-tail 16-value step
def test_kernel_sums_equal_float64_sums_of_the_values(shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 2).to(dtype)
    torch.testing.assert_close(native.channel_moments(x), _reference(x), rtol=1e-13, atol=0)


@needs_kernel
def test_kernel_result_does_not_depend_on_the_thread_count():
    x = torch.randn(32, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.channel_moments(x)
        torch.set_num_threads(2)
        two = native.channel_moments(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_kernel_sums_stay_exact_when_the_mean_dwarfs_the_std():
    """float32 values of mean 1000 and std 1: float64 sums keep the std to 1e-9; float32 sums would not."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 4, 8, 8, generator=g) + 1000.0 for n in (16, 5, 9)]
    st = ChannelStats()
    for b in batches:
        count, m = batch_moments(b, {}, centred=False)
        st.add_moments(count, m)
    ref = torch.cat(batches).double()
    torch.testing.assert_close(st.global_std, ref.std(), rtol=1e-9, atol=0)
    torch.testing.assert_close(st.channel_std, ref.transpose(0, 1).reshape(4, -1).std(1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("x", [torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last),
                               torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16), torch.zeros(2, 3, 4, 4)[:, :2],
                               torch.zeros(0, 3, 4), torch.zeros(5)], ids=["channels_last", "bfloat16",
                                                                          "strided", "empty", "1-d"])
def test_kernel_declines_what_it_cannot_read_and_torch_reduces_it(x):
    assert native.channel_moments(x) is None
    if x.dim() >= 2:
        count, m = batch_moments(x)
        torch.testing.assert_close(m, _reference(x), rtol=1e-6, atol=0)


def test_switched_off_kernel_leaves_the_raw_sums_to_torch(monkeypatch):
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(3)) + 2  # sums far from 0
    monkeypatch.setenv("RESNET_PROBE_NATIVE", "0")
    assert native.channel_moments(x) is None and "RESNET_PROBE_NATIVE=0" in native.status()
    scratch = {}
    count, m = batch_moments(x, scratch, centred=False)
    assert count == 100 and all(key[0] != "native" for key in scratch)
    torch.testing.assert_close(m, _reference(x), rtol=1e-6, atol=0)


def test_a_failing_compiler_leaves_no_file_and_the_probes_fall_back(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: fatal error: out of luck' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("RESNET_PROBE_NATIVE", "1")
    monkeypatch.setenv("RESNET_PROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(3)) + 2  # sums far from 0
    assert native.channel_moments(x) is None and not native.available()
    assert "out of luck" in native.status() and "PyTorch reductions" in native.status()
    assert os.listdir(tmp_path / "cache" / "native") == []  # no half-written library
    count, m = batch_moments(x, {}, centred=False)
    torch.testing.assert_close(m, _reference(x), rtol=1e-6, atol=0)


@needs_kernel
def test_kernel_is_built_once_into_the_cache_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_PROBE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    assert native.available()
    (built,) = (tmp_path / "native").iterdir()
    first = built.stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", {})
    assert native.available() and str(built) in native.status()
    assert built.stat().st_mtime_ns == first and len(list((tmp_path / "native").iterdir())) == 1
