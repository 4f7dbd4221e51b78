"""The early-exit trade-off plot: validation accuracy against compute, with the calibrated point
and the cheaper operating points a server under load may move to marked."""

from __future__ import annotations

from pathlib import Path

from contract.model_dir import EarlyExitSpec
from model import atomic
from model.calibration import ExitStats


def plot_trade_off(curve: list[tuple[float | None, ExitStats]], early_exit: EarlyExitSpec,
                   path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [s.compute_fraction * 100 for _, s in curve]
    ys = [s.accuracy * 100 for _, s in curve]
    ax.plot(xs, ys, "o-", color="tab:blue", label="one threshold for every block")
    last = None
    for (t, _), x, y in zip(curve, xs, ys, strict=True):
        if (x, y) == last:  # thresholds that change nothing would print on top of each other
            continue
        last = (x, y)
        ax.annotate("never" if t is None else f"{t:g}", (x, y), fontsize=7,
                    textcoords="offset points", xytext=(3, -10))
    points = early_exit.operating_points[1:]  # [0] is the calibrated point, starred below
    if points:
        ax.plot([p.compute_fraction * 100 for p in points],
                [p.expected_accuracy * 100 for p in points], "s", ms=6, color="tab:orange",
                label="operating points under load")
        for i, p in enumerate(points, 1):
            ax.annotate(f"#{i}", (p.compute_fraction * 100, p.expected_accuracy * 100),
                        fontsize=7, color="tab:orange", textcoords="offset points",
                        xytext=(-4, 6))
    ax.plot([early_exit.compute_fraction * 100], [early_exit.expected_accuracy * 100], "*",
            ms=14, color="tab:red", label="calibrated thresholds (point #0)")
    ax.axhline(early_exit.full_accuracy * 100, color="grey", ls="--", lw=1, label="full network")
    ax.axhline((early_exit.full_accuracy - early_exit.epsilon) * 100, color="grey", ls=":",
               lw=1, label="full - epsilon")
    ax.set_xlabel("mean compute executed (% of the full network's MACs)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    try:
        atomic.write_with(path, lambda p: fig.savefig(p, format="png", dpi=120))
    finally:
        plt.close(fig)
