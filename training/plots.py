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
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    atomic.write_with(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
