"""The early-exit mode has one parser: settings, JSON bodies, form fields and KServe parameters
accept the same forms and refuse the rest with the same words."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.early_exit import parse_early_exit
from app.schemas import PredictOptions, PredictRequest, V2InferRequest
from app.settings import Settings

ACCEPTED = [("auto", "auto"), (" OFF ", "off"), (0.9, 0.9), ("0.5", 0.5), (1, 1.0),
            ({"threshold": 0.25}, 0.25)]
REFUSED = ["soon", 0, 1.5, float("nan"), True, {"threshold": "0.9"}, {"threshold": 0.9, "x": 1},
           {"limit": 0.9}, [0.9], None]


def readers(tmp_path):
    """Each place a mode comes from, as a function of the value given there."""
    (tmp_path / "manifest.json").write_text("{}")
    return {
        "parser": parse_early_exit,
        "settings": lambda v: Settings(MODEL_DIR=tmp_path, EARLY_EXIT=v).EARLY_EXIT,
        "json body": lambda v: PredictRequest.model_validate(
            {"instances": [], "early_exit": v}).early_exit,
        "form fields": lambda v: PredictOptions.model_validate({"early_exit": v}).early_exit,
        "kserve parameters": lambda v: V2InferRequest.model_validate(
            {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [0]}],
             "parameters": {"early_exit": v}}).parameters.early_exit,
    }


@pytest.mark.parametrize("value,mode", ACCEPTED)
def test_every_reader_accepts_the_same_forms(tmp_path, value, mode):
    for where, read in readers(tmp_path).items():
        assert read(value) == mode, where


@pytest.mark.parametrize("value", REFUSED)
def test_every_reader_refuses_the_rest_naming_the_valid_forms(tmp_path, value):
    for where, read in readers(tmp_path).items():
        if value is None and where not in ("parser", "settings"):
            continue  # an absent mode (null) means the server's default in requests
        with pytest.raises((ValueError, ValidationError),
                           match=r"early_exit must be 'auto', 'off' or a threshold in \(0, 1\]"):
            read(value)
