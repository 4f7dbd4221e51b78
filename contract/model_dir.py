"""The model dir contract: its file names, the graphs' tensor names, manifest.json and its version.

hff-export writes a model dir with `Manifest(...).model_dump_json()`; hff-serve reads it with
`load_manifest`. Both import the names below, so a rename is one edit. A model dir holds:
  model.onnx       the whole network: `input` (batch, C, H, W) -> probs_1 ... probs_L
  stage_k.onnx     block k alone: `input` (block k-1's features, the image for k = 1)
                   -> features, probs
  manifest.json    this module's `Manifest`
  early_exit.png   the calibration's trade-off plot, for people (nothing reads it)
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from contract.pydantic_errors import describe_errors

FORMAT_VERSION = 1  # what this code writes and reads; a newer exporter bumps it
MANIFEST_FILE = "manifest.json"
FULL_GRAPH = "model.onnx"
PLOT_FILE = "early_exit.png"
GRAPH_INPUT = "input"  # every graph's one input
STAGE_FEATURES = "features"  # a stage graph's outputs: its feature map (the next stage's input)
STAGE_PROBS = "probs"  # ... and its softmax over the classes
STAGE_OUTPUTS = [STAGE_FEATURES, STAGE_PROBS]
VERSION_DIGITS = 16  # hex digits of the graphs' sha256 kept as the model version
# How an image of another size becomes (H, W), in training (image folders, digits32) and in
# serving (uploads): the same resampling on both sides, as timm's pretrained configs record it.
RESIZE = "bilinear"


class ModelDirError(Exception):
    """A model dir is missing, incomplete or inconsistent; the message names the file and why."""


def stage_file(k: int) -> str:
    """File name of block k's graph (1-based)."""
    return f"stage_{k}.onnx"


def full_graph_outputs(num_blocks: int) -> list[str]:
    """model.onnx's outputs: every block's probabilities, probs_1 ... probs_L."""
    return [f"probs_{k}" for k in range(1, num_blocks + 1)]


def graphs_version(model_dir: str | Path, files: list[str]) -> str:
    """The version rule: sha256 over the graph files' bytes in manifest order (whole graph, then
    stages), its first VERSION_DIGITS hex digits. The same checkpoint exports to the same bytes."""
    digest = hashlib.sha256()
    for name in files:
        digest.update((Path(model_dir) / name).read_bytes())
    return digest.hexdigest()[:VERSION_DIGITS]


def _plain_file_name(name: str) -> str:
    """A graph is named by a file name inside the model dir: no folders, no way out of it."""
    if (name in ("", ".", "..") or PurePosixPath(name).name != name
            or PureWindowsPath(name).name != name):
        raise ValueError(f"{name!r} is not a plain file name inside the model dir")
    return name


GraphFile = Annotated[str, AfterValidator(_plain_file_name)]


class InputSpec(BaseModel):
    """What every graph takes: float32 pixels of one shape, in a range."""

    model_config = ConfigDict(extra="allow")

    name: Literal["input"] = GRAPH_INPUT
    shape: list[int] = Field(min_length=3, max_length=3)  # (C, H, W), no batch axis
    dtype: Literal["float32"] = "float32"
    range: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=2, max_length=2)
    # resampling for images of another size; older manifests lack it and mean bilinear
    resize: Literal["bilinear", "bicubic", "nearest"] = RESIZE


class Normalization(BaseModel):
    """Per-channel mean/std applied inside stage 1 and model.onnx (clients send raw pixels)."""

    model_config = ConfigDict(extra="allow")

    mean: list[float]
    std: list[float]
    in_graph: bool = True


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    block: int = Field(ge=1)
    file: GraphFile
    input_shape: list[int]
    feature_shape: list[int]
    macs: int | None = None  # multiply-accumulates of the block for one input


class OperatingPoint(BaseModel):
    """One threshold vector on the accuracy/compute trade-off, as the calibration measured it."""

    model_config = ConfigDict(extra="allow")

    thresholds: list[float | None]  # length L-1; None = never exit at that block
    epsilon: float | None = None  # the accuracy loss the calibration allowed for this point
    expected_accuracy: float | None = None  # on val (None: a manifest that did not measure it)
    # on val, at the export's confidence: the calibrated point's accuracy minus an upper bound on
    # what this point loses against it on the same rows (the load controller's floor checks it)
    accuracy_lower_bound: float | None = None
    compute_fraction: float | None = None  # on val: MACs run / MACs of the whole network
    test_accuracy: float | None = None
    test_compute_fraction: float | None = None

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, values: list[float | None]) -> list[float | None]:
        return _check_thresholds(values)


def _check_thresholds(values: list[float | None]) -> list[float | None]:
    for k, t in enumerate(values, 1):
        if t is not None and not (math.isfinite(t) and 0.0 < t <= 1.0):
            raise ValueError(f"the threshold of block {k} is {t}; a max-softmax threshold "
                             "lies in (0, 1] (null: never exit there)")
    return values


