"""A model repository (<model>/<version>/ model dirs): several models at once, model control,
and hot reload of a new version under load without a failed request. Real server processes,
real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.main import main
from tests.app.conftest import API_KEY, SERVERS, ServerProcess, metric

pytestmark = pytest.mark.slow

KEY = {"X-API-Key": API_KEY}


def add_version(model_dir: Path, repo: Path, name: str, version: int,
                class_names: list[str] | None = None) -> Path:
    """Copy a model dir into repo/name/version the way hff-export writes one: into a hidden
    temp dir first, then one rename into place. `class_names` relabels it (the graphs, and so
    the manifest's version hash, stay the same), so answers show which model gave them."""
    temp = repo / name / f".incoming-{version}"
    shutil.copytree(model_dir, temp)
    if class_names is not None:
        manifest = json.loads((temp / "manifest.json").read_text())
        manifest["class_names"] = class_names
        (temp / "manifest.json").write_text(json.dumps(manifest))
    final = repo / name / str(version)
    os.rename(temp, final)
    return final


def half_written(model_dir: Path, repo: Path, name: str, version: int) -> Path:
    """An export caught mid-copy: every graph there, manifest.json not yet."""
    target = repo / name / str(version)
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("manifest.json"))
    return target


def broken(model_dir: Path, repo: Path, name: str, version: int) -> Path:
    """A complete-looking version whose stage graph is not the one its manifest hashed."""
    target = half_written(model_dir, repo, name, version)
    (target / "stage_2.onnx").write_bytes(b"not an onnx graph")
    shutil.copy(model_dir / "manifest.json", target / "manifest.json")
    return target


def one_row(x: np.ndarray) -> dict:
    return {"instances": [x.tolist()], "early_exit": "off"}


def v2_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": [1, *x.shape], "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}


