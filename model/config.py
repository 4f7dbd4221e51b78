"""Validated model configuration and the named preset registry.

A `ModelConfig` describes a network completely (architecture, classes, input shape and the input
normalisation baked into the network), so a checkpoint's `config.json` rebuilds it with no flags.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BlockConfig(BaseModel):
    """One block of the body: conv (or linear) layers followed by an optional downsample."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["conv", "linear"] = "conv"  # conv: Conv2d layers; linear: flatten + Linear layers
    width: int = Field(64, ge=1)  # output channels (conv) or features (linear)
    layers: int = Field(1, ge=1)  # layers inside the block (VGG-style stacks use 2)
    kernel: int = Field(3, ge=1)  # conv kernel size, 'same' padding
    norm: Literal["batch", "layer", "none"] = "batch"  # normalisation after each layer
    activation: Literal["relu", "gelu"] = "relu"
    downsample: Literal["none", "maxpool", "avgpool"] = "none"  # 2x2 pool at the end (conv only)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout at the end of the block


class FFConfig(BaseModel):
    """Forward-Forward settings (family "ff" only): label embedding, goodness and inference."""

    model_config = ConfigDict(extra="forbid")

    # How the candidate label enters the input. "overlay": the first C values of the flattened
    # (normalised) input are replaced by a one-hot times `label_scale` (Hinton's MNIST form).
    # "concat": the one-hot is appended: as C extra features for a linear first block, as C
    # constant one-hot planes (extra input channels) for a conv first block.
    label_embedding: Literal["overlay", "concat"] = Field(
        "concat", description="label in the input: one-hot overlay on the first C values, "
                              "or appended")
    label_scale: float = Field(1.0, gt=0.0)  # value of the hot entry of the one-hot
    goodness: Literal["sum", "mean"] = Field(
        "mean", description="goodness = sum or mean of squared activations over a block's output")
    threshold: float = Field(2.0, ge=0.0, description="theta of Hinton's loss "
                                                      "softplus(-(G_pos - theta)) ... (loss ff)")
    # Hinton skips block 1 when there are several.
    score_blocks: list[int] | None = Field(
        None, description="1-based blocks whose goodness is summed at inference, e.g. 2,3 "
                          "(default: every block)")


class ModelConfig(BaseModel):
    """Everything needed to build an HFF (or FF) network."""

    model_config = ConfigDict(extra="forbid")

    name: str = "hff"  # a label for the network, usually the preset name
    family: Literal["hff", "ff"] = "hff"  # hff: prototype heads; ff: Forward-Forward goodness
    input_shape: tuple[int, int, int] = (1, 8, 8)  # (C, H, W) of one input
    class_names: list[str] = Field(default_factory=lambda: [str(i) for i in range(10)])
    input_mean: list[float] = Field(default_factory=lambda: [0.0])  # per channel, pixels in [0, 1]
    input_std: list[float] = Field(default_factory=lambda: [1.0])
    blocks: list[BlockConfig] = Field(min_length=1)
    # Prototype head (one per block), see docs/architecture.md.
    prototypes_per_class: int = Field(1, ge=1, description="P: a class scores the soft max over "
                                      "its P prototypes")
    prototype_temperature: float = Field(0.1, gt=0.0)  # tau of the logsumexp over prototypes
    init_scale: float = Field(10.0, gt=0.0)  # initial logit scale (learned in log space)
    learn_scale: bool = True
    margin: float = Field(0.0, ge=0.0, lt=1.0,
                          description="additive cosine margin on the true class in training")
    feature_pool: Literal["avg", "max"] = "avg"  # how a feature map becomes a vector
    pool_grid: int = Field(1, ge=1)  # adaptive pool to grid x grid before flattening (1 = global)
    ff: FFConfig | None = None  # Forward-Forward settings; family "ff" uses FFConfig() when None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        channels = self.input_shape[0]
        if len(self.class_names) < 2:
            raise ValueError("class_names needs at least 2 classes")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        for field in ("input_mean", "input_std"):
            values = getattr(self, field)
            if len(values) != channels:
                raise ValueError(f"{field} has {len(values)} values, input has {channels} channels")
        if any(s <= 0 for s in self.input_std):
            raise ValueError("input_std values must be positive")
        seen_linear = False
        for i, block in enumerate(self.blocks, 1):
            if block.kind == "linear":
                seen_linear = True
            elif seen_linear:
                raise ValueError(f"block {i} is conv after a linear block")
        if self.family == "ff" and self.ff is None:
            self.ff = FFConfig()  # recorded in config.json, so the defaults never drift silently
        if self.ff is not None:
            if self.family != "ff":
                raise ValueError("ff settings are given but family is not 'ff'")
            bad = [k for k in self.ff.score_blocks or [] if not 1 <= k <= len(self.blocks)]
            if bad:
                raise ValueError(f"ff.score_blocks {bad} outside 1..{len(self.blocks)}")
            if self.ff.score_blocks is not None and not self.ff.score_blocks:
                raise ValueError("ff.score_blocks is empty: name at least one block")
            if self.ff.label_embedding == "overlay":
                size = channels * self.input_shape[1] * self.input_shape[2]
                if size < self.num_classes:
                    raise ValueError(f"overlay needs {self.num_classes} input values, input has {size}")
        return self


