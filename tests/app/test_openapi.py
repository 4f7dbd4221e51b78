"""The OpenAPI document: the served model's names and shapes, the error body on every route, and a
schemathesis run against a live server that finds no 5xx and reaches the infer routes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import API_KEY, limited_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed_server(digits_model_dir, tmp_path_factory):
    """A server of its own: the fuzzer's traffic must not show in other tests' metrics."""
    with limited_server(digits_model_dir, tmp_path_factory.mktemp("fuzz") / "server.log") as srv:
        yield srv


def test_the_document_names_the_model_its_shape_and_the_error_body(fuzzed_server):
    doc = httpx.get(f"{fuzzed_server.url}/openapi.json", timeout=30).json()
    name = httpx.get(f"{fuzzed_server.url}/v1/models", headers={"X-API-Key": API_KEY},
                     timeout=30).json()["models"][0]["name"]
    operations = [op for ops in doc["paths"].values() for op in ops.values()]
    names = [p for op in operations for p in op.get("parameters", []) if p["name"] == "name"]
    # KServe's three routes and TF Serving's three, each also with a version
    assert len(names) == 9 and all(p["schema"]["enum"] == [name] for p in names)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for op in operations:
        assert op["responses"]["default"]["content"] == error, op["summary"]
        for status, response in op["responses"].items():
            if status[0] in "45":
                assert response["content"] == error, (op["summary"], status)
    body = doc["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    arrays, plane, b64 = body["schema"]["properties"]["instances"]["items"]["anyOf"]
    assert (arrays["minItems"], arrays["items"]["minItems"], arrays["items"]["items"]["maxItems"]) \
        == (1, 8, 8)  # (C, H, W) of the digits model
    assert plane["description"] == "pixels of shape [8, 8]" and b64["required"] == ["b64"]
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    tensor = infer["application/json"]["schema"]["properties"]["inputs"]["items"]
    assert tensor["properties"]["shape"]["description"] == "[N, 1, 8, 8]"
    # the examples the document gives are answered
    for path, media in (("/predict", body), (f"/v2/models/{name}/infer", infer["application/json"])):
        r = httpx.post(fuzzed_server.url + path, json=media["example"],
                       headers={"X-API-Key": API_KEY}, timeout=30)
        assert r.status_code == 200, r.text


def test_schemathesis_finds_no_server_error_and_reaches_infer(fuzzed_server, tmp_path):
    """`st run` with every check but two. positive_data_acceptance: a schema cannot say that a
    b64 string must hold a PNG, that `data` must have N*C*H*W values, or that a binary body needs
    the Inference-Header-Content-Length header, so such schema-valid requests get a 4xx.
    negative_data_rejection: the service is lenient where it does no harm (a form's
    return_blocks=0 is false, top_k 3.0 is 3), which a schema cannot say either. Model control
    is left out: an unload would turn the rest of the run into 404s (test_model_repository.py
    covers it)."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is missing: make setup installs the test extra"
    proc = subprocess.run(
        [st, "run", f"{fuzzed_server.url}/openapi.json", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance,negative_data_rejection",
         "--max-examples", "20", "--seed", "1", "--exclude-path-regex", "^/v2/repository/",
         "--workers", "1", "--request-timeout", "30", "--header", f"X-API-Key: {API_KEY}",
         "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:]
    metrics = httpx.get(f"{fuzzed_server.url}/metrics", timeout=30).text
    counts = {(route, status): float(n) for route, status, n in re.findall(
        r'^hff_requests_total\{route="([^"]+)",status="(\d+)"\} (\S+)$', metrics, re.M)}
    # ServerProcess polls /readyz while the model warms up: those 503s are not the fuzzer's
    assert not [key for key in counts if key[1].startswith("5") and key[0] != "/readyz"], counts
    infer = {status: n for (route, status), n in counts.items()
             if route == "/v2/models/{name}/infer"}
    assert infer.get("200", 0) >= 1 and sum(infer.values()) > infer.get("404", 0), infer
