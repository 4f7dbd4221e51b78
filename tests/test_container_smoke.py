"""Container smoke test: build both images, `compose up`, predict real digits, tear it all down.

Opt-in, because it builds images and trains a model (minutes on 2 cores): run it with
`make container-smoke` (or `HFF_CONTAINER_SMOKE=1 pytest -m container -s tests/test_container_smoke.py`).
It uses Docker + Docker Compose where a Docker daemon answers, else podman + podman-compose.
Sizes and timings go to stdout and test-artifacts/container-smoke.json. HFF_TRAIN_EPOCHS=5
shortens the training inside it (the default model trains for the trainer's default epochs).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import free_port

pytestmark = [pytest.mark.container, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "hff-smoke"  # compose project name: its containers and volumes never touch the user's
SERVE_IMAGE, TRAIN_IMAGE = "hff-serve:latest", "hff-train:latest"
SERVE_IMAGE_LIMIT = 450 * 10**6  # bytes (the "under 450 MB"), as the engine reports it
READY_TIMEOUT_S = 1800  # generous: training runs inside it on shared cores; only a hang hits it
OPT_IN = "HFF_CONTAINER_SMOKE"


@dataclass
class Engine:
    name: str  # docker or podman
    compose: list[str]  # the compose command line


def find_engine() -> Engine | str:
    """The engine to use, or why there is none."""
    if shutil.which("docker"):
        daemon = subprocess.run(["docker", "info"], capture_output=True)
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if daemon.returncode == 0 and plugin.returncode == 0:
            return Engine("docker", ["docker", "compose"])
    # podman-compose may live in this venv without the venv being on PATH.
    podman_compose = shutil.which("podman-compose") or shutil.which(
        "podman-compose", path=str(Path(sys.executable).parent))
    if shutil.which("podman") and podman_compose:
        return Engine("podman", [podman_compose])
    return ("needs a container engine: Docker with a running daemon and the compose plugin, or "
            "podman and podman-compose (README: Containers)")


@pytest.fixture(scope="module")
def engine() -> Engine:
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"opt-in (builds images, minutes): run `make container-smoke` or set {OPT_IN}=1")
    found = find_engine()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return proc


def image_size(engine: Engine, image: str) -> int:
    out = run([engine.name, "image", "inspect", "--format", "{{.Size}}", image], 60).stdout
    return int(out.strip())


def digit_pngs(per_class: int) -> tuple[list[bytes], list[int]]:
    """Real 8x8 digits from scikit-learn (pixel values 0-16) as 8-bit grayscale PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pngs, labels = [], []
    for label in range(10):
        for index in np.flatnonzero(digits.target == label)[-per_class:]:
            pixels = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)  # (8, 8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            pngs.append(buf.getvalue())
            labels.append(label)
    return pngs, labels


def container_status(engine: Engine, service: str) -> str:
    """The engine's status line of this project's container for `service` ('' when none)."""
    proc = run([engine.name, "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                "--filter", f"label=com.docker.compose.service={service}",
                "--format", "{{.Status}}"], 60, check=False)
    return proc.stdout.strip()


def up_until_ready(engine: Engine, compose: list[str], env: dict[str, str], base_url: str,
                   logs, load_at_up: list[float]) -> float:
    """`compose up -d`, then seconds until /readyz answers 200; fails early when `train` fails."""
    start = time.monotonic()
    load_at_up.append(round(os.getloadavg()[0], 1))  # timings on shared cores need their context
    # `up -d` itself waits for the train job to finish before it starts the API.
    proc = run([*compose, "up", "-d", "--no-build"], READY_TIMEOUT_S, env=env, check=False)
    if proc.returncode != 0:
        pytest.fail(f"compose up exited {proc.returncode}:\n{proc.stderr[-3000:]}\n{logs()}")
    while time.monotonic() - start < READY_TIMEOUT_S:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass  # not listening yet
        # podman-compose starts the API even when the job failed: look at the job's exit code.
        status = container_status(engine, "train")
        if status.startswith("Exited") and not status.startswith("Exited (0)"):
            pytest.fail(f"the train job failed ({status}):\n{logs()}")
        time.sleep(1)
    pytest.fail(f"the API was not ready {READY_TIMEOUT_S} s after compose up:\n{logs()}")