# --- preset registry (timm-style): a preset is a dict of architecture arguments ---------------

_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {}


def register_preset(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Register `fn` under its name with '_' turned into '-'; a duplicate name is an error."""
    name = fn.__name__.replace("_", "-")
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = fn
    return fn


def list_presets(pattern: str = "*") -> list[str]:
    return sorted(n for n in _PRESETS if fnmatch.fnmatch(n, pattern))


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """Build the ModelConfig of preset `name`; `overrides` replace its fields (data shape, classes)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r} (known: {', '.join(list_presets())})")
    args = {"name": name, **_PRESETS[name](), **overrides}
    return ModelConfig(**args)


def _rgb_input(size: int) -> dict[str, Any]:
    """A size x size RGB input with placeholder statistics; training replaces them with the data
    set's own (the exporter bakes in whichever the checkpoint holds)."""
    return {"input_shape": (3, size, size), "input_mean": [0.5, 0.5, 0.5],
            "input_std": [0.25, 0.25, 0.25]}


def _conv(width: int, layers: int = 1, downsample: str = "none", **kw: Any) -> dict[str, Any]:
    return {"kind": "conv", "width": width, "layers": layers, "downsample": downsample, **kw}


@register_preset
def digits_cnn() -> dict[str, Any]:
    """3 conv blocks for 1x8x8 digits: 8x8 -> 4x4 -> 2x2."""
    return {
        "blocks": [_conv(32), _conv(64, downsample="maxpool"), _conv(128, downsample="maxpool")],
        "pool_grid": 2,
    }


@register_preset
def cifar_cnn() -> dict[str, Any]:
    """VGG-style stack of 5 conv blocks for 3x32x32: 32 -> 16 -> 8 -> 4 -> 2 -> 2."""
    return {
        **_rgb_input(32),
        "blocks": [
            _conv(64, downsample="maxpool"),
            _conv(128, downsample="maxpool"),
            _conv(256, layers=2, downsample="maxpool"),
            _conv(256, layers=2, downsample="maxpool"),
            _conv(512),
        ],
        "pool_grid": 2,
    }


@register_preset
def cifar_deep_cnn() -> dict[str, Any]:
    """11 narrow conv blocks for 3x32x32, several at each resolution: 32 -> 16 -> 8 -> 4 -> 2.

    Local learning holds one block's activations at a time, backprop all of them, so HFF's
    memory advantage grows with how evenly the activations spread over the blocks. In cifar-cnn
    block 1 alone (64 channels at 32x32) makes 47% of the layer outputs; here none makes more
    than 17% (bench/train_memory.py --preset cifar-deep-cnn).
    """
    return {
        **_rgb_input(32),
        "blocks": [
            _conv(32), _conv(32), _conv(32), _conv(32, downsample="maxpool"),
            _conv(64), _conv(64), _conv(64, downsample="maxpool"),
            _conv(128), _conv(128), _conv(128, downsample="maxpool"),
            _conv(256, downsample="maxpool"),
        ],
        "pool_grid": 2,
    }


@register_preset
def mnist_cnn() -> dict[str, Any]:
    """3 conv blocks for 1x28x28 (MNIST, Fashion-MNIST): 28 -> 14 -> 7 -> 3."""
    return {
        "input_shape": (1, 28, 28),
        "blocks": [
            _conv(32, downsample="maxpool"),
            _conv(64, downsample="maxpool"),
            _conv(128, downsample="maxpool"),
        ],
        "pool_grid": 2,
    }


@register_preset
def fmnist_cnn() -> dict[str, Any]:
    """4 conv blocks for 1x28x28 Fashion-MNIST, one conv layer each: 28 -> 14 -> 7 -> 7 -> 3.

    mnist-cnn plus a fourth, wider block (192 channels) at 7x7, where a channel is cheapest:
    2.5x the MACs (18.3 M) and 3.3x the parameters. With local losses only, on the data set's
    recipe (12 epochs, batch 128, fp32): 91.79 +- 0.41% test accuracy over 3 seeds, backprop
    92.98% (seed 0), 11.0 min on one thread; mnist-cnn made 90.59% after 6. Random erasing 0.25
    with label smoothing 0.1 did not help (91.51%, seed 0): the deepest block's accuracy on its
    augmented training batches (93.0%) was already at its validation accuracy (92.8%), so there
    was no generalisation gap to close: it underfits. fmnist-vgg, the data set's default now,
    gives its blocks the capacity it lacks.
    """
    return {
        "input_shape": (1, 28, 28),
        "blocks": [
            _conv(32, downsample="maxpool"),
            _conv(64, downsample="maxpool"),
            _conv(128),
            _conv(192, downsample="maxpool"),
        ],
        "pool_grid": 2,
    }


