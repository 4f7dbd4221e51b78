"""Writers for tiny data sets in exactly the official on-disk formats, for the reader tests."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: two zero bytes, type code 0x08 (uint8), ndim, big-endian uint32 dims, then the data."""
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The four MNIST files (train-images-idx3-ubyte[.gz] ...); returns the train images/labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    out = None
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = idx_bytes(arr)
            (folder / f"{prefix}-{kind}{suffix}").write_bytes(gzip.compress(data) if gz else data)
        if prefix == "train":
            out = images, labels
    return out


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def _cifar10_files(per_batch: int, n_test: int, rng) -> dict[str, dict]:
    files = {"batches.meta": {b"num_cases_per_batch": per_batch,
                              b"label_names": [n.encode() for n in CIFAR10_NAMES],
                              b"num_vis": 3072}}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        files[name] = {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
    return files


def _cifar100_files(n_train: int, n_test: int, rng) -> dict[str, dict]:
    fine = [f"class_{i}" for i in range(100)]
    files = {"meta": {b"fine_label_names": [n.encode() for n in fine],
                      b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}}
    for name, n in (("train", n_train), ("test", n_test)):
        fine_labels = [int(v) for v in np.arange(n) % 100]
        files[name] = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": fine_labels,
            b"coarse_labels": [v // 5 for v in fine_labels],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
    return files


def write_cifar(root: Path, which: str = "cifar10", archive: bool = False, seed: int = 0,
                **sizes) -> dict[str, dict]:
    """CIFAR python batches (protocol-2 pickles of dicts with bytes keys), as the extracted folder
    or as the official .tar.gz; returns the dicts written, keyed by member name."""
    rng = np.random.default_rng(seed)
    if which == "cifar10":
        folder, files = "cifar-10-batches-py", _cifar10_files(sizes.get("per_batch", 20),
                                                              sizes.get("n_test", 20), rng)
        tar_name = "cifar-10-python.tar.gz"
    else:
        folder, files = "cifar-100-python", _cifar100_files(sizes.get("n_train", 200),
                                                           sizes.get("n_test", 100), rng)
        tar_name = "cifar-100-python.tar.gz"
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(root / tar_name, "w:gz") as tar:
            for name, obj in files.items():
                data = pickle.dumps(obj, protocol=2)
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        (root / folder).mkdir(exist_ok=True)
        for name, obj in files.items():
            (root / folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    return files


def write_image_tree(root: Path, classes: list[str], per_class: int, size=(40, 48),
                     fmt: str = "PNG", seed: int = 0) -> None:
    """root/<class>/<i>.png images of random colours (any size: the reader resizes them)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{fmt.lower()}", format=fmt)
