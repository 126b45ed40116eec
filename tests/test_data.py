"""Data: CIFAR-10 pack decoding, the 45k/5k split, per-image crop + flip, the resident loader and its resume."""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnet_probe.data import (CIFAR10_CLASSES, CIFAR_MEAN, CIFAR_STD, CifarDataModule, DataSource,
                               PackFormatError, ResidentLoader, SyntheticDataWarning, crop_flip,
                               crop_flip_params, default_pack_path, load_pack, load_torchvision,
                               make_synthetic, normalize, random_crop_flip, resolve_source, train_val_split,
                               write_pack)
from resnet_probe.data import resolve as resolve_mod
from resnet_probe.data import torchvision_source

PACK = default_pack_path()
needs_pack = pytest.mark.skipif(PACK is None, reason="shared CIFAR-10 JPEG pack not found")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_synthetic() -> DataSource:
    return make_synthetic(n_train=700, n_test=200, seed=0)


@pytest.fixture
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_PROBE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def windows(image: torch.Tensor, padding: int = 4) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every (dy, dx, flip) crop of the zero-padded image, built one by one."""
    padded = F.pad(image, (padding,) * 4)
    h, w = image.shape[-2:]
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            win = padded[:, dy:dy + h, dx:dx + w]
            out += [(dy, dx, False, win), (dy, dx, True, win.flip(-1))]
    return out


# ------------------------------------------------------------------ the JPEG pack

@needs_pack
def test_a_shuffled_slice_of_the_pack_has_cifar10_pixel_statistics_and_names():
    src = load_pack(PACK, limit=500, seed=0)
    assert src.train_images.shape == (500, 3, 32, 32) and src.test_images.shape == (500, 3, 32, 32)
    assert src.train_images.dtype == torch.uint8 and src.train_labels.dtype == torch.int64
    assert src.classes == CIFAR10_CLASSES and not src.synthetic
    assert set(src.train_labels.tolist()) == set(range(10)) == set(src.test_labels.tolist())
    # published CIFAR-10 channel means; 500 random images give a standard error of ~0.006
    means = src.train_images.double().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.491, 0.482, 0.447], dtype=torch.float64), atol=0.02)
    assert src.provenance()["subset_train"] == 500


@needs_pack
def test_pack_is_sorted_by_class_so_its_first_images_are_one_class():
    with np.load(PACK) as z:
        labels = z["train_labels"]
    assert len(labels) == 50_000 and np.all(np.diff(labels.astype(int)) >= 0)
    first = load_pack(PACK, train_indices=range(5), test_indices=[0])
    assert first.train_labels.tolist() == [0] * 5


@needs_pack
def test_batched_decode_of_the_pack_equals_pillow_decoding_each_file():
    from PIL import Image
    idx = [0, 4999, 12345, 31000, 49999]
    src = load_pack(PACK, train_indices=idx, test_indices=[9999], cache=False)
    with np.load(PACK) as z:
        jpeg, offsets = z["train_jpeg"], z["train_offsets"]
    for k, i in enumerate(idx):
        ref = np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
        diff = (torch.from_numpy(ref.transpose(2, 0, 1).copy()).int() - src.train_images[k].int()).abs()
        assert int(diff.max()) <= 1, (i, int(diff.max()))


def test_written_pack_round_trips_and_caches_the_full_decode(small_synthetic, tmp_path, cache_in_tmp):
    path = write_pack(tmp_path / "small.npz", small_synthetic, quality=95)
    full = load_pack(path)
    assert full.train_labels.tolist() == small_synthetic.train_labels.tolist()
    # JPEG drops the pixel noise but keeps the picture: 8x8 block means agree within 2 grey levels
    err = F.avg_pool2d(full.train_images.float() - small_synthetic.train_images.float(), 8).abs().mean()
    assert err < 2, err
    cached = sorted(p.name for p in cache_in_tmp.iterdir())
    assert len(cached) == 2 and cached[0].endswith("test.npy") and cached[1].endswith("train.npy")
    again = load_pack(path)
    assert torch.equal(again.train_images, full.train_images) and torch.equal(again.test_images, full.test_images)
    idx = [5, 3, 699, 0]
    part = load_pack(path, train_indices=idx, test_indices=[1, 2], cache=False)
    assert torch.equal(part.train_images, full.train_images[idx])
    assert torch.equal(part.train_labels, full.train_labels[idx])
    write_pack(path, make_synthetic(30, 10, seed=4))          # a changed file gets a new cache entry
    assert len(load_pack(path).train_labels) == 30 and len(list(cache_in_tmp.iterdir())) == 4


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _arrays_of(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


CORRUPTIONS = {  # damage -> what the error must say
    "garbage": "not a readable .npz",
    "missing": "missing arrays ['test_labels']",
    "offsets": "train_offsets end at",
    "labels": "train_labels must lie in 0..9",
    "jpeg": "is not a decodable JPEG",
    "shape": "decodes to shape",
}


def corrupt_pack(good: dict, bad, damage: str):
    if damage == "garbage":
        bad.write_bytes(b"this is not a zip archive" * 10)
    elif damage == "missing":
        _write_npz(bad, **{k: v for k, v in good.items() if k != "test_labels"})
    elif damage == "offsets":
        offsets = good["train_offsets"].copy()
        offsets[-1] += 5
        _write_npz(bad, **{**good, "train_offsets": offsets})
    elif damage == "labels":
        _write_npz(bad, **{**good, "train_labels": np.full_like(good["train_labels"], 12)})
    elif damage == "jpeg":
        jpeg = good["train_jpeg"].copy()
        jpeg[good["train_offsets"][3]:good["train_offsets"][4]] = 7
        _write_npz(bad, **{**good, "train_jpeg": jpeg})
    else:
        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, format="JPEG")
        blob = np.frombuffer(buf.getvalue(), dtype=np.uint8)
        _write_npz(bad, **{**good, "train_jpeg": blob, "train_offsets": np.array([0, len(blob)]),
                           "train_labels": np.array([1], dtype=np.uint8)})


def test_a_corrupt_pack_raises_an_error_naming_the_path_and_the_problem(small_synthetic, tmp_path):
    good = _arrays_of(write_pack(tmp_path / "good.npz", small_synthetic))
    for damage, expected in CORRUPTIONS.items():
        bad = tmp_path / f"bad-{damage}.npz"
        corrupt_pack(good, bad, damage)
        with pytest.raises(PackFormatError) as err:
            load_pack(bad, cache=False)
        assert str(bad) in str(err.value) and expected in str(err.value), (damage, str(err.value))
        assert isinstance(err.value, ValueError)


def test_a_missing_pack_or_unknown_spec_raises_naming_what_is_valid(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        resolve_source(f"pack={tmp_path / 'nope.npz'}")
    with pytest.raises(ValueError, match="valid forms: auto, pack, pack=PATH, torchvision"):
        resolve_source("imagenet")
    small = resolve_source("synthetic=50")
    assert small.synthetic and (len(small.train_labels), len(small.test_labels)) == (50, 10)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        load_torchvision(tmp_path / "empty", download=False)


# ------------------------------------------------------------------ resolving "auto"

@pytest.fixture
def nothing_available(tmp_path, monkeypatch):
    monkeypatch.delenv("RESNET_PROBE_DATA", raising=False)
    monkeypatch.setenv("RESNET_PROBE_CIFAR_ROOT", str(tmp_path / "no-cifar"))
    monkeypatch.setattr(resolve_mod, "pack_candidates", lambda: [tmp_path / "no-shared" / "cifar10-jpeg.npz"])
    monkeypatch.setattr(torchvision_source, "network_reachable", lambda *a, **k: False)


def test_auto_without_any_data_falls_back_to_synthetic_loudly(nothing_available, capsys):
    with pytest.warns(SyntheticDataWarning, match="FALLING BACK TO SYNTHETIC"):
        src = resolve_source("auto", synthetic_size=(100, 20))
    assert src.synthetic and src.kind == "synthetic" and src.provenance()["synthetic"] is True
    err = capsys.readouterr().err
    assert "SYNTHETIC" in err and "no-shared" in err and "no network" in err


def test_auto_follows_the_environment_variable_before_the_shared_pack(nothing_available, small_synthetic,
                                                                      tmp_path, monkeypatch, cache_in_tmp):
    path = write_pack(tmp_path / "mine.npz", small_synthetic)
    monkeypatch.setenv("RESNET_PROBE_DATA", str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SyntheticDataWarning)
        src = resolve_source("auto")
    assert src.kind == "pack" and src.path == str(path.resolve()) and len(src.train_labels) == 700
    monkeypatch.setenv("RESNET_PROBE_DATA", str(tmp_path / "typo.npz"))
    with pytest.raises(FileNotFoundError, match="RESNET_PROBE_DATA"):
        resolve_source("auto")


@needs_pack
def test_auto_finds_the_shared_pack_next_to_the_checkout():
    assert PACK.name == "cifar10-jpeg.npz" and PACK in resolve_mod.pack_candidates()


# ------------------------------------------------------------------ split

def test_the_paper_split_is_deterministic_disjoint_and_45k_5k():
    tr, va = train_val_split(50_000, 5000, seed=0)
    tr2, va2 = train_val_split(50_000, 5000, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(tr) == 45_000 and len(va) == 5000
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(50_000))
    tr3, _ = train_val_split(50_000, 5000, seed=1)
    assert not torch.equal(tr, tr3)
    sorted_labels = torch.arange(50_000) // 5000            # the pack's order: sorted by class
    assert set(sorted_labels[tr[:100]].tolist()) == set(range(10))
    assert set(sorted_labels[va].tolist()) == set(range(10))
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(100, 100)


# ------------------------------------------------------------------ augmentation

def test_every_augmented_image_is_one_window_of_its_padded_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = random_crop_flip(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == torch.uint8
    picks = []
    for i in range(len(x)):
        matches = [(dy, dx, f) for dy, dx, f, win in windows(x[i]) if torch.equal(win, y[i])]
        assert len(matches) == 1, f"image {i}: {len(matches)} matching windows"
        picks.append(matches[0])
    flips = sum(f for _, _, f in picks)
    assert 28 <= flips <= 68                                  # Binomial(96, 1/2): mean 48, sd 4.9
    assert len({(dy, dx) for dy, dx, _ in picks}) > 40        # offsets drawn per image, 81 possible
    assert {dy for dy, _, _ in picks} == set(range(9)) == {dx for _, dx, _ in picks}
    assert torch.equal(y, random_crop_flip(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(y, random_crop_flip(x, torch.Generator().manual_seed(2)))


def test_crop_flip_with_drawn_parameters_matches_a_per_image_loop():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    dy, dx, flip = crop_flip_params(16, torch.Generator().manual_seed(3))
    got = crop_flip(x, dy, dx, flip)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(16):
        ref = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(got[i], ref.flip(-1) if flip[i] else ref)


def test_normalize_is_the_cifar_standardisation():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    got = normalize(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, (x.float() / 255 - mean) / std, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the resident loader

def indexed_set(n: int = 300):
    """Images whose label is their own index, so a batch tells which examples it holds."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return images, torch.arange(n)


