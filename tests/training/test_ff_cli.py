"""hff-train --objective ff end to end: a loadable FF checkpoint, diagnostics, flag errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.ff import FFNet
from training.cli import main

ROOT = Path(__file__).resolve().parents[2]


def hff_train(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "training", "--no-progress", "--preset", "test-tiny", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_ff_run_writes_a_loadable_checkpoint_with_diagnostics(tmp_path: Path) -> None:
    out = tmp_path / "ff"
    proc = hff_train("--objective", "ff", "--epochs", "1", "--gamma", "0.7", "--remedy", "hardness",
                     "--ff-goodness", "sum", "--ff-score-blocks", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    config, model = load_checkpoint(out)  # config.json alone rebuilds the net
    assert isinstance(model, FFNet)
    assert config.model.ff.goodness == "sum" and config.model.ff.score_blocks == [2]
    assert config.train["ff"]["gamma"] == 0.7 and config.train["ff"]["remedy"] == "hardness"
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert len(test["separation"]) == len(test["attenuated_fraction"]) == 2
    assert all(0.0 <= f <= 1.0 for f in test["attenuated_fraction"])
    assert (out / "separation.png").stat().st_size > 0
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert model.predict(x).shape == (3,)
    assert "final test accuracy" in proc.stdout


@pytest.mark.slow
def test_hff_run_also_plots_separation(digits_run: Path) -> None:
    assert (digits_run / "separation.png").stat().st_size > 0
    test = json.loads((digits_run / "metrics.json").read_text())["test"]
    assert "attenuated_fraction" not in test and len(test["separation"]) == 3


@pytest.mark.parametrize(("args", "words"), [
    (["--gamma", "0.5"], "--gamma only apply to --objective ff"),
    (["--objective", "ff", "--gamma", "1.5"], "ff.gamma"),
    (["--objective", "ff", "--ff-score-blocks", "7"], "score_blocks"),
    (["--objective", "ff", "--ff-score-blocks", "two"], "expected e.g. 2,3"),
])
def test_bad_ff_flags_fail_with_one_line(tmp_path: Path, capsys, args: list[str], words: str) -> None:
    code = main([*args, "--preset", "test-tiny", "--epochs", "1", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / "config.json").exists()
