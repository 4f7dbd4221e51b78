"""hff-serve against mosec and LitServe serving the same model.onnx, loaded by wrk side by side.

Usage (make export prepares models/digits; the cifar-cnn model with random weights is made here):
    python bench/peers.py --digits models/digits [--cifar models/cifar-random] \
        [--servers hff mosec litserve] [--connections 1 64 256] [--seconds 5] [--repeats 3]

Each request carries one instance. The digits model gets JSON on every server ({"instances":
[8x8 array]} to /predict, to mosec's /inference and to LitServe's /predict); hff-serve also gets
the same instance as a KServe v2 binary tensor. Every server is up at once and idle when not
loaded, and the servers are interleaved within each repeat, so the machine's drift lands on all of
them alike. The load is wrk (`-t2`, or `-t1` for one connection; a Lua script posts the body) or,
without wrk, bench/serve_load.py's closed-loop uvloop generator. --cifar adds cifar-cnn over
KServe binary at 64 connections (the defaults, max batch 32 and one model call at a time;
--cifar-configs picks among them, and the --designs trees run there too) against the in-process
onnxruntime ceilings (batch 64 and 32 one call at a time, batch 32 with onnxruntime's idle threads
spinning, two one-thread calls of 32 at once, and the issue's own measure: the server's batch
size, its mean batch over the warm-up, in two one-thread calls at once as the server runs them).
Peers: bench/peer_servers.py (what each runs, and its settings).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from serve_load import (  # noqa: E402 - bench/ is a folder of scripts, not a package
    REPO,
    Payload,
    Server,
    ceiling,
    free_port,
    load,
    machine_busy_seconds,
    make_random_cifar,
    run_loop,
    thread_cpu,
    wait_until_ready,
)

from app.settings import Settings  # noqa: E402 - serve_load put the checkout on the path

# hff-serve configurations by name: HFF_* settings on top of the defaults.
HFF_CONFIGS: dict[str, dict[str, str]] = {
    "hff": {}, "hff-granian": {"server": "granian"},
    # the batcher's share: no batch window, and early exit off (the whole graph, as the peers run)
    "hff-nowait": {"max_batch_wait_ms": "0"}, "hff-exit-off": {"early_exit": "off"},
    # every model call on the inference thread, none on the event loop (HFF_INLINE_CALL_MS)
    "hff-thread": {"inline_call_ms": "0"},
    # two worker processes on the port (app.workers), each with its own batcher
    "hff-workers2": {"workers": "2"}}

GRACE_S = 5.0  # how long a peer's processes get to exit on SIGTERM; they are done being measured


class Peer:
    """A peer server (bench/peer_servers.py) on a free port; ready once it answers `probe`."""

    def __init__(self, kind: str, model_dir: Path, path: str, probe: Payload):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.path = path
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "peer_servers.py"), kind,
                                      str(model_dir), str(self.port)], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)  # its own group: workers included
        try:
            wait_until_ready(self.proc, lambda: httpx.post(
                self.url + path, content=probe.body, headers=probe.headers, timeout=5
            ).status_code == 200, kind, every=0.3)
        except SystemExit:
            self.close()  # wait_until_ready ends only the leader; its workers would outlive it
            raise

    def close(self) -> None:
        """End the peer's whole process group: SIGTERM, then SIGKILL for what is left.

        Waiting for the leader is not enough: after a loaded run one of LitServe's processes
        outlived its leader by about 30 s at 85-90% of a core, ignoring SIGTERM, and so ran
        through the start of whatever was measured next.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while group_alive(self.proc) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def group_alive(leader: subprocess.Popen) -> bool:
    """Whether any process is left in the group `leader` started (its pid is the group's id)."""
    leader.poll()  # reap the leader once it has exited, so its zombie does not count
    try:
        os.killpg(leader.pid, 0)
    except ProcessLookupError:
        return False
    return True


