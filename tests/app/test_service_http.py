"""The service over real HTTP (on uvicorn and on granian, in a subprocess) against direct onnxruntime outputs."""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import io
import json

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tests.app.conftest import metric

pytestmark = pytest.mark.slow


class Reference:
    """The model dir run directly with onnxruntime: the full graph and the stage chain."""

    def __init__(self, model_dir):
        self.manifest = json.loads((model_dir / "manifest.json").read_text())
        self.full = ort.InferenceSession(str(model_dir / "model.onnx"))
        self.stages = [ort.InferenceSession(str(model_dir / s["file"]))
                       for s in self.manifest["stages"]]

    def full_probs(self, x: np.ndarray) -> np.ndarray:
        return self.full.run(None, {"input": x})[-1]

    def early_exit(self, x: np.ndarray, thresholds) -> tuple[np.ndarray, np.ndarray]:
        """Row by row, the obvious way: (exit-block probabilities, 1-based exit blocks)."""
        probs, blocks = [], []
        for row in x:
            h = row[None]
            for k, stage in enumerate(self.stages):
                h, p = stage.run(["features", "probs"], {"input": h})
                t = thresholds[k] if k < len(thresholds) else None
                if (t is None or p.max() < t) and k < len(self.stages) - 1:
                    continue
                probs.append(p[0])
                blocks.append(k + 1)
                break
        return np.stack(probs), np.array(blocks)


@pytest.fixture(scope="module")
def ref(digits_model_dir):
    return Reference(digits_model_dir)


def predict(client, x, **options):
    r = client.post("/predict", json={"instances": x.tolist(), **options})
    assert r.status_code == 200, r.text
    return r.json()


def probs_of(response, num_classes):
    out = np.zeros((len(response["predictions"]), num_classes))
    for i, p in enumerate(response["predictions"]):
        for t in p["top_k"]:
            out[i, t["label"]] = t["probability"]
    return out


def test_predictions_equal_direct_onnxruntime(client, ref, digits_test_split):
    x = digits_test_split[0][:40]
    classes = ref.manifest["num_classes"]
    off = predict(client, x, early_exit="off", top_k=classes)
    assert off["model"] == {"name": ref.manifest["name"], "version": ref.manifest["version"]}
    np.testing.assert_allclose(probs_of(off, classes), ref.full_probs(x), atol=1e-5)
    assert {p["exit_block"] for p in off["predictions"]} == {ref.manifest["num_blocks"]}

    thresholds = ref.manifest["early_exit"]["thresholds"]
    want_probs, want_blocks = ref.early_exit(x, thresholds)
    auto = predict(client, x, early_exit="auto", top_k=classes)
    assert [p["exit_block"] for p in auto["predictions"]] == want_blocks.tolist()
    np.testing.assert_allclose(probs_of(auto, classes), want_probs, atol=1e-5)
    for p, probs in zip(auto["predictions"], want_probs, strict=True):
        assert p["label"] == int(probs.argmax()) and p["class_name"] == str(p["label"])
        assert p["confidence"] == pytest.approx(float(probs.max()), abs=1e-6)

    t = 0.6
    mine = predict(client, x, early_exit={"threshold": t}, top_k=classes)
    _, want_blocks = ref.early_exit(x, [t] * (ref.manifest["num_blocks"] - 1))
    assert [p["exit_block"] for p in mine["predictions"]] == want_blocks.tolist()


def test_accuracy_over_http_equals_the_exporters(client, ref, digits_splits):
    m, ee = ref.manifest, ref.manifest["early_exit"]
    acc, blocks = {}, {}
    for split, (x, y) in digits_splits.items():
        for mode in ("off", "auto"):
            labels, exits = [], []
            for lo in range(0, len(x), 64):  # 64 instances, batches of 32: requests get split
                preds = predict(client, x[lo:lo + 64], early_exit=mode)["predictions"]
                labels += [p["label"] for p in preds]
                exits += [p["exit_block"] for p in preds]
            acc[split, mode] = float(np.mean(np.array(labels) == y))
            blocks[split, mode] = float(np.mean(exits))
    assert acc["test", "off"] == pytest.approx(m["test_accuracy_per_block"][-1], abs=1e-9)
    assert acc["test", "auto"] == pytest.approx(ee["test_accuracy"], abs=1e-9)
    assert acc["val", "off"] == pytest.approx(ee["full_accuracy"], abs=1e-9)
    assert acc["val", "auto"] == pytest.approx(ee["expected_accuracy"], abs=1e-9)
    # early exit answers earlier on average and keeps the bound it was calibrated for (on val)
    assert blocks["test", "auto"] < blocks["test", "off"] == m["num_blocks"]
    assert blocks["val", "auto"] == pytest.approx(ee["mean_blocks"], abs=1e-9)
    assert acc["val", "auto"] >= acc["val", "off"] - ee["epsilon"] - 1e-9