def test_resident_loader_on_cpu_yields_every_example_once_per_epoch_normalised():
    images, labels = indexed_set(300)
    loader = ResidentLoader(images, labels, 64, shuffle=True, augment=False, seed=0, device="cpu", num_classes=300)
    assert len(loader) == math.ceil(300 / 64)
    epochs = []
    for _ in range(2):
        ys = []
        for x, y in loader:
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 32, 32)
            torch.testing.assert_close(x, normalize(images[y]))
            ys.append(y)
        epochs.append(torch.cat(ys))
    for ep in epochs:
        assert torch.equal(ep.sort().values, torch.arange(300))
    assert not torch.equal(epochs[0], epochs[1])           # reshuffled each epoch
    for x, y in loader:                                     # leaving an epoch early ...
        break
    assert torch.equal(torch.cat([y for _, y in loader]).sort().values, torch.arange(300))  # ... starts a new one
    shards = [torch.cat([y for _, y in ResidentLoader(images, labels, 64, shuffle=True, seed=0, num_classes=300,
                                                      shard=r, num_shards=2)]) for r in range(2)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(300))   # ranks split each epoch
    uneven = [ResidentLoader(images[:299], labels[:299], 64, num_classes=300, shard=r, num_shards=3,
                             even_shards=False, restart=True) for r in range(3)]
    assert [u.examples_per_epoch for u in uneven] == [100, 100, 99]        # evaluation: no example dropped
    assert torch.equal(torch.cat([y for u in uneven for _, y in u]).sort().values, torch.arange(299))


