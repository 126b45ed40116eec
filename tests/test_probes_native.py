"""Facts about the one-read CPU kernel behind the probes' statistics: exact float64 sums, or no kernel at all."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

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
    built, record = _built(tmp_path)
    assert record.read_text().strip() == hashlib.sha256(built.read_bytes()).hexdigest()
    assert stat.S_IMODE(built.stat().st_mode) & 0o022 == 0  # whatever the umask
    assert stat.S_IMODE((tmp_path / "native").stat().st_mode) == 0o700
    first = built.stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", {})
    assert native.available() and str(built) in native.status()
    assert built.stat().st_mtime_ns == first and _built(tmp_path) == (built, record)


# -- a cache that cannot run someone else's code ----------------------------------------------------
def _built(cache) -> tuple:
    """The one library in ``cache`` and its sha256 record (nothing else is there)."""
    files = sorted((cache / "native").iterdir())
    assert [f.suffix for f in files] == [".so", ".sha256"], files
    return tuple(files)


def _compile_library(source: str, path, tmp_path) -> None:
    """Compile C ``source`` into the shared library ``path`` and write the sha256 record the cache
    keeps beside a library, as whoever planted it could."""
    c_file = tmp_path / "planted.c"
    c_file.write_text(source)
    subprocess.run([native._compiler(), "-shared", "-fPIC", str(c_file), "-o", str(path)], check=True,
                   capture_output=True)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")


def _has_compiler() -> bool:
    try:
        native._compiler()
    except RuntimeError:
        return False
    return True


needs_compiler = pytest.mark.skipif(not _has_compiler(), reason="no C compiler")


def _use_cache(monkeypatch, cache):
    monkeypatch.setenv("RESNET_PROBE_CACHE", str(cache))
    monkeypatch.setenv("RESNET_PROBE_NATIVE", "1")
    monkeypatch.setattr(native, "_loaded", {})


def _falls_back_to_torch():
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(3)) + 2  # sums far from 0
    assert native.channel_moments(x) is None and not native.available()
    count, m = batch_moments(x, {}, centred=False)
    torch.testing.assert_close(m, _reference(x), rtol=1e-6, atol=0)


def _chown_away(path):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(path, 12345, -1)


@needs_compiler
@pytest.mark.parametrize("how", ["world-writable folder", "group-writable folder", "group-writable library",
                                 "another user's folder", "another user's library"])
def test_a_library_planted_where_others_can_write_is_never_loaded(monkeypatch, tmp_path, how):
    """The planted library runs code when loaded (a constructor writing a marker file); the probes
    refuse the cache, say why, and reduce with PyTorch, and the marker never appears."""
    marker = tmp_path / "marker"
    source = ('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {\n'
              f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n')
    cache = tmp_path / "cache"
    folder = cache / "native"
    folder.mkdir(parents=True, mode=0o700)
    _use_cache(monkeypatch, cache)
    paths = native.library_paths()
    for path in paths:
        _compile_library(source, path, tmp_path)
    # the plant works: any process that loads it runs its code
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(paths[0])!r})"], check=True)
    assert marker.read_text() == "ran"
    marker.unlink()
    if how == "world-writable folder":
        folder.chmod(0o777)
    elif how == "group-writable folder":
        folder.chmod(0o770)
    elif how == "group-writable library":
        paths[0].chmod(0o775)
    elif how == "another user's folder":
        _chown_away(folder)
    else:
        _chown_away(paths[0])
    _falls_back_to_torch()
    why = "group- or world-writable" if "writable" in how else "belongs to user id 12345"
    assert why in native.status() and "PyTorch reductions" in native.status()
    assert not marker.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for q in paths
                                                              for p in (q, q.with_name(q.name + ".sha256")))


@needs_compiler
def test_a_library_without_the_kernel_symbols_falls_back(monkeypatch, tmp_path):
    _use_cache(monkeypatch, tmp_path)
    (tmp_path / "native").mkdir(mode=0o700)
    first = native.library_paths()[0]
    _compile_library("int unrelated(void) { return 0; }\n", first, tmp_path)
    _falls_back_to_torch()
    assert "has no symbol channel_moments_f32" in native.status()
    assert native.status() == native.status()  # decided once: nothing is rebuilt or reloaded


@needs_kernel
def test_a_read_only_cache_serves_its_verified_library(monkeypatch, tmp_path):
    _use_cache(monkeypatch, tmp_path)
    assert native.available()
    built, record = _built(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (built, record)}
    for path, mode in ((built, 0o555), (record, 0o444), (tmp_path / "native", 0o555)):
        path.chmod(mode)

    def no_build(*args):
        raise AssertionError("a verified library was rebuilt")
    monkeypatch.setattr(native, "_compile", no_build)
    monkeypatch.setattr(native, "_loaded", {})
    try:
        assert native.available() and str(built) in native.status()
        x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(native.channel_moments(x), _reference(x), rtol=1e-13, atol=0)
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "native").iterdir()} == before
    finally:
        (tmp_path / "native").chmod(0o700)


@needs_kernel
@pytest.mark.parametrize("damage", ["library changed", "record missing"])
def test_a_library_that_does_not_match_its_record_is_rebuilt(monkeypatch, tmp_path, damage):
    _use_cache(monkeypatch, tmp_path)
    assert native.available()
    built, record = _built(tmp_path)
    if damage == "library changed":  # replaced, not written in place: this process has it mapped
        other = tmp_path / "other"
        other.write_bytes(b"not the library that was built")
        os.replace(other, built)
    else:
        record.unlink()
    monkeypatch.setattr(native, "_loaded", {})
    assert native.available() and str(built) in native.status()
    assert _built(tmp_path) == (built, record)
    assert record.read_text().strip() == hashlib.sha256(built.read_bytes()).hexdigest()


@needs_kernel
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_the_fallback_gives_the_kernels_statistics(monkeypatch, dtype, rtol):
    """float64 activations: both paths add in float64, equal up to its rounding; float32 ones: PyTorch
    reduces each (example, channel) piece in float32, so they agree to float32 rounding."""
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randn(n, 6, 9, 7, generator=g) * torch.linspace(0.5, 4, 6).view(1, 6, 1, 1) + 1.5).to(dtype)
               for n in (5, 2, 8)]
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("RESNET_PROBE_NATIVE", switch)
        st = ChannelStats()
        for b in batches:
            st.update(b)
        results.append(st)
    kernel, fallback = results
    assert kernel.count == fallback.count
    torch.testing.assert_close(fallback.moments, kernel.moments, rtol=rtol, atol=0)
    torch.testing.assert_close(fallback.summary(), kernel.summary(), rtol=rtol, atol=0)
    torch.testing.assert_close(fallback.channel_std, kernel.channel_std, rtol=rtol, atol=0)
