"""Checkpoint dir: bit-exact round trip, rebuilt from config.json alone, clear errors when damaged."""

import pytest
import torch

from model.checkpoint import (
    CheckpointError,
    RunConfig,
    load_checkpoint,
    save_config,
    save_weights,
)
from model.config import preset_config
from model.factory import build_model


def saved_run(tmp_path):
    cfg = RunConfig(model=preset_config("digits-cnn", prototypes_per_class=2), dataset="digits")
    torch.manual_seed(1)
    net = build_model(cfg.model)
    net.train()(torch.rand(32, 1, 8, 8))  # move the BatchNorm running statistics off their init
    save_config(tmp_path, cfg)
    save_weights(tmp_path, net)
    return net.eval()


def test_round_trip_is_bit_exact_from_config_alone(tmp_path):
    original = saved_run(tmp_path)
    config, loaded = load_checkpoint(tmp_path)
    assert config.model.prototypes_per_class == 2
    assert not loaded.training
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.rand(4, 1, 8, 8)
    for la, lb in zip(original(x), loaded(x), strict=True):
        assert torch.equal(la, lb)


def test_no_temp_files_left_behind(tmp_path):
    saved_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "weights.safetensors"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "weights.safetensors").write_bytes(b"\x00" * 100), "corrupt"),
        (lambda d: (d / "weights.safetensors").unlink(), "missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model": {}}'), "not a valid run config"),
        (lambda d: (d / "config.json").unlink(), "missing"),
    ],
)
def test_damaged_checkpoint_gives_clear_error(tmp_path, damage, message):
    saved_run(tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    saved_run(tmp_path)
    cfg = RunConfig(model=preset_config("digits-cnn"), dataset="digits")  # P = 1, not 2
    save_config(tmp_path, cfg)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path)
