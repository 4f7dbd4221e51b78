"""The input pipeline: seeded augmentation, off at evaluation, independent of DataLoader workers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from model.config import preset_config
from training.data import crop_flip_for, load_dataset, random_crop_flip, random_erasing
from training.trainer import TrainConfig, Trainer, make_run_config


def _images(n=16, c=3, size=32):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(1))


def test_crop_flip_is_deterministic_under_a_seed():
    x = _images()
    aug = crop_flip_for(32)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_flip_alone_mirrors_about_half_the_images():
    x = _images(n=200)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    same = [(o == i).all().item() for o, i in zip(out, x, strict=True)]
    mirrored = [(o == i.flip(2)).all().item() for o, i in zip(out, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 60 < sum(mirrored) < 140


def test_crop_keeps_a_shifted_window_of_the_image():
    x = _images(n=8, size=64)
    out = random_crop_flip(x, torch.Generator().manual_seed(3), pad=8, flip=False)
    for o, i in zip(out, x, strict=True):
        # find the shift: the window must equal the zero-padded image at some offset in [-8, 8]
        padded = torch.nn.functional.pad(i, [8] * 4)
        assert any(torch.equal(o, padded[:, dy:dy + 64, dx:dx + 64])
                   for dy in range(17) for dx in range(17))


def test_erasing_replaces_one_rectangle_in_the_chosen_share_of_images():
    x = torch.full((400, 2, 28, 28), -1.0)  # noise is in [0, 1): erased pixels are >= 0
    out = random_erasing(x, torch.Generator().manual_seed(0), p=0.5)
    erased = out >= 0
    touched = erased.flatten(1).any(dim=1)
    assert 150 < touched.sum() < 250
    for mask in erased[touched]:
        assert torch.equal(mask[0], mask[1])  # every channel alike
        rows = mask[0].any(dim=1).nonzero().flatten()
        cols = mask[0].any(dim=0).nonzero().flatten()
        box = mask[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and mask[0].sum() == box.numel()  # one solid rectangle
        assert 0.01 * 28 * 28 <= box.numel() <= 0.4 * 28 * 28
    assert torch.equal(random_erasing(x, torch.Generator().manual_seed(0), p=0.0), x)
    assert torch.equal(out, random_erasing(x, torch.Generator().manual_seed(0), p=0.5))


def _trainer(tmp_path, data, num_workers=0, epochs=1, augment=True, **train):
    model = preset_config("test-tiny", input_shape=data.input_shape, class_names=data.class_names,
                          input_mean=data.mean, input_std=data.std)
    config = make_run_config(model, "digits", None, seed=3,
                             train=TrainConfig(epochs=epochs, batch_size=128, augment=augment,
                                               **train))
    return Trainer(config, data, tmp_path, progress=False, num_workers=num_workers)


def test_augmentation_runs_in_training_only(tmp_path):
    data = load_dataset("digits")
    calls = []

    def spy(x, gen):
        calls.append(len(x))
        return x

    data.augment = spy
    trainer = _trainer(tmp_path, data)
    trainer.evaluate(data.val)
    trainer.evaluate(data.test)
    assert calls == []  # evaluation never augments
    trainer._train_epoch(1)
    assert sum(calls) == len(data.train)
    calls.clear()
    _trainer(tmp_path, data, augment=False)._train_epoch(1)
    assert calls == []  # --no-augment


def test_evaluation_is_deterministic(tmp_path):
    data = load_dataset("digits")
    trainer = _trainer(tmp_path, data)
    _, a, _ = trainer.evaluate(data.val)
    _, b, _ = trainer.evaluate(data.val)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.slow
def test_workers_do_not_change_the_run(tmp_path):
    data = load_dataset("digits")
    weights = []
    for workers in (0, 2):
        trainer = _trainer(tmp_path / str(workers), data, num_workers=workers, epochs=1)
        trainer.fit()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


@pytest.mark.parametrize(("precision", "bf16_step"), [("bf16", True), ("fp32", False),
                                                      ("auto", False)])  # auto: bf16 on CUDA only
def test_precision_sets_the_step_and_the_epochs_validation_and_the_report_stays_fp32(
        tmp_path, precision, bf16_step):
    data = load_dataset("digits")
    trainer = _trainer(tmp_path, data, precision=precision, epochs=2)
    seen = {"train": [], "monitor": [], "report": []}
    phase = ["monitor"]  # block_scores outside the step: the epochs' validation, then the report
    step, scores, finish = (trainer.objective.train_step, trainer.objective.block_scores,
                            trainer._finish)

    def bf16_now() -> bool:
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16

    def spy(kind, fn):
        def wrapped(*args):
            seen[kind if kind == "train" else phase[0]].append(bf16_now())
            return fn(*args)
        return wrapped

    def finishing(*args):
        phase[0] = "report"
        return finish(*args)

    trainer.objective.train_step = spy("train", step)
    trainer.objective.block_scores = spy("eval", scores)
    trainer._finish = finishing
    metrics = trainer.fit()
    assert seen["train"] and set(seen["train"]) == {bf16_step}
    assert len(seen["monitor"]) == 2 and set(seen["monitor"]) == {bf16_step}  # one val batch an epoch
    # the report scores validation afresh when the monitor ran in bf16, and test always, in fp32
    assert seen["report"] == [False] * (2 if bf16_step else 1)
    fresh, val_scores, _ = trainer.evaluate(data.val)  # fp32, these weights
    heldout = load_file(str(tmp_path / "heldout_probs.safetensors"))
    expected = torch.stack([s.softmax(1) for s in val_scores], 1)
    assert torch.equal(heldout["val_probs"], expected)
    assert metrics["val"]["accuracy"] == fresh["accuracy"]


@pytest.mark.slow
def test_bf16_step_on_cpu_keeps_the_checkpoint_portable(tmp_path):
    """bf16 autocast (CUDA's default, --precision bf16 on the CPU) with the default channels-last
    layout: the epoch runs, metrics are float32, and the checkpoint loads into a plain model."""
    from model.checkpoint import load_checkpoint

    data = load_dataset("digits")
    trainer = _trainer(tmp_path, data, precision="bf16")
    metrics = trainer.fit()
    conv = trainer.model.blocks[1].body[0].weight  # (8, 4, 3, 3): layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert 0.0 <= metrics["final_test_accuracy"] <= 1.0
    _, model = load_checkpoint(tmp_path)
    for name, tensor in model.state_dict().items():
        assert tensor.is_contiguous() and tensor.device.type == "cpu", name
        assert torch.equal(tensor, trainer.model.state_dict()[name].float()), name
    heldout = load_file(str(tmp_path / "heldout_probs.safetensors"))
    assert heldout["test_probs"].dtype == torch.float32


@pytest.mark.parametrize("objective", ["hff", "backprop"])
def test_label_smoothing_reaches_every_block_loss(objective):
    from model.factory import build_model
    from training.objectives import make_objective

    data = load_dataset("digits")
    model_cfg = preset_config("test-tiny", input_shape=data.input_shape)
    x, y = next(iter(torch.utils.data.DataLoader(data.train, batch_size=32)))
    losses = []
    for smoothing in (0.0, 0.2):
        torch.manual_seed(0)
        model = build_model(model_cfg)
        config = make_run_config(model_cfg, "digits", None, 0,
                                 TrainConfig(objective=objective, label_smoothing=smoothing))
        losses.append(torch.stack(make_objective(config).train_step(model, x, y).loss))
    assert (losses[1] != losses[0]).all()  # every block's loss moved


def test_fit_scores_the_validation_split_once_per_epoch(tmp_path, monkeypatch):
    """The last epoch's validation pass scored the final weights in the report's arithmetic;
    the final report reuses it (the same numbers) instead of scoring the split again."""
    data = load_dataset("digits")
    trainer = _trainer(tmp_path, data, epochs=2, augment=False)
    splits = []
    evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate",
                        lambda split, *args: splits.append(split) or evaluate(split, *args))
    metrics = trainer.fit()
    assert splits == [data.val, data.val, data.test]
    assert metrics["val"]["accuracy"] == metrics["history"][-1]["val_acc"]
    # and the same numbers as a fresh pass over the final weights
    assert metrics["val"]["accuracy"] == evaluate(data.val)[0]["accuracy"]


def test_finish_without_an_epoch_scores_the_validation_split(tmp_path, monkeypatch):
    data = load_dataset("digits")
    trainer = _trainer(tmp_path, data, epochs=1, augment=False)
    splits = []
    evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate",
                        lambda split, *args: splits.append(split) or evaluate(split, *args))
    trainer.start_epoch = 1  # as a run resumed with every epoch done
    trainer.fit()
    assert splits == [data.val, data.test]
