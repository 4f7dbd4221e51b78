"""A broken model dir is refused before the server says ready: one line and a non-zero exit
(issue 17 rows 5 and 8), whether the manifest was edited or the graphs were swapped."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import httpx
import pytest

from app.main import create_app, main
from app.settings import Settings
from contract.model_dir import ModelDirError
from tests.app.conftest import REPO, repo_env

pytestmark = pytest.mark.slow


@pytest.fixture
def model_copy(digits_model_dir, tmp_path):
    out = tmp_path / "digits"
    shutil.copytree(digits_model_dir, out)
    return out


def edit_manifest(model_dir, **changes) -> None:
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        target, *keys = key.split("__")
        node = manifest
        for k in [target, *keys][:-1]:
            node = node[k]
        node[[target, *keys][-1]] = value
    path.write_text(json.dumps(manifest))


def refused(model_dir, capsys) -> str:
    """hff-serve's one error line for `model_dir` (it must exit non-zero without serving)."""
    assert main(["--model-dir", str(model_dir), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_swapped_stage_graphs_are_refused_by_the_real_cli(model_copy):
    """Row 5: stage graphs swapped: one line naming the mismatch, exit 2, nothing served."""
    (model_copy / "stage_1.onnx").rename(model_copy / "tmp.onnx")
    (model_copy / "stage_2.onnx").rename(model_copy / "stage_1.onnx")
    (model_copy / "tmp.onnx").rename(model_copy / "stage_2.onnx")
    proc = subprocess.run([sys.executable, "-m", "app", "--model-dir", str(model_copy), "--port",
                           "0"], cwd=REPO, env=repo_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "hash to version" in lines[0], proc.stderr


@pytest.mark.parametrize("changes, words", [
    ({"input__shape": [1, 16, 16]}, "input_shape"),  # row 5: input.shape wrong
    ({"version": "0123456789abcdef"}, "hash to version"),  # row 8: a graph from another export
    ({"full_graph": "../../../../etc/passwd"}, "not a plain file name"),  # row 8
    ({"full_graph": "/tmp/elsewhere/model.onnx"}, "not a plain file name"),  # row 8
    ({"early_exit__thresholds": [-5, 7]}, "lies in (0, 1]"),  # row 8
], ids=["input shape", "version", "relative escape", "absolute path", "thresholds"])
def test_edited_manifests_are_refused(model_copy, capsys, changes, words):
    edit_manifest(model_copy, **changes)
    assert words in refused(model_copy, capsys)


def test_class_count_must_match_the_graphs(model_copy, capsys):
    """Row 8: num_classes 5 against a 10-class graph was served, then a 500 for labels >= 5."""
    edit_manifest(model_copy, num_classes=5, class_names=list("abcde"))
    err = refused(model_copy, capsys)
    assert "probs_1 has shape [batch, 10]" in err and "[batch, 5]" in err, err


def test_a_graph_linked_from_outside_the_model_dir_is_refused(model_copy, tmp_path, capsys):
    """Row 8: an absolute path to another model, smuggled in as a symlink."""
    other = tmp_path / "other"
    shutil.copytree(model_copy, other)
    (model_copy / "model.onnx").unlink()
    (model_copy / "model.onnx").symlink_to(other / "model.onnx")
    assert "points outside the model dir" in refused(model_copy, capsys)


def test_a_warm_up_failure_is_one_line_and_stops_the_server(digits_model_dir, caplog):
    """Row 5: a failing warm-up used to leave /healthz 200 and /readyz 'warming up' forever."""
    app = create_app(Settings(MODEL_DIR=digits_model_dir, MAX_BATCH_SIZE=2))
    repository = app.state.repository
    stopped = []
    repository.on_failure = lambda: stopped.append(True)

    def broken_warm_up() -> float:
        raise ModelDirError("stage_2.onnx: a graph fails on a batch of 1 zero images: boom")

    repository.find(None).runtime.warm_up = broken_warm_up

    async def go():
        async with app.router.lifespan_context(app):
            while repository.failure is None:
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.get("/readyz")

    ready = asyncio.run(go())
    assert stopped == [True]
    assert ready.status_code == 503 and "warm-up failed" in ready.json()["error"]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "boom" in errors[0].getMessage() and not errors[0].exc_info