def check_predictions(base_url: str, per_class: int) -> float:
    pngs, labels = digit_pngs(per_class)
    body = {"instances": [{"b64": base64.b64encode(p).decode()} for p in pngs], "top_k": 3}
    response = httpx.post(f"{base_url}/predict", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"]["name"] == "digits"
    predictions = answer["predictions"]
    assert len(predictions) == len(labels)
    for p in predictions:
        assert p["class_name"] == str(p["label"])
        assert 0.0 <= p["confidence"] <= 1.0
        assert p["exit_block"] >= 1
        assert [t["label"] for t in p["top_k"]][0] == p["label"]
    accuracy = float(np.mean([p["label"] == y for p, y in zip(predictions, labels, strict=True)]))
    # A model that reaches ~99% on held-out digits; a decoding or scaling slip drops far below.
    assert accuracy >= 0.9, f"only {accuracy:.0%} of {len(labels)} real digits right: {predictions}"
    return accuracy


def test_compose_up_serves_real_digits(engine: Engine):
    report: dict[str, object] = {"engine": engine.name}
    build_env = {**os.environ, "CONTAINER_ENGINE": engine.name}
    start = time.monotonic()
    run([str(ROOT / "scripts" / "container-build.sh")], 3600, env=build_env)
    report["build_s"] = round(time.monotonic() - start, 1)

    sizes = {image: image_size(engine, image) for image in (SERVE_IMAGE, TRAIN_IMAGE)}
    report["image_bytes"] = sizes
    assert sizes[SERVE_IMAGE] < SERVE_IMAGE_LIMIT, f"serve image is {sizes[SERVE_IMAGE]/1e6:.0f} MB"
    # The serving image carries no torch and no pip, and does not run as root.
    probe = run([engine.name, "run", "--rm", "--entrypoint", "python3", SERVE_IMAGE, "-c",
                 "import importlib.util as u, os; "
                 "print(u.find_spec('torch') is None, u.find_spec('pip') is None, os.getuid())"],
                120).stdout.split()
    assert probe[:2] == ["True", "True"] and probe[2] != "0", probe

    port = free_port()
    env = {**os.environ, "HFF_API_PORT": str(port)}
    for name in list(env):  # the user's own service settings must not leak into the project
        if name.startswith("HFF_") and name not in ("HFF_API_PORT", "HFF_TRAIN_EPOCHS"):
            del env[name]
    compose = [*engine.compose, "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml")]
    base_url = f"http://127.0.0.1:{port}"
    load: list[float] = []
    report["load_avg_1m_at_up"] = load

    def logs(tail: int = 6000) -> str:
        proc = run([*compose, "logs"], 120, env=env, check=False)
        return (proc.stdout + proc.stderr)[-tail:]

    run([*compose, "down", "--volumes"], 300, env=env, check=False)  # leftovers of a killed run
    first_logs = ""
    try:
        # First start: the train job trains and exports into the fresh volume, then the API starts.
        report["up_to_ready_first_s"] = round(up_until_ready(engine, compose, env, base_url, logs, load), 1)
        report["accuracy_first"] = check_predictions(base_url, per_class=3)
        first_logs = logs(tail=200_000)
        assert "exported" in first_logs, first_logs[-6000:]

        # Second start on the same volume: the job finds the model and skips the work.
        run([*compose, "down"], 300, env=env)
        report["up_to_ready_second_s"] = round(up_until_ready(engine, compose, env, base_url, logs, load), 1)
        assert "skipping training and export" in logs()
        report["accuracy_second"] = check_predictions(base_url, per_class=1)
    finally:
        out = ROOT / "test-artifacts"
        out.mkdir(exist_ok=True)
        # The job's own train and export timings are in these.
        (out / "container-smoke-logs.txt").write_text(
            f"== first up\n{first_logs}\n== last up\n{logs(tail=200_000)}")
        run([*compose, "down", "--volumes"], 300, env=env, check=False)
        left = run([engine.name, "volume", "ls", "--format", "{{.Name}}"], 60, check=False).stdout
        report["volumes_left"] = [v for v in left.split() if v.startswith(PROJECT)]
        (out / "container-smoke.json").write_text(json.dumps(report, indent=2) + "\n")
        print("\ncontainer smoke:", json.dumps(report, indent=2))
    assert report["volumes_left"] == [], report["volumes_left"]