WRK_SCRIPT = """
local f = assert(io.open(os.getenv("PEERS_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
for line in io.lines(os.getenv("PEERS_HEADERS")) do
  local k, v = line:match("^([^:]+): (.*)$")
  wrk.headers[k] = v
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("PEERS %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status))
  io.write(string.format("PEERS_SOCKET %d\\n", e.connect + e.read + e.write + e.timeout))
end
"""


def wrk_load(url: str, payload: Payload, connections: int, seconds: float, work: Path) -> dict:
    """One wrk run: requests/s, p50/p99 ms, non-2xx answers and socket errors."""
    (work / "body").write_bytes(payload.body)
    (work / "headers").write_text("".join(f"{k}: {v}\n" for k, v in payload.headers.items()))
    (work / "post.lua").write_text(WRK_SCRIPT)
    env = {**os.environ, "PEERS_BODY": str(work / "body"), "PEERS_HEADERS": str(work / "headers")}
    out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}",
                          f"-d{seconds:g}s", "--timeout", "10s", "-s", str(work / "post.lua"),
                          url + payload.path], env=env, capture_output=True, text=True, check=True)
    fields = dict(line.split(" ", 1) for line in out.stdout.splitlines()
                  if line.startswith("PEERS"))
    requests, duration_us, p50_us, p99_us, status = map(int, fields["PEERS"].split())
    return {"throughput": requests / (duration_us / 1e6), "p50": p50_us / 1000, "p99": p99_us / 1000,
            "non2xx": status, "socket": int(fields["PEERS_SOCKET"])}


def fallback_load(url: str, payload: Payload, connections: int, seconds: float, work: Path) -> dict:
    r = run_loop(load(url, [payload], connections, seconds, warmup=0.5))
    return {"throughput": r["throughput"], "p50": r["p50"], "p99": r["p99"],
            "non2xx": r["errors"], "socket": 0}


def json_payload(path: str, x: np.ndarray) -> Payload:
    return Payload(path, {"content-type": "application/json"},
                   json.dumps({"instances": [np.round(x, 4).tolist()]}).encode())


def kserve_binary_payload(model_name: str, x: np.ndarray, early_exit: str | None = None) -> Payload:
    data = x[None].astype("<f4").tobytes()
    header = {"inputs": [{"name": "input", "shape": [1, *x.shape], "datatype": "FP32",
                          "parameters": {"binary_data_size": len(data)}}]}
    if early_exit is not None:
        header["parameters"] = {"early_exit": early_exit}
    raw = json.dumps(header).encode()
    return Payload(f"/v2/models/{model_name}/infer",
                   {"content-type": "application/octet-stream",
                    "inference-header-content-length": str(len(raw))}, raw + data)


def versions() -> str:
    names = ["onnxruntime", "uvicorn", "granian", "fastapi", "mosec", "litserve"]
    found = []
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return ", ".join(found)


