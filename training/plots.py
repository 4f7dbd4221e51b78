"""Training plots (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from model import atomic


def plot_curves(history: Sequence, path: str | Path, title: str = "") -> None:
    """Per-block train/val accuracy by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in history]
    blocks = len(history[0].val_acc) if history else 0
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.cm.viridis([i / max(1, blocks - 1) for i in range(blocks)])
    for k in range(blocks):
        ax.plot(epochs, [r.val_acc[k] for r in history], color=colors[k], label=f"block {k + 1} val")
        ax.plot(epochs, [r.train_acc[k] for r in history], color=colors[k], ls="--", alpha=0.5,
                label=f"block {k + 1} train")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if blocks:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    else:  # stopped before its first epoch ended: an empty plot that says why
        ax.text(0.5, 0.5, "no epoch finished", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    atomic.write_with(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def plot_separation(test: dict, path: str | Path, title: str = "") -> None:
    """Per-block test separation and accuracy; for FF also the share of examples with R < 0.01."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(range(1, len(test["separation"]) + 1))
    panels = 3 if "attenuated_fraction" in test else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.4))
    axes[0].bar(blocks, test["separation"], color="tab:blue")
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_title("separation: true - hardest other", fontsize=9)
    axes[1].plot(blocks, test["accuracy"], marker="o", color="tab:green")
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("accuracy from this block alone", fontsize=9)
    if panels == 3:
        axes[2].bar(blocks, test["attenuated_fraction"], color="tab:red", label="share with R < 0.01")
        if "attenuation_median" in test:
            axes[2].plot(blocks, test["attenuation_median"], marker="o", color="black",
                         label="median R")
        axes[2].set_ylim(0, 1.02)
        axes[2].set_title("gradient attenuation R (cumulative FF)", fontsize=9)
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("block")
        ax.set_xticks(blocks)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic.write_with(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