def test_resident_loader_augments_each_image_by_its_own_window():
    images, labels = indexed_set(40)
    loader = ResidentLoader(images, labels, 40, shuffle=True, augment=True, seed=5, num_classes=40)
    x, y = next(iter(loader))
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    raw = ((x * std + mean) * 255).round().to(torch.uint8)
    for i in range(40):
        assert sum(torch.equal(win, raw[i]) for *_, win in windows(images[y[i]])) == 1


def test_resident_loader_resumes_mid_epoch_with_exactly_the_uninterrupted_batches():
    images, labels = indexed_set(130)
    make = lambda: ResidentLoader(images, labels, 32, shuffle=True, augment=True, seed=7, num_classes=130)
    reference = take(make(), 15)                           # 5 batches an epoch, 3 epochs
    for k in (2, 5, 7):                                    # mid-epoch, at the epoch boundary, in epoch 2
        first = make()
        head = take(first, k)
        state = first.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        tail = take(resumed, 15 - k)
        for (xa, ya), (xb, yb) in zip(head + tail, reference, strict=True):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert make().state_dict() != state and state["epoch"] == 1 and state["position"] == 2
    other = ResidentLoader(images, labels, 64, num_classes=130)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def take(loader, k):
    """k batches, continuing across epochs as a training loop would."""
    out = []
    while len(out) < k:
        for b in loader:
            out.append(b)
            if len(out) == k:
                break
        else:
            continue
        break
    return out


