"""Training plots: written as PNG files, also for a run that stopped before its first epoch."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

from PIL import Image

from training.plots import plot_curves


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_curves_of_a_history_are_written_as_png_without_a_warning(tmp_path):
    history = [SimpleNamespace(epoch=e, val_acc=[0.5 + 0.1 * e, 0.6], train_acc=[0.4, 0.5])
               for e in (1, 2, 3)]
    path = tmp_path / "curves.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves(history, path, title="digits")
    assert _png_size(path)[0] > 0


def test_curves_of_an_empty_history_are_written_without_a_warning(tmp_path):
    path = tmp_path / "curves.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned of a legend with no lines
        plot_curves([], path)
    assert _png_size(path)[0] > 0
