"""Data sets as train/val/test splits of ([0, 1] float images, int labels), by name.

The bundled default is scikit-learn's `load_digits` (1,797 8x8 images, 10 classes), split once,
stratified by class, with a fixed seed that does not depend on the training seed:
60% train (1,078), 20% validation (359), 20% test (360). Validation calibrates early exit;
test is reported.

Standard data sets are read by training/readers.py from `--data-dir`, by default the first of
`$HFF_DATA_DIR/<name>`, `data/<name>` and Debian's `/usr/share/datasets/<name>` that has them.
Their official test split is the test split; as none of them has an official validation split,
a fixed stratified 10% of the official training split (seed SPLIT_SEED) is carved off as
validation and the rest trains (CIFAR: 45,000 / 5,000; MNIST-family: 54,000 / 6,000).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from contract.model_dir import RESIZE

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
    # TrainConfig fields of the data set's recipe (HFF and backprop), under the command's flags
    train_defaults: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


# loader(data_dir, image_size): image_size (H, W) is the preset's, for sources of any size.
DatasetLoader = Callable[[Path | None, tuple[int, int] | None], DataSplits]
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


def load_dataset(name: str, data_dir: str | Path | None = None,
                 image_size: tuple[int, int] | None = None) -> DataSplits:
    """Splits of data set `name`; `image_size` (H, W) resizes sources without a fixed size."""
    if name not in _DATASETS:
        raise DataError(f"unknown data set {name!r} (known: {', '.join(list_datasets())})")
    return _DATASETS[name](Path(data_dir) if data_dir is not None else None,
                           tuple(image_size) if image_size is not None else None)


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
def digits(data_dir: Path | None = None, image_size=None) -> DataSplits:
    """scikit-learn's bundled 8x8 digits."""
    images, labels = _digits_arrays()
    return _split_in_memory("digits", images, labels, default_preset="digits-cnn", augment=random_shift)


