"""Checkpoint dir I/O: config.json + weights.safetensors (never a pickle), written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from contract.pydantic_errors import describe_errors
from model import atomic
from model.config import ModelConfig
from model.factory import build_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
METRICS_FILE = "metrics.json"
HELDOUT_FILE = "heldout_probs.safetensors"  # per-block probabilities on val/test, for calibration


class CheckpointError(Exception):
    """A checkpoint dir is missing, incomplete or corrupt; the message says which file and why."""


class RunConfig(BaseModel):
    """The contents of config.json: the network plus where its data came from."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = 1
    model: ModelConfig
    dataset: str  # data set name the model was trained on (training.data registry)
    data_dir: str | None = None  # where its files were read from, if not bundled
    seed: int = 0
    train: dict[str, Any] = Field(default_factory=dict)  # training hyperparameters, for the record


def save_config(run_dir: str | Path, config: RunConfig) -> None:
    atomic.write_text(Path(run_dir) / CONFIG_FILE, config.model_dump_json(indent=2) + "\n")


def load_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"checkpoint dir {run_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a checkpoint dir written by hff-train")
    try:
        return RunConfig.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    except ValidationError as e:
        raise CheckpointError(f"{path} is not a valid run config: {describe_errors(e, root='config')}") from None


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers as contiguous CPU tensors (safetensors needs that)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_weights(run_dir: str | Path, model: nn.Module) -> None:
    tensors = state_tensors(model)
    atomic.write_with(Path(run_dir) / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))


def load_weights(run_dir: str | Path, model: nn.Module) -> None:
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run never finished an epoch")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match config.json: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=True)


def load_checkpoint(run_dir: str | Path) -> tuple[RunConfig, nn.Module]:
    """Rebuild the network from config.json alone and load its weights (in eval mode)."""
    config = load_config(run_dir)
    model = build_model(config.model)
    load_weights(run_dir, model)
    return config, model.eval()


def load_heldout(run_dir: str | Path, num_blocks: int, num_classes: int) -> dict[str, np.ndarray]:
    """The trainer's per-block probabilities on val and test: probs (N, L, C), labels (N,)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(run_dir) / HELDOUT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run has not finished (hff-train writes it "
                              "after the last epoch)")
    try:
        data = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({e})") from None
    for split in ("val", "test"):
        probs, labels = data.get(f"{split}_probs"), data.get(f"{split}_labels")
        if probs is None or labels is None:
            raise CheckpointError(f"{path} lacks {split}_probs or {split}_labels")
        if probs.ndim != 3 or probs.shape[1:] != (num_blocks, num_classes) or len(probs) == 0:
            raise CheckpointError(f"{path}: {split}_probs has shape {probs.shape}, config.json "
                                  f"implies (N, {num_blocks}, {num_classes})")
        if labels.shape != (len(probs),) or labels.min() < 0 or labels.max() >= num_classes:
            raise CheckpointError(f"{path}: {split}_labels do not match {split}_probs")
        if not np.isfinite(probs).all():
            raise CheckpointError(f"{path}: {split}_probs holds NaN or infinite values")
    return data
