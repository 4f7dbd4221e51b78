"""hff-serve's command line: a bad model dir or setting is one line and exit status 2."""

from __future__ import annotations

import json

import pytest

from app.main import main
from contract.model_dir import ModelDirError, load_manifest


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_missing_model_dir_is_one_line(tmp_path, capsys):
    assert main(["--model-dir", str(tmp_path / "nope")]) == 2
    assert "hff-serve: error: HFF_MODEL_DIR: model dir" in error_line(capsys)


def test_bad_environment_setting_names_the_variable(tmp_path, capsys, monkeypatch):
    (tmp_path / "manifest.json").write_text("{}")
    monkeypatch.setenv("HFF_MAX_BATCH_SIZE", "0")
    assert main(["--model-dir", str(tmp_path)]) == 2
    assert "HFF_MAX_BATCH_SIZE: Input should be greater than or equal to 1" in error_line(capsys)


def test_broken_manifest_is_one_line(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "name": "x"}')
    assert main(["--model-dir", str(tmp_path)]) == 2
    assert "does not match the model-dir contract" in error_line(capsys)


def test_manifest_checks_name_the_file_and_field(tmp_path):
    good = {"format_version": 1, "name": "m", "version": "v", "class_names": ["a", "b"],
            "input": {"name": "input", "shape": [1, 8, 8], "dtype": "float32", "range": [0, 1]},
            "num_classes": 2, "num_blocks": 2, "full_graph": "model.onnx",
            "early_exit": {"thresholds": [0.9, 0.8]}}
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    with pytest.raises(ModelDirError, match="expected num_blocks - 1 = 1"):
        load_manifest(tmp_path)
    good["early_exit"]["thresholds"] = [None]
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    with pytest.raises(ModelDirError, match="model.onnx is missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_device_choice_falls_back_to_the_cpu_without_a_cuda_provider(monkeypatch, caplog):
    from app import runtime

    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CPU])
    assert runtime.choose_providers("auto") == [runtime.CPU]
    assert runtime.choose_providers("cuda") == [runtime.CPU]
    assert "serving on the CPU" in caplog.text
    offered = [runtime.CUDA, runtime.CPU]
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: offered)
    assert runtime.choose_providers("auto") == offered
    assert runtime.choose_providers("cpu") == [runtime.CPU]
    assert runtime.batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert runtime.batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
