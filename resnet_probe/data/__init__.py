"""CIFAR-10 sources (JPEG pack, torchvision, synthetic), the 45k/5k split, GPU-resident augmentation, DataModule.

``CifarDataModule`` is imported on first access, so the plain-PyTorch parts load without Lightning.
"""
from .augment import CIFAR_MEAN, CIFAR_STD, crop_flip, crop_flip_params, normalize, random_crop_flip
from .loader import ResidentLoader
from .pack import PackFormatError, cache_dir, load_pack, write_pack
from .resolve import SPEC_FORMS, SyntheticDataWarning, default_pack_path, pack_candidates, resolve_source
from .source import CIFAR10_CLASSES, DataSource, check_images_labels
from .split import random_subset, train_val_split
from .synthetic import make_synthetic
from .torchvision_source import default_cifar_root, load_torchvision

__all__ = ["CIFAR10_CLASSES", "CIFAR_MEAN", "CIFAR_STD", "CifarDataModule", "DataSource", "LOADERS",
           "PackFormatError", "ResidentLoader", "SPEC_FORMS", "SyntheticDataWarning", "cache_dir",
           "check_images_labels", "crop_flip", "crop_flip_params", "default_cifar_root", "default_pack_path",
           "load_pack", "load_torchvision", "make_synthetic", "normalize", "pack_candidates",
           "random_crop_flip", "random_subset", "resolve_source", "train_val_split", "write_pack"]


def __getattr__(name: str):
    if name in ("CifarDataModule", "LOADERS"):
        from . import datamodule
        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
