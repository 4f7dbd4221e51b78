"""HTTP load on hff-serve: batching vs none vs the in-process onnxruntime ceiling, early exit on/off.

Usage (make bench-serve prepares the model dirs):
    python bench/serve_load.py --cifar-random models/cifar-random --digits models/digits \
        --cifar-trained models/digits32 [--seconds 5] [--concurrency 1 16 64]

Rows, all in one invocation on this machine:
  (a) onnxruntime in process, model.onnx at the server's max batch size (the ceiling) and at
      batch 1 (their ratio bounds what batching can gain on the machine);
  (b) the server with batching (max batch 64), (c) the same with batching off (max batch 1),
      both with early exit off, on the cifar-cnn preset (random weights) and on the digits model;
  (d) early exit off vs auto (the manifest's calibrated thresholds) vs one fixed threshold, with
      batching on, on the digits model and on cifar-cnn trained on digits32 (where the network
      costs more than the HTTP request), with test accuracy; `--only fashion-mnist` runs (a) and
      (d) on a Fashion-MNIST model over its 10,000 test images.
The load generator is closed-loop: `concurrency` clients each send one request (one instance)
after the other for `seconds`, after a warm-up; the bodies are encoded once, up front: JSON
arrays on /predict, and for the 3x32x32 models also KServe v2 binary tensors (--encoding),
which spare the server parsing 3,072 JSON numbers a request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's model/ and training/, not an installed copy

from contract.model_dir import MANIFEST_FILE, load_manifest  # noqa: E402


def make_random_cifar(out: Path) -> None:
    """Export cifar-cnn with random weights (a checkpoint dir written here, then hff-export)."""
    import torch
    from safetensors.torch import save_file

    from model import atomic
    from model.checkpoint import HELDOUT_FILE, RunConfig, save_config, save_weights
    from model.config import preset_config
    from model.export import export_model
    from model.factory import build_model

    run = out.parent / f".{out.name}-run"
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = preset_config("cifar-cnn")
    net = build_model(cfg).eval()
    save_config(run, RunConfig(model=cfg, dataset="random"))
    save_weights(run, net)
    x = torch.rand(64, *cfg.input_shape)  # calibration data: random images, random labels
    with torch.no_grad():
        probs = torch.stack([lg.softmax(1) for lg in net(x, detach=False)], dim=1)  # (N, L, C)
    labels = torch.randint(0, cfg.num_classes, (64,))
    heldout = {"val_probs": probs[:32].contiguous(), "val_labels": labels[:32],
               "test_probs": probs[32:].contiguous(), "test_labels": labels[32:]}
    atomic.write_with(run / HELDOUT_FILE, lambda p: save_file(heldout, str(p)))
    export_model(run, out, name="cifar-random")


def stat_cpu_seconds(stat_file: Path) -> float:
    """utime + stime, in seconds, from a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat file
    (the fields after the command name, which may itself hold spaces and parentheses)."""
    stat = stat_file.read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each thread of `pid`, by thread id (/proc/<pid>/task/*/stat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            out[int(task.name)] = stat_cpu_seconds(task / "stat")
    return out


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(proc: subprocess.Popen, ready, what: str, seconds: float = 120.0,
                     every: float = 0.2) -> None:
    """Call `ready()` (True once the server answers as it should; a connection error counts as
    not yet) until it says so; exit naming `what` when the process ends first, or when `seconds`
    pass (then the process is killed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        time.sleep(every)
    proc.kill()
    raise SystemExit(f"{what} not ready in {seconds:.0f} s")


class Server:
    """`python -m app` from `source` (this checkout, or another one to compare with), serving
    `model_dir` or what `args` name (e.g. --model-repository DIR); HFF_* settings from the
    keywords, logging at warning unless they say otherwise; its output to `log_path` if given."""

    def __init__(self, model_dir: Path | None = None, source: Path = REPO, *,
                 args: list[str] | None = None, log_path: Path | None = None, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HFF_")}
        env["PYTHONPATH"] = str(source)
        env["HFF_LOG_LEVEL"] = "warning"
        env.update({f"HFF_{k.upper()}": str(v) for k, v in settings.items()})
        serving = ["--model-dir", str(model_dir)] if model_dir is not None else list(args or [])
        output = self._log = None if log_path is None else log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "app", *serving,
                                      "--port", str(self.port)], cwd=source, env=env,
                                     stdout=output, stderr=subprocess.STDOUT if output else None)
        try:
            wait_until_ready(self.proc, lambda: httpx.get(self.url + "/readyz", timeout=2)
                             .status_code == 200, f"server for {' '.join(serving)}")
        except SystemExit as failed:
            if output is None:
                raise
            output.close()  # the log may sit in a temporary dir the caller is about to remove
            raise SystemExit(f"{failed}; its output:\n{log_path.read_text()}") from None

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        if self._log is not None:
            self._log.close()