def wait_for(predicate, timeout: float = 60.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen within {timeout}s")


LETTERS = [chr(ord("a") + i) for i in range(10)]


@pytest.fixture
def two_models(digits_model_dir, tmp_path):
    """digits (versions 1 and 2) and letters (version 1) behind the API key."""
    repo = tmp_path / "repo"
    for name, version, names in (("digits", 1, None), ("digits", 2, None),
                                 ("letters", 1, LETTERS)):
        (repo / name).mkdir(parents=True, exist_ok=True)
        add_version(digits_model_dir, repo, name, version, names)
    srv = ServerProcess(None, tmp_path / "server.log", model_repository=repo, api_key=API_KEY,
                        threads=1)
    yield srv, repo
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def test_two_models_at_once_by_name_and_version(two_models, digits_test_split):
    srv, _ = two_models
    x = digits_test_split[0][0]
    with httpx.Client(base_url=srv.url, headers=KEY, timeout=60) as c:
        listed = c.get("/v1/models").json()["models"]
        assert [(m["name"], m["version"]) for m in listed] == [("digits", "2"), ("letters", "1")]
        digits = c.post("/v1/models/digits:predict", json=one_row(x)).json()
        letters = c.post("/v1/models/letters:predict", json=one_row(x)).json()
        assert digits["model"] == {"name": "digits", "version": "2"}  # the newest answers
        assert letters["model"] == {"name": "letters", "version": "1"}
        label = digits["predictions"][0]["label"]
        assert letters["predictions"][0]["label"] == label  # same graphs, other class names
        assert digits["predictions"][0]["class_name"] == str(label)
        assert letters["predictions"][0]["class_name"] == LETTERS[label]
        # plain /predict answers from the default model: the first by name
        assert c.post("/predict", json=one_row(x)).json()["model"]["name"] == "digits"
        pinned = c.post("/v1/models/letters/versions/1:predict", json=one_row(x))
        assert pinned.status_code == 200 and pinned.json()["model"]["version"] == "1"
        # an image upload takes the model from the path too
        png = io.BytesIO()
        Image.fromarray((x[0] * 255).round().astype(np.uint8), "L").save(png, format="PNG")
        upload = c.post("/v1/models/letters:predict", data={"early_exit": "off"},
                        files=[("file", ("x.png", png.getvalue(), "image/png"))])
        assert upload.status_code == 200, upload.text
        assert upload.json()["model"] == {"name": "letters", "version": "1"}
        assert upload.json()["predictions"][0]["class_name"] in LETTERS
        # KServe v2, with and without the version
        for path in ("/v2/models/letters/infer", "/v2/models/letters/versions/1/infer"):
            r = c.post(path, json=v2_body(x))
            assert r.status_code == 200, r.text
            assert (r.json()["model_name"], r.json()["model_version"]) == ("letters", "1")
        assert c.get("/v2/models/digits/versions/2").json()["versions"] == ["2"]
        assert c.get("/v2/models/letters/versions/1/ready").json()["ready"] is True
        # a version that does not serve, an unknown model: 404 with words
        old = c.post("/v2/models/digits/versions/1/infer", json=v2_body(x))
        assert old.status_code == 404
        assert old.json()["error"] == "version '1' of model 'digits' is not loaded (version 2 is)"
        unknown = c.post("/v1/models/nope:predict", json=one_row(x))
        assert unknown.status_code == 404
        assert unknown.json()["error"] == ("unknown model 'nope' (this server serves 'digits', "
                                           "'letters')")
        text = c.get("/metrics").text
    # the batcher's metrics are per model and version
    assert metric(text, 'hff_batch_size_count{model="letters",version="1"}') >= 3
    assert metric(text, 'hff_batch_size_count{model="digits",version="2"}') >= 2
    assert metric(text, 'hff_instances_in_flight{model="digits",version="2"}') == 0


def test_model_control_needs_the_key_and_unload_means_404_with_words(two_models,
                                                                     digits_test_split):
    srv, _ = two_models
    x = digits_test_split[0][0]
    for path in ("/v2/repository/index", "/v2/repository/models/letters/load",
                 "/v2/repository/models/letters/unload"):
        assert httpx.post(srv.url + path).status_code == 401
        wrong = httpx.post(srv.url + path, headers={"X-API-Key": "not-the-key-at-all"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "the API key is not valid"
    with httpx.Client(base_url=srv.url, headers=KEY, timeout=60) as c:
        index = c.post("/v2/repository/index").json()
        assert {(r["name"], r["version"], r["state"]) for r in index} == {
            ("digits", "1", "UNAVAILABLE"), ("digits", "2", "READY"), ("letters", "1", "READY")}
        ready = c.post("/v2/repository/index", json={"ready": True}).json()  # Triton's filter
        assert {(r["name"], r["version"]) for r in ready} == {("digits", "2"), ("letters", "1")}
        r = c.post("/v2/repository/models/letters/unload")
        assert r.status_code == 200, r.text
        for path, body in (("/v1/models/letters:predict", one_row(x)),
                           ("/v2/models/letters/infer", v2_body(x))):
            gone = c.post(path, json=body)
            assert gone.status_code == 404
            assert gone.json()["error"] == "unknown model 'letters' (this server serves 'digits')"
        assert c.get("/v2/models/letters/ready").status_code == 404
        assert c.post("/v1/models/digits:predict", json=one_row(x)).status_code == 200
        assert {"name": "letters", "version": "1", "state": "UNAVAILABLE",
                "reason": "unloaded"} in c.post("/v2/repository/index").json()
        assert 'model="letters"' not in c.get("/metrics").text  # its series went with it
        missing = c.post("/v2/repository/models/nope/load")
        assert missing.status_code == 404 and "no model named 'nope'" in missing.json()["error"]
        loaded = c.post("/v2/repository/models/letters/load")
        assert loaded.json() == {"name": "letters", "version": "1"}
        back = c.post("/v1/models/letters:predict", json=one_row(x))
        assert back.status_code == 200 and back.json()["model"]["name"] == "letters"
        assert c.get("/readyz").status_code == 200


async def _client_loop(url: str, bodies: list[tuple[str, dict]], stop: asyncio.Event,
                       results: list) -> None:
    """Requests one after another until `stop`: (status, version, monotonic time) each, in
    `results` (one list per client)."""
    async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=60) as c:
        i = 0
        while not stop.is_set():
            path, body = bodies[i % len(bodies)]
            i += 1
            try:
                r = await c.post(path, json=body)
                answer = r.json()
                version = (answer.get("model", {}).get("version") or answer.get("model_version")
                           if r.status_code == 200 else answer)
                results.append((r.status_code, version, time.monotonic()))
            except (httpx.TransportError, ValueError) as e:
                results.append((type(e).__name__, None, time.monotonic()))


@pytest.mark.parametrize("server", SERVERS)
def test_a_new_version_takes_over_under_load_without_a_failed_request(digits_model_dir,
                                                                      digits_test_split,
                                                                      tmp_path, server):
    """Clients keep sending while version 2 is renamed into place: every request is answered
    200, by version 1 until the switch and by version 2 after it, and version 1 answers all it
    accepted before it stops. A half-written version 3 is never loaded."""
    repo = tmp_path / "repo"
    (repo / "digits").mkdir(parents=True)
    add_version(digits_model_dir, repo, "digits", 1)
    poll_s = 0.2
    srv = ServerProcess(None, tmp_path / "server.log", model_repository=repo, api_key=API_KEY,
                        poll_s=poll_s, threads=1, max_batch_size=8, server=server)
    x = digits_test_split[0][:4]
    bodies = [("/v1/models/digits:predict", {"instances": x.tolist(), "early_exit": "off"}),
              ("/v2/models/digits/infer", {"inputs": [{"name": "input", "shape": [4, 1, 8, 8],
                                                       "datatype": "FP32",
                                                       "data": x.reshape(-1).tolist()}]}),
              ("/predict", one_row(x[0]))]

    async def go():
        stop, results = asyncio.Event(), []
        per_client = [[] for _ in range(6)]
        clients = [asyncio.create_task(_client_loop(srv.url, bodies[i % 3:] + bodies[:i % 3],
                                                    stop, mine))
                   for i, mine in enumerate(per_client)]
        results = per_client[0]  # watched for the switch
        await asyncio.sleep(1.0)  # load on version 1
        half_written(digits_model_dir, repo, "digits", 3)  # never loaded: no manifest.json
        await asyncio.to_thread(add_version, digits_model_dir, repo, "digits", 2)
        appeared = time.monotonic()
        deadline = appeared + 60
        while time.monotonic() < deadline and not any(v == "2" for _, v, _ in results):
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.5)  # load on version 2, and version 1 drained by now
        stop.set()
        await asyncio.gather(*clients)
        return appeared, per_client

    try:
        appeared, per_client = asyncio.run(go())
        text = httpx.get(srv.url + "/metrics").text
        index = httpx.post(srv.url + "/v2/repository/index", headers=KEY).json()
    finally:
        srv.stop()
    log = srv.log()
    results = [r for mine in per_client for r in mine]
    failed = [r for r in results if r[0] != 200]
    assert not failed, (failed[:5], log)
    assert {v for _, v, _ in results} == {"1", "2"}
    for mine in per_client:  # each client sends after its last answer: after a 2, never a 1
        versions = "".join(v for _, v, _ in mine)
        assert re.fullmatch("1*2+", versions), versions
    first_new = min(t for _, v, t in results if v == "2")
    print(f"\n{server}: {len(results)} requests, {len(failed)} failed; version 2 answered "
          f"{first_new - appeared:.3f}s after its directory appeared (HFF_POLL_S={poll_s})")
    assert first_new - appeared < 60
    assert "version 1 drains" in log
    stopped = re.findall(r"batcher stopped: (\d+) requests accepted, (\d+) answered", log)
    assert stopped and all(a == b for a, b in stopped), stopped  # version 1 answered all it took
    assert 'model="digits",version="1"' not in text  # its series went with it
    assert metric(text, 'hff_batch_size_count{model="digits",version="2"}') > 0
    assert {"name": "digits", "version": "3", "state": "UNAVAILABLE",
            "reason": "incomplete: no manifest.json yet"} in index
    assert "version 3 serving" not in log and "refused" not in log
    assert "Traceback" not in log, log


def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(digits_model_dir,
                                                                   digits_test_split, tmp_path):
    """The poller refuses a broken version once (not once per poll), says why, and the old
    version keeps serving; an explicit load says why it did not switch; once the version's files
    change, it is tried again."""
    repo = tmp_path / "repo"
    (repo / "digits").mkdir(parents=True)
    add_version(digits_model_dir, repo, "digits", 1)
    srv = ServerProcess(None, tmp_path / "server.log", model_repository=repo, api_key=API_KEY,
                        poll_s=0.2, threads=1)
    try:
        half_written(digits_model_dir, repo, "digits", 3)
        broken(digits_model_dir, repo, "digits", 2)
        wait_for(lambda: "refused model digits version 2" in srv.log(), what="the refusal")
        time.sleep(1.0)  # a few more polls: refused once, not once per poll
        with httpx.Client(base_url=srv.url, headers=KEY, timeout=60) as c:
            r = c.post("/v1/models/digits:predict", json=one_row(digits_test_split[0][0]))
            assert r.status_code == 200 and r.json()["model"]["version"] == "1"
            assert c.get("/readyz").status_code == 200
            index = {r["version"]: r for r in c.post("/v2/repository/index").json()}
            retried = c.post("/v2/repository/models/digits/load")
            text = c.get("/metrics").text
            # the broken graph is replaced in place (a copy that wrote manifest.json first,
            # then finished): its files changed, so the poller tries it again, and it serves
            shutil.copy(digits_model_dir / "stage_2.onnx", repo / "digits" / "2" / "stage_2.onnx")
            wait_for(lambda: c.post("/v1/models/digits:predict", json=one_row(
                digits_test_split[0][0])).json()["model"]["version"] == "2",
                what="version 2 serving once fixed")
    finally:
        srv.stop()
    log = srv.log()
    refusals = [line for line in log.splitlines() if "refused model digits version 2" in line]
    assert len(refusals) == 2, refusals  # once by the poller, once for the explicit load
    assert "stage_2.onnx" in refusals[0] or "hash to version" in refusals[0], refusals[0]
    assert refusals[0].endswith("version 1 keeps serving"), refusals[0]
    assert 'version="2"' not in text  # a refused version leaves no metric series
    assert index["1"]["state"] == "READY"
    assert index["2"]["state"] == "UNAVAILABLE" and index["2"]["reason"].startswith("refused: ")
    assert index["3"]["reason"] == "incomplete: no manifest.json yet"
    # an explicit load says why it did not switch, and version 1 still serves
    assert retried.status_code == 200 and retried.json()["version"] == "1"
    assert retried.json()["refused"][0].startswith("version 2: "), retried.json()
    assert "model digits version 2 serving" in log and "version 1 drains" in log
    assert "Traceback" not in log, log


def test_the_command_line_takes_one_model_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--model-dir", str(tmp_path), "--model-repository", str(tmp_path)])
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["--model-repository", str(tmp_path / "nope")]) == 2
    assert "HFF_MODEL_REPOSITORY" in capsys.readouterr().err
    assert main(["--model-repository", str(tmp_path)]) == 2  # empty, nothing to wait for
    err = capsys.readouterr().err
    assert "holds no model" in err and "HFF_POLL_S" in err


def test_the_repository_wins_over_an_images_default_model_dir(digits_model_dir, tmp_path,
                                                              monkeypatch):
    """The serving image sets HFF_MODEL_DIR=/models/default; HFF_MODEL_REPOSITORY beside it is
    what is served. --model-dir on the command line wins over HFF_MODEL_REPOSITORY."""
    from app.main import build_parser, load_settings

    monkeypatch.setenv("HFF_MODEL_DIR", str(tmp_path / "not-there"))
    monkeypatch.setenv("HFF_MODEL_REPOSITORY", str(tmp_path))
    assert tmp_path == load_settings(build_parser().parse_args([])).MODEL_REPOSITORY
    settings = load_settings(build_parser().parse_args(["--model-dir", str(digits_model_dir)]))
    assert settings.MODEL_REPOSITORY is None and digits_model_dir == settings.MODEL_DIR
