"""Hot reload under load: how long a new version takes to serve, and how many requests fail.

Usage (any exported model dir, e.g. `make export`):
    python bench/hot_reload.py --model models/digits --switches 5 --poll-s 0.5 2

For each HFF_POLL_S value, one server serves a fresh repository (`<tmp>/m/1` = the model dir)
while closed-loop clients keep sending one-image requests to `/v1/models/m:predict`; every few
seconds the next version is copied into a hidden temp dir and renamed into place (as hff-export
does). Per switch the table gives the time from the rename to the first answer by the new
version, the server's own load + warm-up time for it (from its log), and the requests sent and
failed (any status but 200, or a transport error) over the whole run. The expected time to serve
is at most HFF_POLL_S + load and warm-up (about HFF_POLL_S / 2 + load on average).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_load import Server  # noqa: E402 - after the path set-up, as serve_load does


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}")


def put_version(model: Path, repo: Path, version: int) -> float:
    """Copy `model` to repo/m/<version> through a hidden temp dir; the rename's monotonic time."""
    temp = repo / "m" / f".incoming-{version}"
    shutil.copytree(model, temp)
    os.rename(temp, repo / "m" / str(version))
    return time.monotonic()


async def client(url: str, body: dict, stop: asyncio.Event, answers: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while not stop.is_set():
            try:
                r = await c.post("/v1/models/m:predict", json=body)
                version = r.json()["model"]["version"] if r.status_code == 200 else None
                answers.append((r.status_code, version, time.monotonic()))
            except httpx.TransportError as e:
                answers.append((type(e).__name__, None, time.monotonic()))


async def run(model: Path, poll_s: float, switches: int, clients: int, gap_s: float,
              body: dict) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="hff-hot-reload-") as tmp:
        repo, log_path = Path(tmp) / "repo", Path(tmp) / "server.log"
        (repo / "m").mkdir(parents=True)
        put_version(model, repo, 1)
        server = Server(args=["--model-repository", str(repo)], log_path=log_path,
                        poll_s=poll_s, threads=1, log_level="info")
        url = server.url
        try:
            stop, answers = asyncio.Event(), []
            tasks = [asyncio.create_task(client(url, body, stop, answers)) for _ in range(clients)]
            rows = []
            for version in range(2, switches + 2):
                await asyncio.sleep(gap_s)
                appeared = await asyncio.to_thread(put_version, model, repo, version)
                while not any(v == str(version) for _, v, _ in answers[-clients * 4:]):
                    if time.monotonic() - appeared > 120:
                        raise SystemExit(f"version {version} did not serve within 120 s")
                    await asyncio.sleep(0.002)
                first = min(t for _, v, t in answers if v == str(version))
                rows.append({"version": version, "serving_s": first - appeared})
            await asyncio.sleep(gap_s)
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            server.close()
        log = log_path.read_text()
    warm = {int(v): float(s) for v, s in re.findall(
        r"model m version (\d+) serving \(loaded and warmed up in ([\d.]+)s\)", log)}
    failed = sum(1 for status, _, _ in answers if status != 200)
    for row in rows:
        row.update(poll_s=poll_s, load_s=warm.get(row["version"], float("nan")),
                   requests=len(answers), failed=failed)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="an exported model dir")
    p.add_argument("--switches", type=int, default=5, help="new versions per poll interval")
    p.add_argument("--poll-s", type=float, nargs="+", default=[0.5, 2.0], help="HFF_POLL_S values")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients")
    p.add_argument("--gap-s", type=float, default=2.0, help="seconds of load between switches")
    args = p.parse_args()
    shape = json.loads((args.model / "manifest.json").read_text())["input"]["shape"]
    body = {"instances": [np.full(shape, 0.5).tolist()]}
    print(f"# hot reload under load: {machine()}; {args.clients} clients, model {args.model}")
    print("| HFF_POLL_S | version | rename -> first answer (s) | load + warm-up (s) | "
          "requests (run) | failed (run) |")
    print("|---|---|---|---|---|---|")
    for poll_s in args.poll_s:
        for r in asyncio.run(run(args.model, poll_s, args.switches, args.clients, args.gap_s,
                                 body)):
            print(f"| {r['poll_s']:g} | {r['version']} | {r['serving_s']:.3f} | "
                  f"{r['load_s']:.2f} | {r['requests']} | {r['failed']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
