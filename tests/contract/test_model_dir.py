"""The model-dir contract: the manifest both sides read, its checks, the version rule, layering."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from contract.model_dir import (
    MANIFEST_FILE,
    Manifest,
    ModelDirError,
    graphs_version,
    load_manifest,
)
from tests.conftest import REPO

GRAPHS = ["model.onnx", "stage_1.onnx", "stage_2.onnx"]
VERSION = hashlib.sha256("".join(GRAPHS).encode()).hexdigest()[:16]  # of write_model_dir's files


def manifest_dict(**changes) -> dict:
    m = {"format_version": 1, "name": "m", "version": VERSION, "class_names": ["a", "b"],
         "input": {"shape": [1, 8, 8]}, "num_classes": 2, "num_blocks": 2,
         "stages": [{"block": k, "file": f"stage_{k}.onnx", "input_shape": shape,
                     "feature_shape": [4, 8, 8]} for k, shape in ((1, [1, 8, 8]), (2, [4, 8, 8]))],
         "early_exit": {"thresholds": [0.9]}}
    m.update(changes)
    return m


def write_model_dir(path, manifest: dict) -> None:
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    for name in GRAPHS:
        (path / name).write_bytes(name.encode())


def test_what_the_exporter_writes_the_service_reads_back(tmp_path):
    write_model_dir(tmp_path, manifest_dict())
    written = Manifest.model_validate(manifest_dict())
    (tmp_path / MANIFEST_FILE).write_text(written.model_dump_json(indent=2))
    loaded = load_manifest(tmp_path)
    assert loaded == written
    assert loaded.input.name == "input" and loaded.input.resize == "bilinear"  # the defaults
    assert loaded.graph_files == ["model.onnx", "stage_1.onnx", "stage_2.onnx"]
    assert loaded.thresholds == [0.9]


def test_unknown_keys_are_kept_for_newer_exporters(tmp_path):
    write_model_dir(tmp_path, manifest_dict(future_field={"x": 1}))
    assert load_manifest(tmp_path).model_dump()["future_field"] == {"x": 1}


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/model.onnx",
                                  "..\\model.onnx", "", ".."])
def test_graph_files_must_be_plain_names_inside_the_dir(tmp_path, name):
    write_model_dir(tmp_path, manifest_dict(full_graph=name))
    with pytest.raises(ModelDirError, match="full_graph: .* is not a plain file name"):
        load_manifest(tmp_path)
    stages = manifest_dict()["stages"]
    stages[1]["file"] = name
    write_model_dir(tmp_path, manifest_dict(stages=stages))
    with pytest.raises(ModelDirError, match="stages.1.file: .* is not a plain file name"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5])
def test_thresholds_lie_in_zero_one(tmp_path, threshold):
    write_model_dir(tmp_path, manifest_dict(early_exit={"thresholds": [threshold]}))
    with pytest.raises(ModelDirError, match=r"threshold of block 1 is .* lies in \(0, 1\]"):
        load_manifest(tmp_path)


def test_thresholds_may_be_one_or_never(tmp_path):
    for thresholds in ([1.0], [None]):
        write_model_dir(tmp_path, manifest_dict(early_exit={"thresholds": thresholds}))
        assert load_manifest(tmp_path).thresholds == thresholds


def test_other_format_versions_are_refused(tmp_path):
    write_model_dir(tmp_path, manifest_dict(format_version=2))
    with pytest.raises(ModelDirError, match="format_version 2 is not supported"):
        load_manifest(tmp_path)


def test_version_is_the_hash_of_the_graphs_in_manifest_order(tmp_path):
    write_model_dir(tmp_path, manifest_dict())
    files = load_manifest(tmp_path).graph_files
    version = graphs_version(tmp_path, files)
    assert len(version) == 16 and int(version, 16) >= 0
    assert graphs_version(tmp_path, files[::-1]) != version
    (tmp_path / "stage_2.onnx").write_bytes(b"changed")
    assert graphs_version(tmp_path, files) != version


def test_the_service_and_the_contract_never_load_torch_model_or_training():
    code = ("import sys, app.main, contract.model_dir, contract.pydantic_errors; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'model', 'training', 'onnx'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_graphs_must_hash_to_the_manifest_version(tmp_path):
    """Issue 17 row 8: a graph from another export (or stages swapped) is refused."""
    write_model_dir(tmp_path, manifest_dict())
    (tmp_path / "stage_2.onnx").write_bytes(b"another export's stage")
    with pytest.raises(ModelDirError, match="hash to version"):
        load_manifest(tmp_path)


def test_stage_shapes_must_chain(tmp_path):
    stages = manifest_dict()["stages"]
    stages[1]["input_shape"] = [1, 8, 8]
    write_model_dir(tmp_path, manifest_dict(stages=stages))
    with pytest.raises(ModelDirError, match=r"stages\[1\].input_shape is \[1, 8, 8\], but it is fed"):
        load_manifest(tmp_path)


def test_a_manifest_without_operating_points_has_the_calibrated_point_alone(tmp_path):
    write_model_dir(tmp_path, manifest_dict(early_exit={
        "thresholds": [0.9], "expected_accuracy": 0.95, "compute_fraction": 0.6}))
    points = load_manifest(tmp_path).operating_points
    assert [(p.thresholds, p.expected_accuracy, p.compute_fraction) for p in points] == \
        [([0.9], 0.95, 0.6)]
    write_model_dir(tmp_path, manifest_dict(early_exit=None))
    assert [p.thresholds for p in load_manifest(tmp_path).operating_points] == [[None]]


def test_operating_points_need_one_threshold_per_early_block(tmp_path):
    point = {"thresholds": [0.9, 0.8], "expected_accuracy": 0.9, "compute_fraction": 0.5}
    write_model_dir(tmp_path, manifest_dict(early_exit={"thresholds": [0.9],
                                                        "operating_points": [point]}))
    with pytest.raises(ModelDirError, match=r"operating_points\[0\].thresholds has 2 values"):
        load_manifest(tmp_path)