class EarlyExitSpec(BaseModel):
    """The calibrated thresholds and what the calibration measured (hff-export prints them)."""

    model_config = ConfigDict(extra="allow")

    thresholds: list[float | None]  # length L-1; None = never exit at that block
    epsilon: float | None = None  # accuracy an exit may lose against the full network
    confidence: float | None = None  # how sure the calibration is that it loses at most epsilon
    expected_exit_fraction: list[float] | None = None  # on val: share of rows exiting per block
    expected_accuracy: float | None = None  # on val, with early exit
    full_accuracy: float | None = None  # on val, the last block alone
    mean_blocks: float | None = None  # on val: mean 1-based exit block
    compute_fraction: float | None = None  # on val: MACs run / MACs of the whole network
    test_accuracy: float | None = None
    test_compute_fraction: float | None = None
    # The trade-off a server under load may move along: the calibrated point first, then ever
    # cheaper ones. Older manifests lack it; `Manifest.operating_points` then has the calibrated
    # point alone.
    operating_points: list[OperatingPoint] = Field(default_factory=list)

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, values: list[float | None]) -> list[float | None]:
        return _check_thresholds(values)


class Manifest(BaseModel):
    """manifest.json: what the model is, its graphs and its calibrated early exit."""

    model_config = ConfigDict(extra="allow")

    format_version: int
    name: str
    version: str  # graphs_version() of the graph files
    preset: str | None = None
    dataset: str | None = None
    family: str | None = None
    input: InputSpec
    normalization: Normalization | None = None
    class_names: list[str] = Field(min_length=2)
    num_classes: int = Field(ge=2)
    num_blocks: int = Field(ge=1)
    opset: int | None = None
    full_graph: GraphFile = FULL_GRAPH
    stages: list[StageSpec] = Field(default_factory=list)  # empty: the full graph only
    early_exit: EarlyExitSpec | None = None
    test_accuracy_per_block: list[float] | None = None
    created_at: str | None = None  # UTC, 2026-01-31T12:00:00Z

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not supported (this "
                             f"service reads version {FORMAT_VERSION})")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes {self.num_classes}")
        if self.stages and [s.block for s in self.stages] != list(range(1, self.num_blocks + 1)):
            raise ValueError(f"stages must list blocks 1..{self.num_blocks} in order")
        shapes = [self.input.shape] + [s.feature_shape for s in self.stages]
        for stage, fed in zip(self.stages, shapes, strict=False):
            if stage.input_shape != fed:
                raise ValueError(f"stages[{stage.block - 1}].input_shape is {stage.input_shape}, "
                                 f"but it is fed {fed} (input.shape, then each stage's "
                                 "feature_shape)")
        if self.early_exit is not None and len(self.early_exit.thresholds) != self.num_blocks - 1:
            raise ValueError(f"early_exit.thresholds has {len(self.early_exit.thresholds)} values, "
                             f"expected num_blocks - 1 = {self.num_blocks - 1}")
        if self.early_exit is not None:
            for i, point in enumerate(self.early_exit.operating_points):
                if len(point.thresholds) != self.num_blocks - 1:
                    raise ValueError(f"early_exit.operating_points[{i}].thresholds has "
                                     f"{len(point.thresholds)} values, expected num_blocks - 1 = "
                                     f"{self.num_blocks - 1}")
        return self

    @property
    def graph_files(self) -> list[str]:
        """The graphs in the order the version hashes them: whole graph, then stages."""
        return [self.full_graph] + [s.file for s in self.stages]

    @property
    def thresholds(self) -> list[float | None]:
        """Calibrated max-softmax threshold per block k < L (None: never exit there)."""
        if self.early_exit is None:
            return [None] * (self.num_blocks - 1)
        return list(self.early_exit.thresholds)

    @property
    def operating_points(self) -> list[OperatingPoint]:
        """The calibrated point, then cheaper ones; a manifest without the list (or without
        early exit) has one point: its calibrated thresholds (never exit, without early exit)."""
        ee = self.early_exit
        if ee is not None and ee.operating_points:
            return list(ee.operating_points)
        return [OperatingPoint(
            thresholds=self.thresholds,
            epsilon=ee.epsilon if ee else None,
            expected_accuracy=ee.expected_accuracy if ee else None,
            compute_fraction=ee.compute_fraction if ee else None,
            test_accuracy=ee.test_accuracy if ee else None,
            test_compute_fraction=ee.test_compute_fraction if ee else None)]


def load_manifest(model_dir: str | Path) -> Manifest:
    """The model dir's manifest, validated, after `check_model_dir`; ModelDirError says why not."""
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ModelDirError(f"{path} is missing: not a model dir written by hff-export")
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path} is not valid JSON ({e})") from None
    except ValidationError as e:
        raise ModelDirError(f"{path} does not match the model-dir contract: "
                            f"{describe_errors(e, root='manifest')}") from None
    check_model_dir(model_dir, manifest)
    return manifest


def check_model_dir(model_dir: str | Path, manifest: Manifest) -> None:
    """The model dir holds what its manifest names: every graph file, inside the dir (the
    Manifest allows only plain file names; a symlink out of the dir is refused here), and their
    bytes hash to the manifest's `version`, so a graph from another export, or stages swapped,
    cannot be served under this manifest. Checks that need the graphs opened (input shape, class
    count, stage shapes) are the service runtime's, on load."""
    root = Path(model_dir).resolve()
    for name in manifest.graph_files:
        path = Path(model_dir) / name
        if not path.is_file():
            raise ModelDirError(f"{path} is missing (named in {Path(model_dir) / MANIFEST_FILE})")
        if path.resolve().parent != root:
            raise ModelDirError(f"{path} points outside the model dir (to {path.resolve()})")
    version = graphs_version(model_dir, manifest.graph_files)
    if version != manifest.version:
        raise ModelDirError(f"the graphs in {model_dir} hash to version {version}, but "
                            f"{Path(model_dir) / MANIFEST_FILE} says {manifest.version}: a graph "
                            "was replaced or swapped after export (export the run again)")
