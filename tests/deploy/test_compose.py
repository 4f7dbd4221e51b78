"""docker-compose.yml and the proxy: the file validates against the Compose Specification's schema
(what Docker Compose v2 checks), HAProxy accepts docker/haproxy.cfg (`haproxy -c`, where HAProxy
is installed), and the pieces fit: `api` can be scaled (no host port), the proxy checks its
/readyz on its port, replicas poll the shared repository that the train job publishes into.

The container smoke test (tests/test_container_smoke.py, opt-in) runs all of it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
HAPROXY_CFG = REPO / "docker" / "haproxy.cfg"
SCHEMA = Path(__file__).parent / "crd-schemas" / "compose-spec.json"


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def seconds(duration: str) -> float:
    return float(re.fullmatch(r"(\d+)s", duration)[1])


def spec_errors(document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification():
    assert spec_errors(compose()) == []
    misspelt = compose()
    misspelt["services"]["api"]["stop_grace"] = "40s"
    assert spec_errors(misspelt) == ["services.api: 'stop_grace' does not match any of the "
                                     "regexes: '^x-'"]


def test_the_api_scales_behind_the_proxy():
    services = compose()["services"]
    api, proxy = services["api"], services["proxy"]
    assert "ports" not in api and "container_name" not in api  # --scale api=3 needs both absent
    assert proxy["ports"][0].endswith(":8080")
    env = api["environment"]
    assert env["HFF_MODEL_REPOSITORY"] == "/models/repository"
    assert env["HFF_POLL_S"]  # hot reload is on
    assert services["train"]["environment"]["HFF_MODEL_REPOSITORY"] == env["HFF_MODEL_REPOSITORY"]
    # the replicas and the job share one volume; the replicas only read it
    assert "models:/models:ro" in api["volumes"] and "models:/models" in services["train"]["volumes"]
    # compose's SIGKILL comes after the server's drain (HFF_SHUTDOWN_TIMEOUT_S, 30 s by default)
    assert seconds(api["stop_grace_period"]) > 30


def test_haproxy_checks_readyz_on_the_api_port():
    cfg = HAPROXY_CFG.read_text()
    port = compose()["services"]["api"]["environment"]["HFF_PORT"]
    assert "option httpchk GET /readyz" in cfg
    assert re.search(rf"server-template api- \d+ api:{port}\b", cfg)
    assert "bind :8080" in cfg


def test_haproxy_accepts_the_config():
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    proc = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