class Target(NamedTuple):
    name: str  # the table's server column
    url: str
    payload: Payload


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits", type=Path, default=REPO / "models/digits")
    p.add_argument("--cifar", type=Path, default=None,
                   help="also cifar-cnn over KServe binary at 64 connections vs the in-process "
                        "ceiling (made with random weights when the dir is missing)")
    p.add_argument("--servers", nargs="+", default=["hff", "mosec", "litserve"],
                   choices=[*HFF_CONFIGS, "mosec", "litserve"])
    p.add_argument("--connections", type=int, nargs="*", default=[1, 64, 256],
                   help="digits rows at these connection counts (none: only --cifar's rows)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--designs", type=Path, nargs="+", default=[],
                   help="also hff-serve from these source trees (e.g. `git archive main app | tar "
                        "-x -C /tmp/base`), each as hff@<dir name>, to compare designs in one run")
    p.add_argument("--no-binary", action="store_true", help="skip hff-serve's KServe binary rows")
    p.add_argument("--cifar-configs", nargs="*", default=list(CIFAR_SERVED),
                   choices=list(CIFAR_SERVED), help="this tree's configurations in --cifar's rows "
                                                    "(the --designs trees run there too)")
    p.add_argument("--load", choices=["wrk", "uvloop"], default="wrk" if shutil.which("wrk") else "uvloop")
    args = p.parse_args()
    args.digits = args.digits.resolve()
    if args.cifar is not None:
        args.cifar = args.cifar.resolve()
    designs = {f"hff@{d.name}": d.resolve() for d in args.designs}
    if not (args.digits / "manifest.json").is_file():
        raise SystemExit(f"{args.digits} is not a model dir (make export writes models/digits)")
    if args.cifar is not None and not (args.cifar / "manifest.json").is_file():
        print(f"exporting random cifar-cnn to {args.cifar} ...", file=sys.stderr)
        make_random_cifar(args.cifar)
    run_one = wrk_load if args.load == "wrk" else fallback_load

    print(f"# machine: {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} usable cores, load average {os.getloadavg()[0]:.1f}; "
          f"python {platform.python_version()}, {versions()}; load: {args.load}")
    print(f"# {' '.join(sys.argv)}")
    print(f"# medians of {args.repeats} interleaved runs of {args.seconds:g} s "
          "(min-max requests/s in brackets); one instance per request")

    from training.data import load_dataset

    image = load_dataset("digits").test.tensors[0][0].numpy()  # (1, 8, 8)
    digits = json.loads((args.digits / "manifest.json").read_text())
    started: list = []
    targets: list[Target] = []
    try:
        for name in [*designs, *args.servers] if args.connections else []:
            if name in HFF_CONFIGS or name in designs:
                server = (Server(args.digits, source=designs[name]) if name in designs
                          else Server(args.digits, **HFF_CONFIGS[name]))
                started.append(server)
                targets.append(Target(f"{name} (JSON /predict)", server.url,
                                      json_payload("/predict", image)))
                if not args.no_binary:
                    targets.append(Target(f"{name} (KServe binary)", server.url,
                                          kserve_binary_payload(digits["name"], image)))
            else:
                path = "/inference" if name == "mosec" else "/predict"
                payload = json_payload(path, image)
                peer = Peer(name, args.digits, path, payload)
                started.append(peer)
                targets.append(Target(f"{name} (JSON)", peer.url, payload))
        print("\n| model | server | connections | requests/s | p50 ms | p99 ms | non-2xx |")
        print("|---|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for conns in args.connections:
                for t in targets:  # warm-up: connections opened, caches and batch sizes hot
                    run_one(t.url, t.payload, conns, 1, work)
                runs: dict[str, list[dict]] = {t.name: [] for t in targets}
                for _ in range(args.repeats):
                    for t in targets:
                        runs[t.name].append(run_one(t.url, t.payload, conns, args.seconds, work))
                for t in targets:
                    emit("digits", t.name, conns, runs[t.name])
        if args.cifar is not None:
            cifar_rows(args, run_one, designs)
    finally:
        for s in started:
            s.close()
    return 0


def emit(model: str, name: str, conns: int | str, runs: list[dict]) -> None:
    tput = [r["throughput"] for r in runs]
    med = lambda key: float(np.median([r[key] for r in runs]))  # noqa: E731
    bad = sum(r["non2xx"] for r in runs)
    socket = sum(r["socket"] for r in runs)
    p99 = med("p99")
    print(f"| {model} | {name} | {conns} | {np.median(tput):,.0f} ({min(tput):,.0f}-{max(tput):,.0f}) "
          f"| {med('p50'):.2f} | {'-' if np.isnan(p99) else f'{p99:.2f}'} | {bad}"
          f"{f' (+{socket} socket errors)' if socket else ''} |", flush=True)


# cifar-cnn's served configurations (HFF_* settings) and in-process ceilings (batch rows, calls
# at once with the cores shared out between them, onnxruntime's pool threads spinning when
# idle): batch 64 is the server's largest batch; the server at 64 connections settles on two
# batches of 32 (one runs while the other's clients turn around), so the ceilings at 32 are the
# ones at the same batch size, with spinning off (as the server runs) and on (onnxruntime's
# default, which the ceiling may use: it has no event loop to leave a core to); two one-thread
# calls of 32 at once was the best this machine's onnxruntime did in process. One more ceiling
# per served configuration is the issue's own measure, the same batch size as that server's: its
# mean batch over the warm-up (rounded; 64 connections and two calls at once settle near a third
# of 64; two workers batch their own connections, so smaller), in as many
# one-thread calls at once as the server runs (HFF_CONCURRENT_CALLS, 2)
CIFAR_SERVED = {"hff": {}, "hff, HFF_MAX_BATCH_SIZE=32": {"max_batch_size": 32},
                "hff, HFF_CONCURRENT_CALLS=1": {"concurrent_calls": 1},
                "hff, HFF_WORKERS=2": {"workers": 2},
                # two workers with their model calls on an inference thread (the default for
                # one process, 1 ms), as the twelfth round first ran them
                "hff, HFF_WORKERS=2, HFF_INLINE_CALL_MS=1": {"workers": 2, "inline_call_ms": 1}}
CIFAR_CEILINGS = [(64, 1, False), (32, 1, False), (32, 1, True), (32, 2, False)]
# whole-graph calls the server runs at once on CPU by default (HFF_CONCURRENT_CALLS)
SERVED_CALLS: int = Settings.model_fields["CONCURRENT_CALLS"].default
WARMUP_S = 2.0  # the cifar servers' warm-up, long enough for their batch size to settle


def same_batch_ceiling(batch: float, ceilings: list[tuple[int, int, bool]]
                       ) -> tuple[int, int, bool] | None:
    """The ceiling at the server's (mean) batch size, run as the server runs its calls; None
    when the list has it already."""
    extra = (max(1, round(batch)), SERVED_CALLS, False)
    return None if extra in ceilings else extra


class CoreUse(NamedTuple):
    """Where the machine's cores went during one load run (CPU seconds / wall seconds, /proc)."""

    loop: float  # the server's main thread: its event loop, HTTP and the per-request Python
    threads: float  # the server's other threads: the inference calls, decoding
    load: float  # the load generator (wrk, or the generator in this process) and this bench
    rest: float  # everything else: the kernel's work charged to no process, other processes
    idle: float


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for (wrk runs to its end)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def server_processes(pid: int) -> list[int]:
    """`pid` and its worker processes (HFF_WORKERS > 1: the supervisor's children)."""
    with contextlib.suppress(OSError):
        return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    return [pid]


def with_core_use(pid: int, run) -> tuple[dict, CoreUse]:
    """run()'s result, and how the cores were used while it ran (server `pid` with its worker
    processes, and the rest); `loop` sums the processes' main threads (each one's event loop)."""
    pids = server_processes(pid)
    cpu = lambda: {(p, tid): s for p in pids for tid, s in thread_cpu(p).items()}  # noqa: E731
    threads_before, busy_before, mine_before = cpu(), machine_busy_seconds(), own_cpu_seconds()
    start = time.perf_counter()
    result = run()
    wall = time.perf_counter() - start
    threads = {key: s - threads_before.get(key, 0.0) for key, s in cpu().items()}
    busy = (machine_busy_seconds() - busy_before) / wall
    mine = (own_cpu_seconds() - mine_before) / wall
    loop = sum(threads.pop((p, p), 0.0) for p in pids) / wall
    others = sum(threads.values()) / wall
    return result, CoreUse(loop, others, mine, max(0.0, busy - loop - others - mine),
                           max(0.0, (os.cpu_count() or 1) - busy))


def mean_batch(url: str) -> float:
    """The server's mean batch size so far, from its hff_batch_size histogram (all models)."""
    totals = {"hff_batch_size_sum": 0.0, "hff_batch_size_count": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["hff_batch_size_sum"] / max(1.0, totals["hff_batch_size_count"])


def cifar_rows(args: argparse.Namespace, run_one, designs: dict[str, Path]) -> None:
    """cifar-cnn, early exit off, KServe binary at 64 connections (the configurations above and
    the --designs trees with their defaults), interleaved with the in-process ceilings."""
    manifest = json.loads((args.cifar / "manifest.json").read_text())
    shape = manifest["input"]["shape"]
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    payload = kserve_binary_payload(manifest["name"], image, early_exit="off")
    servers: dict[str, Server] = {}
    try:
        for name, source in designs.items():
            servers[name] = Server(args.cifar, source=source)
        for name, settings in CIFAR_SERVED.items():
            if name in args.cifar_configs:
                servers[name] = Server(args.cifar, **settings)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for server in servers.values():
                run_one(server.url, payload, 64, WARMUP_S, work)
            served: dict[str, list[dict]] = {name: [] for name in servers}
            core_use: dict[str, list[CoreUse]] = {name: [] for name in servers}
            kinds = list(CIFAR_CEILINGS)
            # each server against the ceiling at its own mean batch size (two workers batch
            # their own connections' requests, so their batches are smaller)
            same: dict[str, tuple[int, int, bool]] = {}
            for name, server in servers.items():
                same[name] = same_batch_ceiling(mean_batch(server.url), [])  # never None
                if same[name] not in kinds:
                    kinds.append(same[name])
            ceilings: dict[tuple[int, int, bool], list[dict]] = {c: [] for c in kinds}
            for _ in range(args.repeats):
                for batch, concurrent, spinning in kinds:
                    ceilings[batch, concurrent, spinning].append(
                        {**ceiling(args.cifar, batch, shape, args.seconds, concurrent, spinning),
                         "non2xx": 0, "socket": 0})
                for name, server in servers.items():
                    result, cores = with_core_use(server.proc.pid, lambda s=server: run_one(
                        s.url, payload, 64, args.seconds, work))
                    served[name].append(result)
                    core_use[name].append(cores)
        medians = {}
        for (batch, concurrent, spinning), runs in ceilings.items():
            how = "one call at a time" if concurrent == 1 else f"{concurrent} calls at once"
            spin = ", idle threads spinning" if spinning else ""
            mark = (", the batch size of " + ", ".join(n for n, k in same.items()
                                                        if k == (batch, concurrent, spinning))
                    if (batch, concurrent, spinning) in same.values() else "")
            emit("cifar-cnn", f"onnxruntime in process, batch {batch}, {how}{spin}{mark} "
                              "(instances/s)", "-", runs)
            medians[batch, concurrent, spinning] = np.median([r["throughput"] for r in runs])
        for name, runs in served.items():
            emit("cifar-cnn", f"{name} (KServe binary, early exit off; mean batch "
                              f"{mean_batch(servers[name].url):.1f})", 64, runs)
        for name, runs in served.items():
            tput = np.median([r["throughput"] for r in runs])
            print(f"# cifar-cnn {name} / ceiling: " + ", ".join(
                f"batch {b} x{c}{' spinning' if spin else ''}"
                f"{' (same batch)' if (b, c, spin) == same[name] else ''} {tput / m:.0%}"
                for (b, c, spin), m in medians.items()))
        for name, uses in core_use.items():  # what the server's share of the ceiling went to
            median = CoreUse(*np.median(np.array(uses), axis=0))
            print(f"# cifar-cnn {name}: cores used, of {os.cpu_count()} (medians): event loop "
                  f"{median.loop:.2f}, other server threads {median.threads:.2f}, load generator "
                  f"{median.load:.2f}, rest {median.rest:.2f}, idle {median.idle:.2f}")
    finally:
        for server in servers.values():
            server.close()


if __name__ == "__main__":
    sys.exit(main())