@register_preset
def fmnist_vgg() -> dict[str, Any]:
    """Fashion-MNIST's default: fmnist-cnn with two conv layers in blocks 2-4 (VGG-style).

    28 -> 14 -> 7 -> 7 -> 3, 848 k parameters, 49.0 M MACs (2.7x fmnist-cnn's). fmnist-cnn
    underfit (training accuracy at validation accuracy), and a greedy block can only be as good
    as the classifier its own layers make, so a second conv layer in each block deepens what every
    local loss trains (a wider single-layer variant was not measured). Block 1 (28x28) keeps one
    layer, so it stays cheap: an early exit there costs 0.5% of the MACs. The data set's recipe
    (training.data.FASHION_RECIPE: 24 epochs, batch 128, AdamW 3e-3 with warm-up + cosine, crop
    pad 2 + flip, channels-last, the step in bf16 where the CPU has it). 18 epochs rather than 12:
    at 12 the validation accuracy still rose at the last epoch and the deepest block classified
    its augmented training batches no better than the validation images (it underfit); 18 took
    seeds 0 / 1 / 2 from 92.72 / 92.31 / 92.43% to 93.19 / 92.79 / 92.96% test accuracy (local
    losses only; mean 92.49 -> 92.98%) and still trains in 9.3 min on 2 cores (2 threads, bf16,
    31 s an epoch alone). 24 rather than 18: the deepest block still gained on every seed (seeds
    0 / 1 / 2: 93.26 / 93.25 / 92.96%, mean 93.16%) in 13.5 min a run on 2 cores (about 34 s an
    epoch alone; 18.6 min when re-timed a session later, both objectives' steps a third slower
    on the same code; 21.1 min on a later machine, 16.3 min there once hff-train's jemalloc
    stopped returning and re-faulting ~40 MiB a step, training/allocator.py); backprop on the
    same 24 epochs: 94.04% (seed 0). Calibrated early exit on the 24-epoch seed-0 model: 92.96
    against 93.26% test accuracy at 15.7% of the MACs. Training memory: block 1's 28x28 maps
    are HFF's whole peak (0.52x backprop's in tensors, 0.66-0.68x in resident set on
    hff-train's jemalloc settings, 0.73-0.85x on glibc or jemalloc's defaults); with
    --micro-batches 4 block 1 holds a quarter of the batch's maps at a time, with the same
    gradient (training/micro_batch.py), and HFF needs 0.58x backprop's resident set (0.46x in
    tensors; block 2 is then about as large). As shipped (micro-batches, and the heads' pooled
    gradient handed back channels-last, model.hff.GradInInputLayout): seeds 0 / 1 / 2 reach
    93.07 / 93.07 / 93.20% (mean 93.11%, backprop 93.89%) in 12.2-14.2 min a run on 2 cores
    (23.6 and 24.2 min on machines 1.7-1.9x slower a step, with the same results).
    Per-block figures, backprop and what was tried: README, Real data: Fashion-MNIST,
    and docs/fashion-mnist.md.
    """
    return {
        "input_shape": (1, 28, 28),
        "blocks": [
            _conv(32, downsample="maxpool"),
            _conv(64, layers=2, downsample="maxpool"),
            _conv(128, layers=2),
            _conv(192, layers=2, downsample="maxpool"),
        ],
        "pool_grid": 2,
    }


@register_preset
def tiny_imagenet_cnn() -> dict[str, Any]:
    """VGG-style stack of 6 conv blocks for 3x64x64 (Tiny ImageNet): 64 -> 32 -> 16 -> 8 -> 4 -> 2."""
    return {
        **_rgb_input(64),
        "blocks": [
            _conv(64, downsample="maxpool"),
            _conv(128, downsample="maxpool"),
            _conv(256, layers=2, downsample="maxpool"),
            _conv(256, layers=2),
            _conv(512, layers=2, downsample="maxpool"),
            _conv(512, layers=2, downsample="maxpool"),
        ],
        "pool_grid": 2,
    }


@register_preset
def mlp() -> dict[str, Any]:
    """Three fully connected blocks (any input shape is flattened)."""
    return {
        "blocks": [
            {"kind": "linear", "width": 256, "norm": "layer"},
            {"kind": "linear", "width": 256, "norm": "layer"},
            {"kind": "linear", "width": 256, "norm": "layer"},
        ],
    }


@register_preset
def ff_mlp() -> dict[str, Any]:
    """Forward-Forward MLP: three linear blocks without norm layers (FF normalises between blocks)."""
    return {"blocks": [{"kind": "linear", "width": 256, "norm": "none"} for _ in range(3)]}


@register_preset
def test_tiny() -> dict[str, Any]:
    """A few thousand parameters, for fast tests."""
    return {"blocks": [_conv(4), _conv(8, downsample="maxpool")], "pool_grid": 1}


