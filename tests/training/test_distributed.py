"""Multi-process training with torch.distributed (gloo on CPU): torchrun end to end, and resume."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model.checkpoint import load_checkpoint
from model.config import preset_config
from tests.conftest import free_port
from training import distributed
from training.data import load_dataset
from training.trainer import TrainConfig, Trainer, make_run_config

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--dataset", "digits", "--preset", "digits-cnn", "--epochs", "3", "--batch-size", "64",
        "--seed", "1", "--no-progress"]


def _env() -> dict[str, str]:
    # One thread per process: two ranks on a 2-core machine, and no oversubscription.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train(cmd: list[str], out: Path) -> dict:
    proc = subprocess.run(cmd + ARGS + ["--out", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    one = _train([sys.executable, "-m", "training"], tmp_path / "one")
    two = _train([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", "2", "-m", "training"], tmp_path / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    # Exactly one checkpoint, complete, with no stray temp files from a second writer.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())
    assert not list(tmp_path.rglob("*.tmp"))
    _, model = load_checkpoint(tmp_path / "two")
    data = load_dataset("digits")
    x, y = zip(*(data.test[i] for i in range(len(data.test))), strict=True)
    with torch.no_grad():
        acc = (model(torch.stack(x))[-1].argmax(1) == torch.stack(y)).float().mean().item()
    assert acc == pytest.approx(two["final_test_accuracy"], abs=1e-6)  # metrics match weights
    # Same global batch, so the same optimisation up to sampling order and per-rank BatchNorm.
    assert one["final_test_accuracy"] > 0.85
    assert abs(two["final_test_accuracy"] - one["final_test_accuracy"]) < 0.05


class _Stop(Exception):
    pass


def _rank_main(rank: int, world: int, port: int, out: str, stop_after: int, resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info, device = distributed.init("cpu")
    try:
        data = load_dataset("digits")
        model = preset_config("test-tiny", input_shape=data.input_shape,
                              class_names=data.class_names, input_mean=data.mean,
                              input_std=data.std)
        config = make_run_config(model, "digits", None, seed=2,
                                 train=TrainConfig(epochs=2, batch_size=128))
        trainer = Trainer(config, data, out, device=device, progress=False, dist_info=info)
        if resume:
            trainer.load_state()
        if stop_after:  # a run killed right after an epoch's checkpoint
            save = trainer._save_epoch

            def save_then_stop(epoch: int) -> None:
                save(epoch)
                if epoch == stop_after:
                    raise _Stop

            trainer._save_epoch = save_then_stop
        with contextlib.suppress(_Stop):
            trainer.fit()
    finally:
        distributed.shutdown()


def _spawn(out: Path, stop_after: int = 0, resume: bool = False) -> None:
    mp.start_processes(_rank_main, args=(2, free_port(), str(out), stop_after, resume),
                       nprocs=2, join=True, start_method="fork")


@pytest.mark.slow
def test_two_rank_resume_takes_the_same_path(tmp_path):
    _spawn(tmp_path / "whole")
    _spawn(tmp_path / "broken", stop_after=1)
    assert not (tmp_path / "broken" / "metrics.json").exists()
    _spawn(tmp_path / "broken", resume=True)
    _, whole = load_checkpoint(tmp_path / "whole")
    _, resumed = load_checkpoint(tmp_path / "broken")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
