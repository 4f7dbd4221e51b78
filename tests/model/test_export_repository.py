"""hff-export --repository: the next version of a model in a Triton-layout repository, published
complete in one rename; concurrent exports never share a number; bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model import export, export_cli, onnx_verify
from tests.conftest import REPO


def one_line_error(capsys, argv: list[str]) -> str:
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hff-export: error: "), err
    return err


def run_graph(model_dir: Path, x: np.ndarray) -> np.ndarray:
    """The full graph's last-block probabilities from onnxruntime."""
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[-1]


def parse_argv(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        export_cli.main(argv)
    return stop.value.code


@pytest.mark.parametrize("argv, words", [
    (["run", "--out", "m", "--repository", "repo", "--name", "a"], "not allowed with argument --out"),
    (["run"], "one of the arguments --out --repository is required"),
    (["run", "--repository", "repo"], "--repository needs --name"),
])
def test_argument_mistakes_are_one_line(capsys, argv, words):
    assert parse_argv(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("name", ["a/b", "..", ".hidden", "-x", "a b", "x" * 129, ""])
def test_a_name_that_is_no_path_segment_is_refused(tmp_path, capsys, name):
    err = one_line_error(capsys, [str(tmp_path), "--repository", str(tmp_path / "repo"),
                                  f"--name={name}"])
    assert "is not usable in a repository" in err
    assert not (tmp_path / "repo").exists()


def test_a_file_in_place_of_the_repository_or_the_model_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("in the way")
    err = one_line_error(capsys, [str(tmp_path), "--repository", str(tmp_path / "file"),
                                  "--name", "m"])
    assert "--repository" in err and "is a file, not a directory" in err
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "m").write_text("in the way")
    err = one_line_error(capsys, [str(tmp_path), "--repository", str(repo), "--name", "m"])
    assert "is a file, not a directory" in err
    assert (repo / "m").read_text() == "in the way"


def test_a_version_taken_meanwhile_makes_the_export_take_the_next(tmp_path, monkeypatch):
    """Two exports that both saw version 1 as the newest: rename(2) refuses the second one's
    target, and it takes 3."""
    model_root = tmp_path / "repo" / "m"
    (model_root / "1").mkdir(parents=True)
    (model_root / "2").mkdir()
    (model_root / "2" / "manifest.json").write_text("{}")  # the other export, just published
    real = export.repository_versions
    calls = []

    def stale_once(root: Path) -> list[int]:
        calls.append(root)
        return [1] if len(calls) == 1 else real(root)

    monkeypatch.setattr(export, "repository_versions", stale_once)
    tmp = model_root / ".m.1.abcdefgh.tmp"
    tmp.mkdir()
    (tmp / "manifest.json").write_text('{"mine": true}')
    assert export._publish_version(tmp, model_root) == model_root / "3"
    assert json.loads((model_root / "3" / "manifest.json").read_text()) == {"mine": True}
    assert (model_root / "2" / "manifest.json").read_text() == "{}"  # the other one untouched
    assert len(calls) == 2


def test_versions_are_numbers_only(tmp_path):
    model_root = tmp_path / "m"
    for name in ["1", "10", "9", ".m.123.abcdefgh.tmp", "latest", "v11", "-3"]:
        (model_root / name).mkdir(parents=True)
    (model_root / "12").write_text("a file takes its number too")
    assert export.repository_versions(model_root) == [1, 9, 10, 12]
    assert export.repository_versions(tmp_path / "missing") == []


@pytest.mark.slow
def test_exports_publish_versions_one_after_another(tiny_run, tiny_export, tmp_path, capsys):
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        assert export_cli.main([str(tiny_run), "--repository", str(repo), "--name", "tiny"]) == 0
        assert f"model dir: {repo / 'tiny' / version}" in capsys.readouterr().out
    model_root = repo / "tiny"
    assert sorted(p.name for p in model_root.iterdir()) == ["1", "2"]  # no temp dir left
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    expected = run_graph(tiny_export[0], x)  # the same checkpoint exported with --out
    for version in ("1", "2"):
        model_dir = model_root / version
        manifest = json.loads((model_dir / "manifest.json").read_text())
        assert manifest["name"] == "tiny"
        assert manifest["version"] == json.loads((tiny_export[0] / "manifest.json").read_text())["version"]
        assert oct(model_dir.stat().st_mode & 0o777) != oct(0o700)  # readable by the server's user
        np.testing.assert_allclose(run_graph(model_dir, x), expected, atol=1e-6)
        assert np.allclose(run_graph(model_dir, x).sum(1), 1, atol=1e-5)

    # A stale temp dir of a killed export is cleaned up, never taken for a version; a version
    # made by hand is respected (the next is one past the newest, gaps and all).
    stale = model_root / ".tiny.999999999.abcdefgh.tmp"
    stale.mkdir()
    os.utime(stale, (0, 0))
    (model_root / "7").mkdir()
    assert export.export_to_repository(tiny_run, repo, "tiny").model_dir == model_root / "8"
    assert sorted(p.name for p in model_root.iterdir()) == ["1", "2", "7", "8"]


@pytest.mark.slow
def test_concurrent_exports_take_different_numbers(tiny_run, tmp_path):
    repo = tmp_path / "repo"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "model.export_cli", str(tiny_run),
                               "--repository", str(repo), "--name", "tiny"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    model_root = repo / "tiny"
    assert sorted(p.name for p in model_root.iterdir()) == ["1", "2", "3"]
    for version in ("1", "2", "3"):
        assert (model_root / version / "manifest.json").is_file()


@pytest.mark.slow
def test_a_failed_export_publishes_nothing(tiny_run, tmp_path, capsys, monkeypatch):
    real = onnx_verify.run_session
    monkeypatch.setattr(onnx_verify, "run_session",
                        lambda sess, x: [out + np.float32(1e-3) for out in real(sess, x)])
    repo = tmp_path / "repo"
    (repo / "tiny" / "1").mkdir(parents=True)
    assert export_cli.main([str(tiny_run), "--repository", str(repo), "--name", "tiny"]) == 2
    assert "onnxruntime disagrees with torch" in capsys.readouterr().err
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1"]