class Payload(NamedTuple):
    """One pre-encoded request: where it goes, its content headers and body."""

    path: str
    headers: dict[str, str]
    body: bytes


def bodies(x: np.ndarray, mode: str, encoding: str, model_name: str) -> list[Payload]:
    """One request per image, encoded once. json: POST /predict with the pixels to 4 decimals, as
    a client would send them; binary: KServe v2 infer with the binary tensor data extension."""
    early_exit = mode if mode in ("auto", "off") else {"threshold": float(mode)}
    if encoding == "json":
        return [Payload("/predict", {"content-type": "application/json"},
                        json.dumps({"instances": [np.round(img, 4).tolist()],
                                    "early_exit": early_exit}).encode()) for img in x]
    payloads = []
    for img in x:
        data = img[None].astype("<f4").tobytes()
        header = json.dumps({"inputs": [{"name": "input", "shape": [1, *img.shape],
                                         "datatype": "FP32",
                                         "parameters": {"binary_data_size": len(data)}}],
                             "parameters": {"early_exit": early_exit}}).encode()
        payloads.append(Payload(f"/v2/models/{model_name}/infer",
                                {"content-type": "application/octet-stream",
                                 "inference-header-content-length": str(len(header))},
                                header + data))
    return payloads


def first_answer(body: bytes) -> dict:
    """{label, exit_block} of the first instance, from a /predict or a KServe v2 response."""
    response = json.loads(body)
    if "predictions" in response:
        return response["predictions"][0]
    out = {o["name"]: o["data"] for o in response["outputs"]}
    classes = len(out["probabilities"]) // len(out["exit_block"])
    return {"label": int(np.argmax(out["probabilities"][:classes])),
            "exit_block": out["exit_block"][0]}


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client for pre-encoded POSTs. On 2 shared cores the load
    generator competes with the server: httpx costs several times more CPU per request
    (`--client httpx` measures with it instead)."""

    def __init__(self, url: str):
        host_port = url.removeprefix("http://")
        self.host, port = host_port.split(":")
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, payload: Payload, method: str = "POST") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        fields = "".join(f"{k}: {v}\r\n" for k, v in payload.headers.items())
        head = (f"{method} {payload.path} HTTP/1.1\r\nhost: {self.host}\r\n{fields}"
                f"content-length: {len(payload.body)}\r\n\r\n").encode()
        self.writer.write(head + payload.body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                      if k.strip().lower() == b"content-length")
        return status, await self.reader.readexactly(length)

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self.post(Payload(path, {}, b""), method="GET")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class HttpxConnection:
    def __init__(self, client: httpx.AsyncClient):
        self.client = client

    async def post(self, payload: Payload) -> tuple[int, bytes]:
        r = await self.client.post(payload.path, content=payload.body, headers=payload.headers)
        return r.status_code, r.content

    async def close(self) -> None:
        pass


async def load(url: str, payloads: list[Payload], concurrency: int, seconds: float,
               warmup: float, client_kind: str = "raw") -> dict:
    """Closed-loop load; returns throughput, latency percentiles and the answers by payload."""
    latencies: list[float] = []  # of requests sent inside the window
    done_in_window = 0  # requests completed inside the window: the throughput
    answers: dict[int, dict] = {}
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as shared:
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def worker(w: int) -> None:
            nonlocal errors, done_in_window
            conn = RawConnection(url) if client_kind == "raw" else HttpxConnection(shared)
            i = w
            try:
                while True:
                    t0 = time.perf_counter()
                    if t0 >= stop_at:
                        return
                    status, body = await conn.post(payloads[i % len(payloads)])
                    t1 = time.perf_counter()
                    i += concurrency
                    if status != 200:
                        errors += 1
                        continue
                    if measure_from <= t1 < stop_at:
                        done_in_window += 1
                    if t0 >= measure_from:
                        latencies.append(t1 - t0)
                        answers[(i - concurrency) % len(payloads)] = first_answer(body)
            finally:
                await conn.close()

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    lat = np.array(latencies) * 1000
    return {"throughput": done_in_window / seconds, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "answers": answers, "errors": errors}


async def goodput(url: str, payloads: list[Payload], concurrency: int, seconds: float,
                  warmup: float) -> dict:
    """Closed-loop load that never backs off (a 429 is answered by the next request at once, as
    wrk does): 200s and other answers per second, and how long /readyz takes meanwhile."""
    counts: dict[int | str, int] = {}
    latencies: list[float] = []
    ready_ms: list[float] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def worker(w: int) -> None:
        conn, i = RawConnection(url), w
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    status, _ = await conn.post(payloads[i % len(payloads)])
                except (ConnectionError, asyncio.IncompleteReadError):
                    status = "closed"
                    await conn.close()
                    conn = RawConnection(url)
                t1 = time.perf_counter()
                i += concurrency
                if measure_from <= t1 < stop_at:
                    counts[status] = counts.get(status, 0) + 1
                    if status == 200:
                        latencies.append(t1 - t0)
        finally:
            await conn.close()

    async def probe() -> None:
        conn = RawConnection(url)
        try:
            while time.perf_counter() < stop_at:
                await asyncio.sleep(0.25)
                t0 = time.perf_counter()
                await conn.get("/readyz")
                if time.perf_counter() >= measure_from:
                    ready_ms.append((time.perf_counter() - t0) * 1000)
        finally:
            await conn.close()

    await asyncio.gather(probe(), *(worker(w) for w in range(concurrency)))
    await until_idle(url)
    lat = np.array(latencies or [float("nan")]) * 1000
    return {"ok": counts.pop(200, 0) / seconds, "other": counts, "p50": float(np.median(lat)),
            "p99": float(np.percentile(lat, 99)),
            "readyz": float(np.max(ready_ms)) if ready_ms else float("nan")}


async def until_idle(url: str, limit_s: float = 60.0) -> None:
    """Wait until the server holds no admitted or waiting request: what the clients of one cell
    left queued when they stopped must not be served during the next cell."""
    conn, deadline = RawConnection(url), time.perf_counter() + limit_s
    try:
        while time.perf_counter() < deadline:
            _, text = await conn.get("/metrics")
            held = re.findall(rb"^hff_(?:admitted_instances|waiting_requests) (\S+)$", text, re.M)
            if all(float(v) == 0 for v in held):
                return
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


def goodput_sweep(args: argparse.Namespace) -> int:
    """Goodput against offered load on the digits model (early exit off), one server."""
    model_dir = args.digits
    manifest = json.loads((model_dir / "manifest.json").read_text())
    x, _ = test_images(manifest.get("dataset") or "digits")
    print("# goodput: closed-loop clients that never back off, early exit off, "
          f"{args.seconds:g} s per cell after {args.warmup:g} s warm-up; medians of "
          f"{args.repeats} interleaved repeats")
    print("| instances per request | concurrency | 200s/s | instances/s | other answers/s | "
          "p50 ms (200s) | p99 ms (200s) | slowest /readyz ms |")
    print("|---|---|---|---|---|---|---|---|")
    server = Server(model_dir, max_batch_size=args.max_batch_size)
    try:
        for per in args.instances:
            payloads = [Payload("/predict", {"content-type": "application/json"},
                                json.dumps({"instances": np.round(np.take(
                                    x, range(i, i + per), axis=0, mode="wrap"), 4).tolist(),
                                            "early_exit": "off"}).encode())
                        for i in range(0, 8 * per, per)]
            runs: dict[int, list[dict]] = {c: [] for c in args.concurrency}
            for _ in range(args.repeats):
                for conc in args.concurrency:
                    runs[conc].append(run_loop(goodput(server.url, payloads, conc, args.seconds,
                                                       args.warmup)))
            for conc in args.concurrency:
                r = runs[conc]
                ok = float(np.median([v["ok"] for v in r]))
                other: dict = {}
                for v in r:
                    for k, n in v["other"].items():
                        other[k] = other.get(k, 0) + n / args.seconds / len(r)
                other_text = ", ".join(f"{k}: {n:.0f}" for k, n in sorted(other.items(), key=str)) or "0"
                print(f"| {per} | {conc} | {ok:.1f} | {ok * per:.0f} | {other_text} | "
                      f"{np.median([v['p50'] for v in r]):.1f} | "
                      f"{np.median([v['p99'] for v in r]):.1f} | "
                      f"{max(v['readyz'] for v in r):.0f} |", flush=True)
    finally:
        server.close()
    return 0


def run_loop(coroutine):
    """asyncio.run, on uvloop when it is installed: the load generator shares the server's cores,
    so every cycle it spends is taken from the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def ceiling(model_dir: Path, batch: int, shape: list[int], seconds: float,
            concurrent: int = 1, spinning: bool = False) -> dict:
    """model.onnx in process at `batch` rows, through the server's own runtime (same sessions,
    threads and options; no HTTP, no queue). `concurrent` > 1: that many threads each run a
    batch at once, with the cores shared out between them (available_cores() // concurrent
    onnxruntime threads each). `spinning`: onnxruntime's idle pool threads spin instead of
    sleeping (its own default, which the server turns off to leave the event loop the cores)."""
    import threading

    from app.runtime import ModelRuntime, available_cores

    runtime = ModelRuntime(model_dir, device="cpu", max_batch_size=batch,
                           threads=max(1, available_cores() // concurrent), spinning=spinning)
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    for _ in range(3):
        runtime.run_full(x)
    calls = [0] * concurrent
    t0 = time.perf_counter()

    def run(i: int) -> None:
        while time.perf_counter() - t0 < seconds:
            runtime.run_full(x)
            calls[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_call = (time.perf_counter() - t0) / sum(calls)  # wall seconds per batch, all threads
    return {"throughput": batch / per_call, "p50": per_call * concurrent * 1000,
            "p99": float("nan")}


def test_images(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_dataset

    test = load_dataset(dataset).test
    if hasattr(test, "tensors"):  # the bundled sets are TensorDatasets of [0, 1] floats
        images, labels = test.tensors
    else:  # the standard sets keep uint8 (training/readers.py ArrayDataset)
        images, labels = test.images.float() / 255.0, test.labels
    return images.numpy(), labels.numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar-random", type=Path, default=REPO / "models/cifar-random")
    p.add_argument("--digits", type=Path, default=REPO / "models/digits")
    p.add_argument("--cifar-trained", type=Path, default=REPO / "models/digits32")
    p.add_argument("--fashion-mnist", type=Path, default=REPO / "models/fashion-mnist",
                   help="a model trained on Fashion-MNIST (make export DATASET=fashion-mnist)")
    p.add_argument("--seconds", type=float, default=3.0, help="measured time per repeat")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="load generator's HTTP client (raw: minimal asyncio HTTP/1.1 keep-alive)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="also run early exit with this one threshold at every block")
    p.add_argument("--encoding", choices=["json", "binary"], nargs="+", default=["json", "binary"],
                   help="request bodies for the 3x32x32 models: JSON arrays on /predict, and/or "
                        "KServe v2 binary tensors (the digits model: JSON)")
    p.add_argument("--goodput", action="store_true",
                   help="instead: goodput against offered load on the digits model "
                        "(--concurrency, --instances)")
    p.add_argument("--instances", type=int, nargs="+", default=[1, 256],
                   help="with --goodput: instances per request")
    p.add_argument("--only", choices=["cifar-random", "digits", "cifar-trained", "fashion-mnist"],
                   nargs="+",
                   default=["cifar-random", "digits", "cifar-trained"])
    args = p.parse_args()
    if args.goodput:
        print(f"# machine: {platform.processor() or platform.machine()}, "
              f"{len(os.sched_getaffinity(0))} usable cores, load average "
              f"{os.getloadavg()[0]:.1f}; python {platform.python_version()}, onnxruntime "
              f"{ort.__version__}, {' '.join(sys.argv[1:])}")
        return goodput_sweep(args)
    if "cifar-random" in args.only and not (args.cifar_random / MANIFEST_FILE).is_file():
        print(f"exporting random cifar-cnn to {args.cifar_random} ...", file=sys.stderr)
        make_random_cifar(args.cifar_random)
    for name in args.only:
        d = getattr(args, name.replace("-", "_"))
        if not (d / MANIFEST_FILE).is_file():
            raise SystemExit(f"{d} is not a model dir (make bench-serve prepares it)")

    print(f"# machine: {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} usable cores, load average "
          f"{os.getloadavg()[0]:.1f}; python {platform.python_version()}, onnxruntime "
          f"{ort.__version__}, {' '.join(sys.argv[1:]) or 'defaults'}")
    def emit(model, setup, mode, conc, runs: list[dict], y=None):
        """One table row: medians over the repeats; accuracy over every answer collected."""
        tput = float(np.median([r["throughput"] for r in runs]))
        p50 = float(np.median([r["p50"] for r in runs]))
        p99 = float(np.median([r["p99"] for r in runs]))
        a = b = ""
        answers = {k: v for r in runs for k, v in r.get("answers", {}).items()}
        if y is not None and answers:
            idx = np.array(sorted(answers))
            got = np.array([answers[i]["label"] for i in idx])
            a = f"{(got == y[idx]).mean() * 100:.2f}% of {len(idx)}"
            b = f"{np.mean([answers[i]['exit_block'] for i in idx]):.2f}"
        spread = f"{min(r['throughput'] for r in runs):.0f}-{max(r['throughput'] for r in runs):.0f}"
        p99_text = "-" if np.isnan(p99) else f"{p99:.2f}"
        print(f"| {model} | {setup} | {mode} | {conc} | {tput:.0f} ({spread}) | {p50:.2f} | "
              f"{p99_text} | {a} | {b} |", flush=True)
        errors = sum(r.get("errors", 0) for r in runs)
        if errors:
            print(f"#   the row above had {errors} answers other than 200", flush=True)

    print(f"# medians of {args.repeats} interleaved repeats of {args.seconds:g} s each "
          "(min-max throughput in brackets)")
    print("# baselines: batching off = the same server, runtime and onnxruntime threads at max "
          "batch 1; early exit off = the same batching server running every block")
    print("| model | server | early exit | concurrency | instances/s | p50 ms | p99 ms | "
          "accuracy (test) | mean exit block |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    mb = args.max_batch_size
    for name in args.only:
        model_dir = getattr(args, name.replace("-", "_"))
        manifest = load_manifest(model_dir)
        shape = manifest.input.shape
        if name == "cifar-random":
            x, y = rng.random((256, *shape), dtype=np.float32), None
        else:
            x, y = test_images(manifest.dataset or ("digits" if name == "digits" else "digits32"))
        label = f"{name} ({manifest.preset})"
        modes = ["off"] if name == "cifar-random" else ["off", "auto", str(args.threshold)]
        encodings = args.encoding if name != "digits" else ["json"]  # 64 numbers: JSON is fine
        payloads = {(m, e): bodies(x, m, e, manifest.name) for m in modes for e in encodings}
        # every server of a model is up at once and idle when not loaded, so the configurations
        # can be interleaved: the machine's load drifts, the ratios between neighbours do not
        servers = {"batching": Server(model_dir, max_batch_size=mb)}
        if name in ("cifar-random", "digits"):
            servers["batching off"] = Server(model_dir, max_batch_size=1)
        try:
            configs = [(setup, mode, enc) for enc in encodings for setup in servers
                       for mode in (modes if setup == "batching" else ["off"])]
            # the ceiling at the server's batch size, and at batch 1: their ratio bounds what
            # any batching can gain on this machine
            for batch in (mb, 1):
                ceilings = [ceiling(model_dir, batch, shape, args.seconds)
                            for _ in range(args.repeats)]
                emit(label, f"onnxruntime in process, batch {batch}", "off", "-", ceilings)
            for conc in args.concurrency:
                runs: dict[tuple[str, str, str], list[dict]] = {c: [] for c in configs}
                for _ in range(args.repeats):
                    for setup, mode, enc in configs:
                        runs[setup, mode, enc].append(run_loop(load(
                            servers[setup].url, payloads[mode, enc], conc, args.seconds,
                            args.warmup, args.client)))
                for setup, mode, enc in configs:
                    max_batch = mb if setup == "batching" else 1
                    via = ", KServe binary" if enc == "binary" else ""
                    emit(label, f"{setup} (max batch {max_batch}){via}", mode, conc,
                         runs[setup, mode, enc], y)
        finally:
            for server in servers.values():
                server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