# ------------------------------------------------------------------ the DataModule

def test_datamodule_splits_without_overlap_and_both_loaders_give_normalised_batches(small_synthetic):
    for kind in ("resident", "dataloader"):
        dm = CifarDataModule.from_source(small_synthetic, val_size=100, batch_size=50, eval_batch_size=64,
                                         test_limit=150, loader=kind)
        dm.setup("fit")
        assert dm.loader_kind == kind and dm.num_classes == 10 and dm.steps_per_epoch == 12
        train = dm.train_dataloader()
        assert len(train) == dm.steps_per_epoch
        x, y = next(iter(train))
        assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert abs(float(x.mean())) < 1.5
        sizes = {name: sum(len(b[1]) for b in loader) for name, loader in
                 (("val", dm.val_dataloader()), ("test", dm.test_dataloader()))}
        assert sizes == {"val": 100, "test": 150}
    s = dm.splits()
    train_rows = {bytes(img.numpy()) for img in s["train"][0]}
    assert not any(bytes(img.numpy()) in train_rows for img in s["val"][0])
    prov = dm.provenance()
    assert prov["split"] == {"n_train": 600, "n_val": 100, "n_test": 150, "val_size": 100, "split_seed": 0,
                             "train_limit": None, "test_limit": 150}
    assert prov["synthetic"] is True and prov["loader"] == "dataloader"


def test_datamodule_defaults_to_the_stateful_resident_loader_and_is_deterministic(small_synthetic):
    def first_batches(seed):
        dm = CifarDataModule.from_source(small_synthetic, val_size=100, batch_size=64, train_limit=320, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader, ResidentLoader) and dm.loader_kind == "resident"
        return [y for _, y in loader]
    assert all(torch.equal(a, b) for a, b in zip(first_batches(0), first_batches(0)))
    assert not all(torch.equal(a, b) for a, b in zip(first_batches(0), first_batches(1)))