@register_dataset("digits32")
def digits32(data_dir: Path | None = None, image_size=None) -> DataSplits:
    """The bundled digits upscaled to 3x32x32, to run the cifar-sized presets on them."""
    images, labels = _digits_arrays()
    # the resampling the manifest records, so a served 8x8 upload is upscaled the same way
    images = F.interpolate(images, size=(32, 32), mode=RESIZE, align_corners=False)
    images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, 32, 32)
    shift = lambda x, g: random_shift(x, g, max_shift=3)  # noqa: E731
    return _split_in_memory("digits32", images, labels, default_preset="cifar-cnn", augment=shift)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Random crop of the zero-padded image (pad pixels a side) plus a random horizontal flip."""
    out = random_shift(images, generator, max_shift=pad)
    if flip:
        mirror = torch.rand(len(out), generator=generator) < 0.5
        out = torch.where(mirror.view(-1, 1, 1, 1), out.flip(3), out)
    return out


def crop_flip_for(size: int, flip: bool = True) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The usual augmentation for size x size images: pad size/8 (4 for 32x32, 8 for 64x64)."""
    return partial(random_crop_flip, pad=max(1, size // 8), flip=flip)


def random_erasing(images: torch.Tensor, generator: torch.Generator, p: float,
                   area: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) on a whole batch: each image, with probability p, gets
    one rectangle of `area` (share of the image) and aspect `ratio` filled with uniform noise.

    Rectangles that would not fit are clamped to the image rather than redrawn.
    """
    n, c, h, w = images.shape
    u = torch.rand(5, n, generator=generator)
    apply = u[0] < p
    size = h * w * (area[0] + (area[1] - area[0]) * u[1])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[2])
    eh = (size * aspect).sqrt().round().clamp(1, h).long()
    ew = (size / aspect).sqrt().round().clamp(1, w).long()
    top = (u[3] * (h - eh + 1)).long()
    left = (u[4] * (w - ew + 1)).long()
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)))
    mask = (inside & apply.view(n, 1, 1)).unsqueeze(1)  # (n, 1, h, w): every channel
    noise = torch.rand(images.shape, generator=generator, dtype=images.dtype)
    return torch.where(mask, noise, images)


VAL_FRACTION = 0.1  # carved from the official training split when a data set has no val split


def carve_val(labels: np.ndarray, fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) index arrays: a fixed stratified `fraction` of `labels` becomes validation."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        train, val = train_test_split(idx, test_size=fraction, stratify=labels,
                                      random_state=SPLIT_SEED)
    except ValueError:  # a class too small to stratify (tiny trees): a plain seeded split
        train, val = train_test_split(idx, test_size=fraction, random_state=SPLIT_SEED)
    return np.sort(train), np.sort(val)


DATA_DIR_ENV = "HFF_DATA_DIR"  # a folder holding one sub-folder per data set, named as --dataset
SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages install


def default_data_dirs(name: str) -> list[Path]:
    """Where data set `name` is looked for when --data-dir is not given, in order."""
    dirs = [Path(os.environ[DATA_DIR_ENV]) / name] if os.environ.get(DATA_DIR_ENV) else []
    return dirs + [Path("data") / name, SYSTEM_DATA_DIR / name]


def _default_dir(name: str, data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir
    return next((d for d in default_data_dirs(name) if d.exists()), Path("data") / name)


def _array_splits(name: str, train_x, train_y, test_x, test_y, class_names, **kw) -> DataSplits:
    from training.readers import ArrayDataset, uint8_stats

    tr, va = carve_val(train_y)
    mean, std = uint8_stats(train_x[tr])
    return DataSplits(
        name=name,
        train=ArrayDataset(train_x[tr], train_y[tr]),
        val=ArrayDataset(train_x[va], train_y[va]),
        test=ArrayDataset(test_x, test_y),
        class_names=class_names,
        input_shape=tuple(int(v) for v in train_x.shape[1:]),
        mean=mean,
        std=std,
        info={"train": len(tr), "val": len(va), "test": len(test_y)},
        **kw,
    )


MNIST_CLASSES = [str(i) for i in range(10)]
# Fashion-MNIST's training recipe with its default preset: why each value, measured, is in the
# docstrings of model.config.fmnist_vgg and fmnist_cnn. micro_batches (HFF's only; backprop
# trains whole batches): block 1 a quarter of the batch at a time, with the same gradient, so
# HFF's training memory is 0.58x backprop's instead of 0.66x (training/micro_batch.py).
FASHION_RECIPE = {"epochs": 24, "batch_size": 128, "micro_batches": 4}


def fashion_recipe() -> dict:
    """FASHION_RECIPE, with the training step in bf16 on a CPU that computes it natively (on
    CUDA it is already; a CPU without it would emulate bf16, slower than fp32)."""
    from training.trainer import native_bf16

    return {**FASHION_RECIPE, **({"precision": "bf16"} if native_bf16() else {})}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def _idx_folder(root: Path) -> Path | None:
    """The folder under `root` holding the IDX files: the plain folder, or torchvision's layout
    (<root>/<Name>/raw) when a user already has it; None when there are none."""
    candidates = [root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    return next((c for c in candidates if any(c.glob("train-images*"))), None)


def _find_idx_folder(name: str, data_dir: Path | None, get_it: str) -> Path:
    """--data-dir when given (its own errors name the missing file); else the first default
    location that holds the files, or one line saying where we looked and how to get them."""
    if data_dir is not None:
        return _idx_folder(data_dir) or data_dir
    looked = default_data_dirs(name)
    for root in looked:
        if (folder := _idx_folder(root)) is not None:
            return folder
    env = "" if os.environ.get(DATA_DIR_ENV) else f" (${DATA_DIR_ENV} is not set)"
    raise DataError(f"{name} not found in {', '.join(map(str, looked))}{env}: {get_it}, "
                    f"or pass --data-dir")


def _mnist_family(name: str, data_dir: Path | None, source: str, class_names: list[str],
                  flip: bool, get_it: str, default_preset: str = "mnist-cnn",
                  train_defaults: dict | None = None) -> DataSplits:
    from training.readers import read_mnist_split

    folder = _find_idx_folder(name, data_dir, get_it)
    what = f"{name} training images"
    train_x, train_y = read_mnist_split(folder, "train", source, what)
    test_x, test_y = read_mnist_split(folder, "t10k", source, f"{name} test images")
    for where, labels in (("train", train_y), ("t10k", test_y)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(f"{folder}/{where}-labels: a label lies outside 0..{len(class_names) - 1}")
    return _array_splits(name, train_x, train_y, test_x, test_y, class_names,
                         default_preset=default_preset, train_defaults=train_defaults or {},
                         augment=partial(random_crop_flip, pad=2, flip=flip))


@register_dataset("mnist")
def mnist(data_dir: Path | None = None, image_size=None) -> DataSplits:
    """MNIST from its four IDX files (gzipped or not)."""
    from training.readers import MNIST_SOURCE

    # No flip: a mirrored digit is a different glyph.
    return _mnist_family("mnist", data_dir, MNIST_SOURCE, MNIST_CLASSES, flip=False,
                         get_it=f"download the four IDX files from {MNIST_SOURCE} into one of them")


@register_dataset("fashion-mnist")
def fashion_mnist(data_dir: Path | None = None, image_size=None) -> DataSplits:
    """Fashion-MNIST: the same four IDX file names as MNIST."""
    from training.readers import FASHION_SOURCE

    return _mnist_family("fashion-mnist", data_dir, FASHION_SOURCE, FASHION_CLASSES, flip=True,
                         get_it=("install it with `apt-get install dataset-fashion-mnist` (Debian), "
                                 f"or download the four IDX files from {FASHION_SOURCE} into one of them"),
                         default_preset="fmnist-vgg", train_defaults=fashion_recipe())


def _cifar(name: str, data_dir: Path | None, layout_name: str) -> DataSplits:
    from training import readers

    layout = getattr(readers, layout_name)
    train_x, train_y, test_x, test_y, classes = readers.read_cifar(_default_dir(name, data_dir), layout)
    return _array_splits(name, train_x, train_y, test_x, test_y, classes,
                         default_preset="cifar-cnn", augment=crop_flip_for(32))


@register_dataset("cifar10")
def cifar10(data_dir: Path | None = None, image_size=None) -> DataSplits:
    """CIFAR-10 python batches: the extracted cifar-10-batches-py/ or cifar-10-python.tar.gz."""
    return _cifar("cifar10", data_dir, "CIFAR10")


@register_dataset("cifar100")
def cifar100(data_dir: Path | None = None, image_size=None) -> DataSplits:
    """CIFAR-100 (fine labels): the extracted cifar-100-python/ or cifar-100-python.tar.gz."""
    return _cifar("cifar100", data_dir, "CIFAR100")


IMAGEFOLDER_SIZE = (64, 64)  # when no preset says otherwise: Tiny ImageNet's size


@register_dataset("imagefolder")
def imagefolder(data_dir: Path | None = None, image_size=None) -> DataSplits:
    """An ImageFolder tree, decoded with Pillow and resized to the preset's input size.

    `<dir>/train/<class>/<image>` trains (any depth below the class folder, so Tiny ImageNet's
    `train/<wnid>/images/` works). A held-out `<dir>/val/` (same layout, or Tiny ImageNet's
    `val/images/` + `val_annotations.txt`) is the test split; validation is a fixed stratified 10%
    of train. With no `train/` folder, `<dir>` itself is the class tree and validation and test are
    each a fixed stratified 10%.
    """
    from training.readers import (
        IMAGEFOLDER_SOURCE,
        ImageFileDataset,
        image_file_stats,
        read_val_annotations,
        scan_image_folder,
    )

    root = _default_dir("imagefolder", data_dir)
    if not root.is_dir():
        raise DataError(f"expected the folder {root} — {IMAGEFOLDER_SOURCE}")
    size = tuple(image_size) if image_size is not None else IMAGEFOLDER_SIZE
    train_root = root / "train" if (root / "train").is_dir() else root
    samples, classes = scan_image_folder(train_root)
    labels = np.array([label for _, label in samples], dtype=np.int64)
    val_root = root / "val"
    if train_root != root and val_root.is_dir():
        if (val_root / "val_annotations.txt").is_file():
            test_samples = read_val_annotations(val_root, classes)
        else:
            test_samples, _ = scan_image_folder(val_root, classes)
        tr, va = carve_val(labels)
    else:
        tr, rest = carve_val(labels, fraction=2 * VAL_FRACTION)
        rest_val, rest_test = carve_val(labels[rest], fraction=0.5)
        va, test_samples = rest[rest_val], [samples[i] for i in rest[rest_test]]
    train = ImageFileDataset([samples[i] for i in tr], size)
    mean, std = image_file_stats(train)
    return DataSplits(
        name="imagefolder",
        train=train,
        val=ImageFileDataset([samples[i] for i in va], size),
        test=ImageFileDataset(test_samples, size),
        class_names=classes,
        input_shape=(3, *size),
        mean=mean,
        std=std,
        default_preset="tiny-imagenet-cnn",
        augment=crop_flip_for(size[0]),
        info={"train": len(tr), "val": len(va), "test": len(test_samples)},
    )
