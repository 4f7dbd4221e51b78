"""Requests/s through HAProxy (docker/haproxy.cfg) at 1 and at N hff-serve replicas, side by side.

Usage (make export prepares models/digits; haproxy and wrk from Debian's packages):
    python bench/proxy_replicas.py --digits models/digits [--replicas 3] [--connections 64] \
        [--seconds 5] [--repeats 3]

What `docker compose up --scale api=N` runs, without the containers: N `hff-serve` processes on
the same model dir and HAProxy with the compose file's own config, its `server-template` (DNS
names of the compose network) replaced by the local ports. Two proxies run at once, one with
replica 1 only and one with all N, plus replica 1 directly (what the proxy costs), and the three
are loaded in turn in each repeat, so the machine's drift lands on all of them alike. Each
replica has the service's defaults (HFF_THREADS=0: as many onnxruntime threads as usable cores),
its best setting alone; `--threads` sets HFF_THREADS for every replica. One instance per request
(JSON /predict), loaded by wrk as in bench/peers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from peers import emit, fallback_load, json_payload, versions, wrk_load  # noqa: E402
from serve_load import REPO, Server, free_port  # noqa: E402

HAPROXY_CFG = REPO / "docker" / "haproxy.cfg"


class Proxy:
    """HAProxy with docker/haproxy.cfg on free local ports, its backend the given servers."""

    def __init__(self, servers: list[Server], work: Path):
        self.port, stats = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = HAPROXY_CFG.read_text()
        cfg = cfg.replace("bind :8080", f"bind 127.0.0.1:{self.port}")
        cfg = cfg.replace("bind :8404", f"bind 127.0.0.1:{stats}")
        local = "\n".join(f"    server api-{i} 127.0.0.1:{s.port}" for i, s in enumerate(servers, 1))
        cfg, n = re.subn(r"^    server-template .*$", local, cfg, flags=re.M)
        assert n == 1, "docker/haproxy.cfg has no server-template line to replace"
        cfg = cfg.replace(" init-addr none resolvers compose resolve-prefer ipv4", "")
        path = work / f"haproxy-{self.port}.cfg"
        path.write_text(cfg)
        subprocess.run(["haproxy", "-c", "-q", "-f", str(path)], check=True)
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.stats_url = f"http://127.0.0.1:{stats}/stats;csv"
        deadline = time.monotonic() + 30
        while self.servers_up() < len(servers):  # the /readyz checks have passed
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"haproxy does not see {len(servers)} ready servers")
            time.sleep(0.2)

    def servers_up(self) -> int:
        try:
            rows = httpx.get(self.stats_url, timeout=2).text.splitlines()
        except httpx.TransportError:
            return 0
        return sum(1 for r in rows if r.startswith("api,api-") and r.split(",")[17] == "UP")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits", type=Path, default=REPO / "models/digits")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--connections", type=int, nargs="+", default=[64])
    p.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="HFF_THREADS for every replica")
    p.add_argument("--load", choices=["wrk", "uvloop"], default="wrk" if shutil.which("wrk") else "uvloop")
    args = p.parse_args()
    if shutil.which("haproxy") is None:
        raise SystemExit("needs haproxy (apt-get install haproxy)")
    if not (args.digits / "manifest.json").is_file():
        raise SystemExit(f"{args.digits} is not a model dir (make export writes models/digits)")
    run_one = wrk_load if args.load == "wrk" else fallback_load
    haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split()[2]
    print(f"# machine: {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} usable cores, load average {os.getloadavg()[0]:.1f}; "
          f"python {platform.python_version()}, {versions()}, haproxy {haproxy}; load: {args.load}")
    print(f"# {' '.join(sys.argv)}")
    print(f"# medians of {args.repeats} interleaved runs of {args.seconds:g} s "
          "(min-max requests/s in brackets); one instance per request, JSON /predict")

    from training.data import load_dataset

    image = load_dataset("digits").test.tensors[0][0].numpy()  # (1, 8, 8)
    payload = json_payload("/predict", image)
    settings = {} if args.threads is None else {"threads": args.threads}
    servers: list[Server] = []
    proxies: list[Proxy] = []
    try:
        servers = [Server(args.digits.resolve(), **settings) for _ in range(args.replicas)]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            proxies = [Proxy(servers[:1], work), Proxy(servers, work)]
            targets = {"1 replica, direct": servers[0].url,
                       "1 replica, through HAProxy": proxies[0].url,
                       f"{args.replicas} replicas, through HAProxy": proxies[1].url}
            print("\n| model | setup | connections | requests/s | p50 ms | p99 ms | non-2xx |")
            print("|---|---|---|---|---|---|---|")
            for conns in args.connections:
                for url in targets.values():  # warm-up
                    run_one(url, payload, conns, 1, work)
                runs: dict[str, list[dict]] = {name: [] for name in targets}
                for _ in range(args.repeats):
                    for name, url in targets.items():
                        runs[name].append(run_one(url, payload, conns, args.seconds, work))
                for name in targets:
                    emit("digits", name, conns, runs[name])
            print(f"\n# per-replica requests, all runs: "
                  f"{json.dumps([replica_requests(s) for s in servers])}")
    finally:
        for proxy in proxies:
            proxy.close()
        for server in servers:
            server.close()
    return 0


def replica_requests(server: Server) -> int:
    """The replica's answered /predict requests (its Prometheus counter): the proxy spread them."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("hff_requests_total{") and 'route="/predict"' in line))


if __name__ == "__main__":
    sys.exit(main())
