"""The demo page's router on the real server (uvicorn and granian): what it serves, what it
refuses, and that it stays out of the schema."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi import FastAPI

from app.demo import STATIC_DIR, router


@pytest.fixture
def client(server):
    """The shared digits server (tests/app/conftest.py), without its API key: the page needs none."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.mark.slow
def test_index_is_html_with_a_same_origin_policy(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<canvas" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.slow
def test_every_asset_the_page_references_is_served(client):
    html = client.get("/").text
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    local = [u for u in refs if not u.startswith(("data:", "#", "docs"))]
    assert {"static/app.js", "static/style.css"} <= set(local)
    for ref in local:
        r = client.get("/" + ref)
        assert r.status_code == 200, ref
        assert r.content == (STATIC_DIR / ref.removeprefix("static/")).read_bytes()
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/static/demo.py", "/static/index.html", "/static/..%2fdemo.py",
                                  "/static/nothing.js"])
def test_anything_else_under_static_is_404(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert "APIRouter" not in r.text  # the module itself never leaks


def test_demo_routes_are_not_in_the_openapi_schema():
    app = FastAPI()
    app.include_router(router)
    paths = app.openapi()["paths"]
    assert "/" not in paths and "/static/{name}" not in paths


def test_the_page_fetches_nothing_from_other_origins():
    for f in STATIC_DIR.iterdir():
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f.name
