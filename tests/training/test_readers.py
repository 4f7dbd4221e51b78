"""Readers of the standard formats, on small files written by the tests in the official formats."""

from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.formats import CIFAR10_NAMES, write_cifar, write_image_tree, write_mnist
from training.data import FASHION_CLASSES, DataError, load_dataset
from training.readers import read_idx

ROOT = Path(__file__).resolve().parents[2]


def _all_items(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.stack(ys)


def _check_splits(splits, n_train_total: int, n_test: int) -> None:
    assert len(splits.train) + len(splits.val) == n_train_total
    assert len(splits.test) == n_test
    x, y = splits.train[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == splits.input_shape
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.dtype == torch.long
    assert len(splits.mean) == len(splits.std) == splits.input_shape[0]


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_gzipped_and_raw(tmp_path, gz):
    images, labels = write_mnist(tmp_path, n_train=100, n_test=20, gz=gz)
    splits = load_dataset("mnist", tmp_path)
    _check_splits(splits, 100, 20)
    assert splits.input_shape == (1, 28, 28)
    assert splits.class_names == [str(i) for i in range(10)]
    assert len(splits.val) == 10  # the documented 10%, stratified: one image of each class
    assert sorted(_all_items(splits.val)[1].tolist()) == list(range(10))
    # every training image comes back bit-exact, scaled to [0, 1]
    got = torch.cat([_all_items(splits.train)[0], _all_items(splits.val)[0]]) * 255
    want = torch.from_numpy(images).float().unsqueeze(1)
    assert sorted(got.round().sum(dim=(1, 2, 3)).tolist()) == sorted(want.sum(dim=(1, 2, 3)).tolist())
    mean = images.astype(np.float64) / 255
    assert splits.mean[0] == pytest.approx(mean.mean(), abs=0.02)  # stats of the train part


def test_fashion_mnist_class_names(tmp_path):
    write_mnist(tmp_path, n_train=50, n_test=10)
    splits = load_dataset("fashion-mnist", tmp_path)
    assert splits.class_names == FASHION_CLASSES
    assert splits.default_preset == "fmnist-vgg"


def test_read_idx_roundtrip_and_truncation(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    from tests.training.formats import idx_bytes

    data = idx_bytes(arr)
    (tmp_path / "a.gz").write_bytes(gzip.compress(data))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz", "src"), arr)
    (tmp_path / "short").write_bytes(data[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "short", "src")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(data)[:-8])
    with pytest.raises(DataError, match="not a readable"):
        read_idx(tmp_path / "bad.gz", "src")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "magic", "src")


def test_mnist_missing_file_names_it_and_the_source(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*yann\.lecun\.com"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("archive", [False, True])
def test_cifar10_folder_and_tar_gz(tmp_path, archive):
    files = write_cifar(tmp_path, "cifar10", archive=archive, per_batch=20, n_test=15)
    splits = load_dataset("cifar10", tmp_path)
    _check_splits(splits, 100, 15)
    assert splits.input_shape == (3, 32, 32)
    assert splits.class_names == CIFAR10_NAMES
    assert splits.default_preset == "cifar-cnn"
    # The test split is the official test_batch, in order, rows read as R, G, B planes.
    x, y = _all_items(splits.test)
    batch = files["test_batch"]
    assert y.tolist() == batch[b"labels"]
    want = torch.from_numpy(batch[b"data"]).view(-1, 3, 32, 32).float() / 255
    torch.testing.assert_close(x, want)


def test_cifar100_fine_labels(tmp_path):
    files = write_cifar(tmp_path, "cifar100", archive=True, n_train=200, n_test=100)
    splits = load_dataset("cifar100", tmp_path)
    _check_splits(splits, 200, 100)
    assert len(splits.class_names) == 100 and splits.class_names[7] == "class_7"
    assert _all_items(splits.test)[1].tolist() == files["test"][b"fine_labels"]


def test_cifar_truncated_archive_and_batch(tmp_path):
    write_cifar(tmp_path / "a", "cifar10", archive=True)
    tar = tmp_path / "a" / "cifar-10-python.tar.gz"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz.*truncated or corrupt"):
        load_dataset("cifar10", tmp_path / "a")

    write_cifar(tmp_path / "b", "cifar10")
    batch = tmp_path / "b" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR python batch"):
        load_dataset("cifar10", tmp_path / "b")


def test_cifar_missing_names_archive_and_source(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz.*cs\.toronto\.edu"):
        load_dataset("cifar10", tmp_path)


def test_cifar_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to load \w+\.print"):
        load_dataset("cifar10", tmp_path)


def test_imagefolder_with_val_folder_resized_to_preset(tmp_path):
    classes = ["cat", "dog", "eel"]
    write_image_tree(tmp_path / "train", classes, per_class=10, size=(40, 48))
    write_image_tree(tmp_path / "val", classes, per_class=2, size=(70, 50), fmt="JPEG")
    splits = load_dataset("imagefolder", tmp_path, image_size=(32, 32))
    _check_splits(splits, 30, 6)
    assert splits.class_names == classes
    assert splits.input_shape == (3, 32, 32)
    assert _all_items(splits.test)[1].tolist() == [0, 0, 1, 1, 2, 2]
    default = load_dataset("imagefolder", tmp_path)
    assert default.input_shape == (3, 64, 64) and default.default_preset == "tiny-imagenet-cnn"


def test_imagefolder_tiny_imagenet_val_annotations(tmp_path):
    classes = ["n01", "n02"]
    for c in classes:  # Tiny ImageNet: train/<wnid>/images/<wnid>_<i>.JPEG
        write_image_tree(tmp_path / "train" / c, ["images"], per_class=10, fmt="JPEG")
    write_image_tree(tmp_path / "val", ["images"], per_class=4, fmt="JPEG")
    lines = [f"{i}.jpeg\t{classes[i % 2]}\t0\t0\t10\t10" for i in range(4)]
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    splits = load_dataset("imagefolder", tmp_path)
    assert splits.class_names == classes
    assert _all_items(splits.test)[1].tolist() == [0, 1, 0, 1]


def test_imagefolder_single_tree_carves_val_and_test(tmp_path):
    write_image_tree(tmp_path, ["a", "b"], per_class=10)
    splits = load_dataset("imagefolder", tmp_path, image_size=(16, 16))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 2, 2)


def test_imagefolder_corrupt_image(tmp_path):
    write_image_tree(tmp_path / "train", ["a", "b"], per_class=3)
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"1\.png is not a readable image"):
        splits = load_dataset("imagefolder", tmp_path, image_size=(8, 8))
        for split in (splits.train, splits.val, splits.test):  # decoded lazily
            _all_items(split)


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(DataError, match="expected the folder .*ImageFolder tree"):
        load_dataset("imagefolder", tmp_path / "nope")


def test_cli_reports_a_missing_data_set_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "training", "--dataset", "cifar10", "--data-dir", str(tmp_path),
         "--out", str(tmp_path / "run"), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cifar-10-python.tar.gz" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_trains_on_an_image_folder_and_reports_a_bad_image_from_a_worker(tmp_path):
    write_image_tree(tmp_path / "train", ["a", "b"], per_class=6)
    write_image_tree(tmp_path / "val", ["a", "b"], per_class=1)
    cmd = [sys.executable, "-m", "training", "--dataset", "imagefolder", "--data-dir",
           str(tmp_path), "--preset", "test-tiny", "--epochs", "1", "--no-progress",
           "--num-workers", "1"]
    ok = subprocess.run(cmd + ["--out", str(tmp_path / "ok")], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    config = (tmp_path / "ok" / "config.json").read_text()
    assert '"class_names": [\n      "a",\n      "b"\n    ]' in config
    assert '"input_shape": [\n      3,\n      8,\n      8\n    ]' in config  # the preset's size
    (tmp_path / "val" / "b" / "0.png").write_bytes(b"not a png")  # decoded in a worker
    bad = subprocess.run(cmd + ["--out", str(tmp_path / "bad")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "0.png is not a readable image" in lines[0], bad.stderr[-2000:]


# --- default data locations -------------------------------------------------------------------

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def no_default_data(tmp_path, monkeypatch):
    """No data where the defaults look: an empty cwd, $HFF_DATA_DIR and the system dir elsewhere."""
    import training.data

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HFF_DATA_DIR", raising=False)
    monkeypatch.setattr(training.data, "SYSTEM_DATA_DIR", tmp_path / "system")
    return tmp_path


def test_data_dir_defaults_to_hff_data_dir_then_the_system_dir(no_default_data, monkeypatch):
    import training.data

    system = no_default_data / "system"
    write_mnist(system / "fashion-mnist", n_train=30, n_test=10, seed=1)
    assert len(load_dataset("fashion-mnist").test) == 10  # found in the system dir
    write_mnist(no_default_data / "mine" / "fashion-mnist", n_train=50, n_test=20, seed=2)
    monkeypatch.setenv("HFF_DATA_DIR", str(no_default_data / "mine"))
    assert len(load_dataset("fashion-mnist").test) == 20  # $HFF_DATA_DIR comes first
    assert training.data.default_data_dirs("mnist")[0] == no_default_data / "mine" / "mnist"


def test_data_absent_is_one_line_naming_where_and_how(no_default_data, monkeypatch):
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist")
    message = str(err.value)
    assert "\n" not in message
    assert "data/fashion-mnist" in message and str(no_default_data / "system" / "fashion-mnist") in message
    assert "$HFF_DATA_DIR is not set" in message
    assert "apt-get install dataset-fashion-mnist" in message and "zalandoresearch" in message
    monkeypatch.setenv("HFF_DATA_DIR", str(no_default_data / "nothing"))
    with pytest.raises(DataError, match=r"not found in .*nothing/mnist, .*yann\.lecun\.com"):
        load_dataset("mnist")


def test_cli_without_data_is_one_line_and_exit_2(no_default_data, capsys):
    from training.cli import main

    assert main(["--dataset", "fashion-mnist", "--out", str(no_default_data / "run"),
                 "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hff-train: error: fashion-mnist not found in ")
    assert not (no_default_data / "run").exists()


@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist_files_read(monkeypatch):
    monkeypatch.delenv("HFF_DATA_DIR", raising=False)
    monkeypatch.chdir(ROOT / "tests")  # no data/fashion-mnist here: the system dir is used
    splits = load_dataset("fashion-mnist")
    assert splits.info == {"train": 54000, "val": 6000, "test": 10000}
    assert splits.input_shape == (1, 28, 28)
    y = splits.test.labels
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10  # the official balanced test set
    x, _ = splits.test[0]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.mean()) > 0.05
    assert splits.mean[0] == pytest.approx(0.286, abs=0.005)  # Fashion-MNIST's known pixel mean


def test_fashion_mnist_recipe_is_the_default_under_the_flags(tmp_path):
    from training import cli
    from training.data import FASHION_RECIPE

    write_mnist(tmp_path, n_train=50, n_test=10)

    def train_config(*flags):
        args = cli.build_parser().parse_args(["--dataset", "fashion-mnist", "--data-dir",
                                              str(tmp_path), *flags])
        config, _ = cli.prepare_new_run(args, tmp_path / "run")
        return config.train

    assert {k: v for k, v in train_config().items() if k in FASHION_RECIPE} == FASHION_RECIPE
    backprop = train_config("--objective", "backprop")
    # backprop takes the recipe but for micro-batches, which only local losses can take
    assert backprop["micro_batches"] == 1
    assert all(backprop[k] == v for k, v in FASHION_RECIPE.items() if k != "micro_batches")
    assert train_config("--micro-batches", "1")["micro_batches"] == 1  # the flag wins
    assert train_config("--erasing", "0", "--epochs", "2")["erasing"] == 0.0
    assert train_config("--erasing", "0", "--epochs", "2")["epochs"] == 2
    assert train_config("--objective", "ff")["erasing"] == 0.0  # FF keeps its own defaults


@pytest.mark.parametrize("native", [True, False])
def test_fashion_mnist_recipe_trains_in_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch,
                                                                       native):
    from training import cli, trainer

    write_mnist(tmp_path, n_train=50, n_test=10)
    monkeypatch.setattr(trainer, "native_bf16", lambda: native)

    def train_config(*flags):
        args = cli.build_parser().parse_args(["--dataset", "fashion-mnist", "--data-dir",
                                              str(tmp_path), *flags])
        config, _ = cli.prepare_new_run(args, tmp_path / "run")
        return config.train

    assert train_config()["precision"] == ("bf16" if native else "auto")
    assert train_config("--objective", "backprop")["precision"] == ("bf16" if native else "auto")
    assert train_config("--precision", "fp32")["precision"] == "fp32"  # the flag wins
    assert train_config("--objective", "ff")["precision"] == "auto"  # FF keeps its own defaults


@pytest.mark.parametrize("num_workers", [0, 1])
def test_array_dataset_batches_equal_the_per_item_stack(num_workers):
    # ArrayDataset assembles a batch in one indexing op (__getitems__); through the trainer's
    # DataLoader settings it must give exactly what indexing image by image and stacking gives,
    # for any sample order, a short last batch and a Subset (the distributed evaluation shard).
    from torch.utils.data import DataLoader, Subset

    from training.readers import ArrayDataset, collate

    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.integers(0, 256, (50, 1, 6, 6), dtype=np.uint8),
                        rng.integers(0, 10, 50))
    order = rng.permutation(50).tolist()
    batches = list(DataLoader(data, batch_size=16, sampler=order, collate_fn=collate,
                              num_workers=num_workers))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x_all, y_all = _all_items(data)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(x, x_all[order]) and torch.equal(y, y_all[order])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    shard = list(DataLoader(Subset(data, range(10, 30)), batch_size=8, collate_fn=collate))
    assert torch.equal(torch.cat([b[0] for b in shard]), x_all[10:30])
