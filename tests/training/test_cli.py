"""hff-train as a user runs it: artifacts, resume after SIGKILL, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import load_checkpoint
from tests.conftest import REPO, run_module
from training import allocator, cli


@pytest.mark.slow
def test_run_writes_complete_checkpoint_dir(digits_run):
    names = {p.name for p in digits_run.iterdir()}
    assert {"config.json", "weights.safetensors", "metrics.json", "metrics.csv", "curves.png",
            "heldout_probs.safetensors"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["epochs"] == 12
    assert len(metrics["test"]["accuracy"]) == len(metrics["test"]["separation"]) == 3
    assert metrics["final_test_accuracy"] == metrics["test"]["accuracy"][-1] > 0.9
    # hff-train re-executed itself on jemalloc where it is installed (training/allocator.py).
    assert metrics["allocator"] == ("jemalloc" if allocator.find_jemalloc() else "glibc")
    rows = (digits_run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith("epoch,lr,time_s,train_loss_1")
    config, model = load_checkpoint(digits_run)
    assert config.dataset == "digits" and config.train["epochs"] == 12


def _weights(run_dir):
    return load_file(str(run_dir / "weights.safetensors"))


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    args = ["--dataset", "digits", "--preset", "test-tiny", "--epochs", "25", "--no-progress"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "training", *args, "--out", str(killed)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "train_state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "metrics.json").exists()
    done_before = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= done_before < 25

    resumed = run_module("training", "--out", str(killed), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {killed} after epoch" in resumed.stderr
    metrics = json.loads((killed / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == list(range(1, 26))

    # Shuffling and augmentation are seeded per epoch: the resumed run equals an unbroken one.
    straight = tmp_path / "straight"
    assert run_module("training", *args, "--out", str(straight)).returncode == 0
    a, b = _weights(killed), _weights(straight)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_existing_run_is_not_overwritten_by_accident(digits_run):
    before = (digits_run / "weights.safetensors").read_bytes()
    proc = run_module("training", "--out", str(digits_run), "--epochs", "1")
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr
    assert (digits_run / "weights.safetensors").read_bytes() == before




@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "imagenet-21k"], "unknown data set 'imagenet-21k'"),
        (["--preset", "resnet-9000"], "unknown preset 'resnet-9000'"),
        (["--objective", "magic"], "unknown objective 'magic'"),
        (["--epochs", "0"], "epochs"),
        (["--epochs", "three"], "invalid int value"),
        (["--objective", "backprop", "--micro-batches", "2"], "needs objective 'hff'"),
        (["--resume", "--out", "{tmp}/nothing-here"], "does not exist"),
        (["--resume", "--out", "{tmp}/corrupt"], "not valid JSON"),
        (["--out", "{tmp}/a-file/run"], "cannot write to output dir"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, args, message):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{truncated")
    args = [a.format(tmp=tmp_path) for a in args]
    try:
        status = cli.main(["--no-progress", *args])  # in-process: the same code the script runs
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_error_exit_of_the_real_process_has_no_traceback():
    proc = run_module("training", "--dataset", "imagenet-21k", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("hff-train: error: unknown data set")
    assert "Traceback" not in proc.stderr


def test_config_flags_come_from_the_config_models(capsys):
    """A flag's choices, default and help are its config field's; a flag left out is not passed,
    so the model's own default applies; --help shows no default that says nothing."""
    from model.config import FFConfig
    from training.ff_objectives import FFTrainConfig
    from training.flags import given
    from training.trainer import TrainConfig

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "(default: None)" not in text and "(default: False)" not in text
    for model, flags in [(TrainConfig, cli.TRAIN_FLAGS), (FFConfig, cli.FF_MODEL_FLAGS),
                         (FFTrainConfig, cli.FF_TRAIN_FLAGS)]:
        for name, flag in flags.items():
            field = model.model_fields[name]
            assert field.description in text, flag
            if field.default is not None:
                assert f"{field.description} (default: {field.default})" in text, flag
    assert "--remedy {none,per-block,hardness,depth}" in text

    args = cli.build_parser().parse_args(["--gamma", "0.5", "--ff-score-blocks", "2,3",
                                          "--epochs", "3"])
    assert given(args, FFTrainConfig, cli.FF_TRAIN_FLAGS) == {"gamma": 0.5}
    assert given(args, FFConfig, cli.FF_MODEL_FLAGS) == {"score_blocks": [2, 3]}
    assert given(args, TrainConfig, cli.TRAIN_FLAGS) == {"epochs": 3}
