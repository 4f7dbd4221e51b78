"""The model dir's manifest.json, validated against the exporter's contract (ARCHITECTURE.md)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_FILE = "manifest.json"


class ModelDirError(Exception):
    """A model dir is missing, incomplete or inconsistent; the message names the file and why."""


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = "input"
    shape: list[int] = Field(min_length=3, max_length=3)  # (C, H, W), no batch axis
    dtype: str = "float32"
    range: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=2, max_length=2)


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    block: int = Field(ge=1)
    file: str
    input_shape: list[int]
    feature_shape: list[int]
    macs: int | None = None


class EarlyExitSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    thresholds: list[float | None]  # length L-1; None = never exit at that block
    epsilon: float | None = None
    expected_exit_fraction: list[float] | None = None
    expected_accuracy: float | None = None
    full_accuracy: float | None = None
    test_accuracy: float | None = None
    test_compute_fraction: float | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format_version: int
    name: str
    version: str
    input: InputSpec
    class_names: list[str] = Field(min_length=2)
    num_classes: int = Field(ge=2)
    num_blocks: int = Field(ge=1)
    full_graph: str = "model.onnx"
    stages: list[StageSpec] = Field(default_factory=list)
    early_exit: EarlyExitSpec | None = None
    test_accuracy_per_block: list[float] | None = None
    preset: str | None = None
    dataset: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if self.format_version != 1:
            raise ValueError(f"format_version {self.format_version} is not supported (this "
                             "service reads version 1)")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes {self.num_classes}")
        if self.stages and [s.block for s in self.stages] != list(range(1, self.num_blocks + 1)):
            raise ValueError(f"stages must list blocks 1..{self.num_blocks} in order")
        if self.early_exit is not None and len(self.early_exit.thresholds) != self.num_blocks - 1:
            raise ValueError(f"early_exit.thresholds has {len(self.early_exit.thresholds)} values, "
                             f"expected num_blocks - 1 = {self.num_blocks - 1}")
        return self

    @property
    def thresholds(self) -> list[float | None]:
        """Calibrated max-softmax threshold per block k < L (None: never exit there)."""
        if self.early_exit is None:
            return [None] * (self.num_blocks - 1)
        return list(self.early_exit.thresholds)


def load_manifest(model_dir: str | Path) -> Manifest:
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ModelDirError(f"{path} is missing: not a model dir written by hff-export")
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path} is not valid JSON ({e})") from None
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}"
                          for err in e.errors())
        raise ModelDirError(f"{path} does not match the model-dir contract: {where}") from None
    for name in [manifest.full_graph] + [s.file for s in manifest.stages]:
        if not (Path(model_dir) / name).is_file():
            raise ModelDirError(f"{Path(model_dir) / name} is missing (named in {path})")
    return manifest
