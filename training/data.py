"""Data sets as train/val/test splits of ([0, 1] float images, int labels), by name.

The bundled default is scikit-learn's `load_digits` (1,797 8x8 images, 10 classes), split once,
stratified by class, with a fixed seed that does not depend on the training seed:
60% train (1,078), 20% validation (359), 20% test (360). Validation calibrates early exit;
test is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

SPLIT_SEED = 20260501  # fixed: the split never moves with --seed
DIGITS_CLASSES = [str(i) for i in range(10)]


class DataError(Exception):
    """A data set cannot be read: the message names the file expected and where to get it."""


@dataclass
class DataSplits:
    """Three splits of one data set, each yielding (image (C, H, W) in [0, 1], label)."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float]  # per-channel statistics of the training split, baked into the network
    std: list[float]
    default_preset: str = "digits-cnn"
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    info: dict = field(default_factory=dict)


DatasetLoader = Callable[[Path | None], DataSplits]
_DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    def deco(fn: DatasetLoader) -> DatasetLoader:
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} is already registered")
        _DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def load_dataset(name: str, data_dir: str | Path | None = None) -> DataSplits:
    if name not in _DATASETS:
        raise DataError(f"unknown data set {name!r} (known: {', '.join(list_datasets())})")
    return _DATASETS[name](Path(data_dir) if data_dir is not None else None)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, C, H, W) images."""
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def stratified_split(labels: np.ndarray, fractions=(0.6, 0.2, 0.2), seed: int = SPLIT_SEED):
    """Index arrays (train, val, test), each holding every class in the given proportions."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, rest = train_test_split(idx, train_size=fractions[0], stratify=labels, random_state=seed)
    val_share = fractions[1] / (fractions[1] + fractions[2])
    val, test = train_test_split(rest, train_size=val_share, stratify=labels[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8)
    return images, torch.tensor(digits.target, dtype=torch.long)


def _split_in_memory(name: str, images: torch.Tensor, labels: torch.Tensor, **kw) -> DataSplits:
    tr, va, te = stratified_split(labels.numpy())
    mean, std = channel_stats(images[tr])
    return DataSplits(
        name=name,
        train=TensorDataset(images[tr], labels[tr]),
        val=TensorDataset(images[va], labels[va]),
        test=TensorDataset(images[te], labels[te]),
        class_names=DIGITS_CLASSES,
        input_shape=tuple(images.shape[1:]),
        mean=mean,
        std=std,
        **kw,
    )


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels (zero fill): small-image augmentation."""
    n, c, h, w = images.shape
    s = max_shift
    padded = F.pad(images, [s] * 4)  # (n, c, h + 2s, w + 2s)
    dy = torch.randint(0, 2 * s + 1, (n, 1, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * s + 1, (n, 1, 1, 1), generator=generator)
    rows = (dy + torch.arange(h).view(1, 1, h, 1)).expand(n, c, h, w + 2 * s)
    cols = (dx + torch.arange(w).view(1, 1, 1, w)).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)  # (n, c, h, w)


@register_dataset("digits")
def digits(data_dir: Path | None = None) -> DataSplits:
    """scikit-learn's bundled 8x8 digits."""
    images, labels = _digits_arrays()
    return _split_in_memory("digits", images, labels, default_preset="digits-cnn", augment=random_shift)


@register_dataset("digits32")
def digits32(data_dir: Path | None = None) -> DataSplits:
    """The bundled digits upscaled (bilinear) to 3x32x32, to run the cifar-sized presets on them."""
    images, labels = _digits_arrays()
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, 32, 32)
    shift = lambda x, g: random_shift(x, g, max_shift=3)  # noqa: E731
    return _split_in_memory("digits32", images, labels, default_preset="cifar-cnn", augment=shift)