def test_return_blocks_lists_every_block_that_ran(client, ref, digits_test_split):
    x = digits_test_split[0][:10]
    m = ref.manifest
    preds = predict(client, x, return_blocks=True)["predictions"]
    for p in preds:
        blocks = p["blocks"]
        assert [b["block"] for b in blocks] == list(range(1, p["exit_block"] + 1))
        for b in blocks:
            assert len(b["probabilities"]) == m["num_classes"]
            assert sum(b["probabilities"]) == pytest.approx(1.0, abs=1e-4)
            want = m["early_exit"]["thresholds"][b["block"] - 1] if b["block"] < m["num_blocks"] else None
            assert b["threshold"] == (None if want is None else pytest.approx(want))
        assert blocks[-1]["probabilities"][p["label"]] == pytest.approx(p["confidence"])
    assert "blocks" not in predict(client, x[:1])["predictions"][0]


def test_image_uploads_match_the_same_pixels_as_arrays(client, digits_test_split):
    img = (digits_test_split[0][:3, 0] * 255).round().astype(np.uint8)  # (3, 8, 8)
    pngs = []
    for a in img:
        buf = io.BytesIO()
        Image.fromarray(a, "L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    arrays = predict(client, img / 255.0, early_exit="off", top_k=10)
    r = client.post("/predict", json={"instances": [{"b64": base64.b64encode(p).decode()}
                                                    for p in pngs], "early_exit": "off", "top_k": 10})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(probs_of(r.json(), 10), probs_of(arrays, 10), atol=1e-6)
    files = [("file", (f"d{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    r = client.post("/predict", files=files, data={"early_exit": "off", "top_k": "10"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(probs_of(r.json(), 10), probs_of(arrays, 10), atol=1e-6)


def test_kserve_v2(client, ref, digits_test_split):
    x = digits_test_split[0][:5]
    name = ref.manifest["name"]
    meta = client.get(f"/v2/models/{name}").json()
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    assert client.get(f"/v2/models/{name}/ready").json()["ready"] is True
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    body = {"id": "req-1", "inputs": [{"name": "input", "shape": [5, 1, 8, 8], "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}],
            "parameters": {"early_exit": "off"}}
    r = client.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "req-1" and out["probabilities"]["shape"] == [5, 10]
    probs = np.array(out["probabilities"]["data"]).reshape(5, 10)
    np.testing.assert_allclose(probs, ref.full_probs(x), atol=1e-5)
    assert out["exit_block"]["data"] == [ref.manifest["num_blocks"]] * 5



def binary_infer_body(x: np.ndarray, **tensor_overrides) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 request in the binary tensor data extension: JSON header, then raw FP32."""
    data = x.astype("<f4").tobytes()
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32",
              "parameters": {"binary_data_size": len(data)}, **tensor_overrides}
    header = json.dumps({"inputs": [tensor], "parameters": {"early_exit": "off"}}).encode()
    return header + data, {"content-type": "application/octet-stream",
                           "inference-header-content-length": str(len(header))}


def test_kserve_v2_binary_tensor_data(client, ref, digits_test_split):
    x = digits_test_split[0][:5]
    name = ref.manifest["name"]
    server = client.get("/v2").json()
    assert "binary_tensor_data" in server["extensions"]
    assert server["version"] == importlib.metadata.version("hff-serve")  # pyproject's, read once
    assert client.get("/openapi.json").json()["info"]["version"] == server["version"]
    body, headers = binary_infer_body(x)
    r = client.post(f"/v2/models/{name}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert "id" not in r.json()  # no id sent, none echoed (not a null where v2 says string)
    probs = np.array(out["probabilities"]["data"]).reshape(5, 10)
    np.testing.assert_allclose(probs, ref.full_probs(x), atol=1e-5)


def _binary_case(x, cut=0, header_length=None, content_type=None, **tensor_overrides):
    body, headers = binary_infer_body(x, **tensor_overrides)
    if header_length is not None:
        headers["inference-header-content-length"] = header_length
    if content_type is not None:
        headers["content-type"] = content_type
    return {"content": body[:len(body) - cut], "headers": headers}


_X1 = np.full((1, 1, 8, 8), 0.5, dtype=np.float32)
BINARY_MALFORMED = [
    ("binary truncated", _binary_case(_X1, cut=4), 400, "but 252 bytes follow the JSON header"),
    ("binary header length not a number", _binary_case(_X1, header_length="ten"), 400,
     "Inference-Header-Content-Length is 'ten'"),
    ("binary header length past the body", _binary_case(_X1, header_length="100000"), 400,
     "but the body has"),
    ("binary wrong shape", _binary_case(_X1, shape=[1, 1, 8, 4]), 422, "expected [N, 1, 8, 8]"),
    ("binary size mismatch shape", _binary_case(np.zeros((2, 1, 8, 8), np.float32), shape=[1, 1, 8, 8]),
     422, "512 bytes of binary data, shape [1, 1, 8, 8] in FP32 needs 256"),
    ("binary NaN", _binary_case(np.full((1, 1, 8, 8), np.nan, np.float32)), 422, "NaN or infinity"),
    ("binary and data both", _binary_case(_X1, data=[0.0] * 64), 422, "both data and"),
    ("binary without header", {"content": b"\x00" * 256,
                               "headers": {"content-type": "application/octet-stream"}}, 415,
     "Inference-Header-Content-Length header"),
    ("binary wrong content type", _binary_case(_X1, content_type="text/plain"), 415,
     "'text/plain' is not accepted"),
]


@pytest.mark.parametrize("case, kwargs, status, words", BINARY_MALFORMED,
                         ids=[c[0] for c in BINARY_MALFORMED])
def test_malformed_binary_tensors_get_the_right_4xx(client, ref, case, kwargs, status, words):
    r = client.post(f"/v2/models/{ref.manifest['name']}/infer", **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()

def test_models_route_describes_the_model(client, ref):
    info = client.get("/v1/models").json()["models"][0]
    m = ref.manifest
    assert info["name"] == m["name"] and info["version"] == m["version"]
    assert info["device"] == "cpu" and info["execution_providers"] == ["CPUExecutionProvider"]
    assert info["input"] == {"name": "input", "shape": [1, 8, 8], "dtype": "float32",
                             "range": [0.0, 1.0]}
    assert info["num_blocks"] == m["num_blocks"] and info["num_classes"] == 10
    ee, points = info["early_exit"], m["early_exit"]["operating_points"]
    assert ee["default_mode"] == "auto" and ee["thresholds"] == m["early_exit"]["thresholds"]
    assert ee["current_point"] == 0 and ee["latency_target_ms"] is None
    assert ee["scheduling"] == "batch"
    floor = points[0]["expected_accuracy"] - 0.02  # the default HFF_MIN_ACCURACY
    assert ee["min_accuracy"] == pytest.approx(floor)
    usable = [p for p in points if p["expected_accuracy"] >= floor]
    assert [p["thresholds"] for p in ee["operating_points"]] == [p["thresholds"] for p in usable]
    assert info["test_accuracy_per_block"] == m["test_accuracy_per_block"]
    assert info["max_batch_size"] == 32
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_200_concurrent_requests_are_answered_correctly_in_batches(server, api_key, ref,
                                                                   digits_test_split):
    x = digits_test_split[0][:200]
    want = ref.full_probs(x).argmax(1)

    async def go():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": api_key},
                                     limits=limits, timeout=60) as c:
            async def one(i):
                r = await c.post("/predict", json={"instances": [x[i].tolist()], "early_exit": "off"})
                return r.status_code, r.json()
            return await asyncio.gather(*(one(i) for i in range(len(x))))

    results = asyncio.run(go())
    assert [s for s, _ in results] == [200] * len(x)
    assert [b["predictions"][0]["label"] for _, b in results] == want.tolist()
    text = httpx.get(server.url + "/metrics").text
    batches = metric(text, "hff_batch_size_count")
    single = metric(text, 'hff_batch_size_bucket{le="1.0"}')
    assert batches - single > 0, "no batch held more than one row"
    assert metric(text, "hff_instances_in_flight") == 0
    assert 'hff_requests_total{route="/predict",status="200"}' in text
    assert "hff_exits_total" in text and "hff_queue_wait_seconds_count" in text


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD = [[0.5] * 8] * 8
PNG = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8), "L").save(PNG, "PNG")
PNG_BYTES = PNG.getvalue()

# (case, method, path, request kwargs, status, words the error must contain)
MALFORMED = [
    ("bad json", "post", "/predict", {"content": b'{"instances": [', "headers":
                                      {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("not an object", "post", "/predict", {"json": [GOOD]}, 422, "JSON object"),
    ("no instances", "post", "/predict", {"json": {}}, 422, "body.instances"),
    ("unknown field", "post", "/predict", {"json": {"instances": [GOOD], "colour": 1}}, 422,
     "body.colour"),
    ("wrong shape", "post", "/predict", {"json": {"instances": [GOOD, [[0.5] * 7] * 8]}}, 422,
     "instances[1] has shape [8, 7], expected [1, 8, 8] or [8, 8]"),
    ("ragged", "post", "/predict", {"json": {"instances": [[[0.5] * 8] * 7 + [[0.5]]]}}, 422,
     "instances[0] is not a rectangular array"),
    ("NaN", "post", "/predict", {"content": b'{"instances": [[' + b",".join([b"[NaN" + b",0" * 7
                                 + b"]"] * 8) + b"]]}", "headers":
                                 {"content-type": "application/json"}}, 422, "NaN or infinity"),
    ("strings", "post", "/predict", {"json": {"instances": [[["x"] * 8] * 8]}}, 422, "strings"),
    ("out of range", "post", "/predict", {"json": {"instances": [[[255] * 8] * 8]}}, 422,
     "pixels in [0, 1]"),
    ("empty list", "post", "/predict", {"json": {"instances": []}}, 422, "instances is empty"),
    ("too many instances", "post", "/predict", {"json": {"instances": [GOOD] * 65}}, 413,
     "65 instances"),
    ("oversized body", "post", "/predict", {"json": {"instances": [GOOD] * 60, "pad": "x" * 300_000}},
     413, "larger than 262144 bytes"),
    ("oversized chunked body", "post", "/predict", {"content": [b'{"instances": [' + b" " * 200_000,
                                                           b" " * 200_000 + b"]}"],
                                                    "headers": {"content-type": "application/json"}},
     413, "larger than 262144 bytes"),
    ("wrong content type", "post", "/predict", {"content": b"1,2,3", "headers":
                                                {"content-type": "text/csv"}}, 415, "text/csv"),
    ("bad base64", "post", "/predict", {"json": {"instances": [{"b64": "%%%"}]}}, 400,
     "instances[0].b64 is not valid base64"),
    ("not an image", "post", "/predict", {"json": {"instances": [{"b64": b64(b"%PDF-1.4 hi")}]}},
     415, "not a PNG or JPEG"),
    ("truncated image", "post", "/predict", {"json": {"instances": [{"b64": b64(PNG_BYTES[:len(PNG_BYTES) // 2])}]}},
     400, "truncated or corrupt"),
    ("decompression bomb", "post", "/predict", {"json": {"instances": [{"b64": b64(bomb_png())}]}},
     413, "6000x6000"),
    ("multipart text file", "post", "/predict", {"files": [("file", ("a.txt", b"hello", "text/plain"))]},
     415, "not a PNG or JPEG"),
    ("multipart no file", "post", "/predict", {"files": [("top_k", (None, b"2"))]}, 422, "uploaded files is empty"),
    ("bad early exit", "post", "/predict", {"json": {"instances": [GOOD], "early_exit": "soon"}}, 422,
     "early_exit must be"),
    ("threshold above 1", "post", "/predict", {"json": {"instances": [GOOD],
                                                        "early_exit": {"threshold": 1.5}}}, 422,
     "early_exit must be"),
    ("top_k zero", "post", "/predict", {"json": {"instances": [GOOD], "top_k": 0}}, 422, "body.top_k"),
    ("unknown model", "post", "/v2/models/nope/infer", {"json": {"inputs": []}}, 404,
     "unknown model 'nope'"),
    ("v2 bad json", "post", "/v2/models/{name}/infer", {"content": b'{"inputs": [', "headers":
        {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("v2 not an object", "post", "/v2/models/{name}/infer", {"json": [1]}, 422, "JSON object"),
    ("v2 wrong datatype", "post", "/v2/models/{name}/infer", {"json": {"inputs": [
        {"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT8", "data": [0] * 64}]}}, 422,
     "expected 'FP32'"),
    ("v2 wrong shape", "post", "/v2/models/{name}/infer", {"json": {"inputs": [
        {"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0] * 192}]}}, 422,
     "expected [N, 1, 8, 8]"),
    ("unknown route", "get", "/nowhere", {}, 404, "/nowhere"),
    ("wrong method", "delete", "/predict", {}, 405, "DELETE"),
]


@pytest.mark.parametrize("case, method, path, kwargs, status, words", MALFORMED,
                         ids=[c[0] for c in MALFORMED])
def test_malformed_inputs_get_the_right_4xx(client, ref, case, method, path, kwargs, status, words):
    if isinstance(kwargs.get("content"), list):  # chunks: sent chunked, from a fresh iterator
        kwargs = {**kwargs, "content": iter(kwargs["content"])}
    r = getattr(client, method)(path.format(name=ref.manifest["name"]), **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and words in body["error"], body


def test_api_key_guards_predictions_and_models_but_not_health(server, api_key, digits_test_split):
    x = {"instances": [digits_test_split[0][0].tolist()]}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/predict",):
            r = c.post(path, json=x)
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/predict", json=x, headers={"X-API-Key": "wrong-key-000"}).status_code == 401
        assert c.post("/predict", json=x,
                      headers={"Authorization": f"Bearer {api_key}"}).status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v2/models/digits").status_code == 401
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
            assert c.get(path).status_code == 200, path


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("count", [65, 66, 1000])
def test_too_many_uploaded_files_is_413(client, count):
    """Issue 17 row 10: over the file limit is 413 as the README says, however far over."""
    files = [("file", (f"{i}.png", tiny_png(), "image/png")) for i in range(count)]
    r = client.post("/predict", files=files)
    assert r.status_code == 413 and "uploaded files" in r.json()["error"], r.text


def test_trailing_slash_never_redirects_to_the_clients_host(server):
    """Issue 17 row 12: no redirect built from the Host header."""
    r = httpx.get(server.url + "/static/app.js/", headers={"Host": "evil.example"})
    assert r.status_code == 404 and "evil.example" not in r.headers.get("location", "")


def test_duplicate_kserve_input_names_are_a_400(client, ref):
    """Issue 17 row 13: two tensors named 'input' are refused, not last-one-wins."""
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
    r = client.post(f"/v2/models/{ref.manifest['name']}/infer", json={"inputs": [tensor, tensor]})
    assert r.status_code == 400 and "unique" in r.json()["error"], r.text


def test_an_empty_api_key_header_beside_a_valid_bearer_is_accepted(server, api_key):
    """Issue 17 row 13: the Bearer key counts when X-API-Key is present but empty."""
    r = httpx.post(server.url + "/predict", json={"instances": [GOOD]},
                   headers={"X-API-Key": "", "Authorization": f"Bearer {api_key}"})
    assert r.status_code == 200, r.text
    wrong = httpx.post(server.url + "/predict", json={"instances": [GOOD]},
                       headers={"X-API-Key": "wrong-key-000", "Authorization": f"Bearer {api_key}"})
    assert wrong.status_code == 401