def test_empty_or_mismatched_data_is_rejected():
    good = dict(train_images=torch.zeros(10, 3, 32, 32, dtype=torch.uint8), train_labels=torch.arange(10),
                test_images=torch.zeros(4, 3, 32, 32, dtype=torch.uint8), test_labels=torch.arange(4))
    cases = [
        (dict(train_images=torch.zeros(10, 3, 28, 28, dtype=torch.uint8)), r"shape \(N, 3, 32, 32\)"),
        (dict(train_labels=torch.full((10,), 10)), "labels must lie in 0..9"),
        (dict(train_labels=torch.zeros(9, dtype=torch.int64)), "10 images but 9 labels"),
        (dict(train_images=torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
              train_labels=torch.zeros(0, dtype=torch.int64)), "empty"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            DataSource(name="bad", kind="synthetic", path=None, synthetic=True, classes=CIFAR10_CLASSES,
                       description="", **{**good, **bad})
    with pytest.raises(ValueError, match="valid loaders"):
        CifarDataModule(loader="fast")
    with pytest.raises(ValueError, match="val_size"):
        CifarDataModule.from_source(make_synthetic(50, 10), val_size=50).setup("fit")


def test_lightning_resumes_a_killed_run_mid_epoch_with_the_same_batches(small_synthetic, tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 32 * 32, 10)
            self.seen: list[tuple[float, list[int]]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append((float(x.double().sum()), y.tolist()))
            return F.cross_entropy(self.linear(x.flatten(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def fit(ckpt_path=None, every=None):
        dm = CifarDataModule.from_source(small_synthetic, val_size=0, batch_size=100, train_limit=500, seed=3)
        model = Recorder()
        callbacks = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1,
                                                  filename="{step}")] if every else []
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks, enable_checkpointing=bool(every),
                             limit_val_batches=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model.seen

    uninterrupted = fit(every=7)                             # 5 steps an epoch: step 7 is mid epoch 2
    resumed = fit(ckpt_path=tmp_path / "step=7.ckpt")
    assert len(uninterrupted) == 10 and resumed == uninterrupted[7:]


def test_every_validation_pass_sees_every_batch_after_the_sanity_check(small_synthetic):
    pl = pytest.importorskip("pytorch_lightning")

    class Counter(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 32 * 32, 10)
            self.val_labels: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.linear(x.flatten(1)), y)

        def on_validation_epoch_start(self):
            self.val_labels.append([])

        def validation_step(self, batch, batch_idx):
            self.val_labels[-1] += batch[1].tolist()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = CifarDataModule.from_source(small_synthetic, val_size=150, batch_size=100, eval_batch_size=50,
                                     train_limit=200, seed=3)
    model = Counter()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
    sanity, *epochs = model.val_labels
    assert len(sanity) == 100 and len(epochs) == 2           # the sanity check stops after 2 of 3 batches
    assert epochs[0] == epochs[1] and len(epochs[0]) == 150  # then every pass reads all 3, in one order
    assert epochs[0][:100] == sanity


# ------------------------------------------------------------------ synthetic data

def test_synthetic_set_is_deterministic_balanced_and_needs_texture_to_learn():
    small = [make_synthetic(100, 20, seed=s) for s in (0, 0, 1)]
    assert torch.equal(small[0].train_images, small[1].train_images)
    assert torch.equal(small[0].test_labels, small[1].test_labels)
    assert not torch.equal(small[0].train_images, small[2].train_images)
    a = make_synthetic(1000, 300, seed=0)
    assert a.train_labels.bincount().tolist() == [100] * 10 and a.test_labels.bincount().tolist() == [30] * 10

    def features(images, colour_only):
        x = images.float() / 255
        colour = x.mean(dim=(2, 3))
        if colour_only:
            return colour
        spectrum = torch.fft.rfft2(x.mean(1)).abs()[:, :, :8].flatten(1)   # horizontal frequencies 0..7
        return torch.cat([colour, spectrum], 1)

    def linear_accuracy(colour_only):
        f, ft = features(a.train_images, colour_only), features(a.test_images, colour_only)
        mu, sd = f.mean(0), f.std(0) + 1e-6
        design = torch.cat([(f - mu) / sd, torch.ones(len(f), 1)], 1)
        w = torch.linalg.solve(design.T @ design + 1e-2 * torch.eye(design.shape[1]),
                               design.T @ F.one_hot(a.train_labels, 10).float())
        pred = (torch.cat([(ft - mu) / sd, torch.ones(len(ft), 1)], 1) @ w).argmax(1)
        return float((pred == a.test_labels).float().mean())

    assert linear_accuracy(colour_only=False) > 0.9       # colour + texture: separable
    assert linear_accuracy(colour_only=True) < 0.6        # colour alone: only pairs of classes


# ------------------------------------------------------------------ GPU

@gpu
@needs_cuda
def test_gpu_crop_flip_and_resident_loader_match_the_cpu_and_do_not_sync():
    images, labels = indexed_set(512)
    x = images[:64]
    params = crop_flip_params(64, torch.Generator().manual_seed(0))
    assert torch.equal(crop_flip(x.cuda(), *(p.cuda() for p in params)).cpu(), crop_flip(x, *params))
    cpu = ResidentLoader(images, labels, 128, shuffle=True, augment=True, seed=1, num_classes=512)
    cuda = ResidentLoader(images, labels, 128, shuffle=True, augment=True, seed=1, num_classes=512, device="cuda")
    it = iter(cuda)
    batches = [next(it)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches += list(it)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (xc, yc), (xg, yg) in zip(cpu, batches):
        assert xg.is_cuda and torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu(), rtol=0, atol=1e-5)
