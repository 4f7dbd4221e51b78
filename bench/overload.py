"""Overload: open-loop Poisson arrivals past capacity, run-to-the-end vs stage-level vs adaptive.

Usage (cifar-cnn trained 24 epochs on digits32: `make models/digits32-24/manifest.json`):
    python bench/overload.py saturate --model models/digits32-24         # capacity, both schedulers
    python bench/overload.py points --model models/digits32-24  # what each operating point can buy
    python bench/overload.py sweep --model models/digits32-24 --loads 0.5 1 \\
        --results docs/overload.json                                 # merges rows, prints them
    python bench/overload.py plot --results docs/overload.json --out docs/overload.png

Four server configurations, the same in everything else (one onnxruntime thread, max batch 64,
the admission queue sized to the latency target so that no configuration queues for seconds:
capacity x a quarter of the target in rows (--queue-ms; several values run every configuration
at each), a request that finds it full refused at once (--queue-wait-ms 0: open-loop arrivals
gain nothing by waiting, and 0 refuses on the hot path), and HFF_MAX_INSTANCES 1, since every
request carries one image):
  run-to-the-end, fixed   HFF_SCHEDULING=batch, the calibrated thresholds
  stage-level, fixed      HFF_SCHEDULING=stage, the calibrated thresholds
  stage-level, adaptive   HFF_SCHEDULING=stage, HFF_LATENCY_TARGET_MS=<target> (default floor)
  run-to-the-end, adaptive  HFF_SCHEDULING=batch (the default) with the same controller
`saturate` measures capacity: closed-loop clients that keep 128 requests outstanding, both
schedulers at the calibrated point, interleaved repeats, with test accuracy. `sweep` measures
that capacity first (run-to-the-end, median of three runs, unless --capacity gives it: this
machine's speed drifts between calls) and offers Poisson arrivals at multiples of it (one
labelled test image per request, KServe v2 binary tensors) for `--seconds` after a warm-up,
over a pool of `--connections` keep-alive connections opened beforehand (an arrival that finds
none free is not sent and is counted as "no free connection"); latency counts from each
request's scheduled arrival, so a client that falls behind shows as latency, not as a lighter
load, and each cell reports the generator's CPU share and how late it sent, the server's CPU
share and the cores every other process used meanwhile. Goodput is the answers (200) within the
target per second. Every cell is repeated (`--repeats`), the configurations interleaved
(A B C D A B C D); the table shows each figure's median and every repeat's goodput, and a second
table the adaptive/fixed goodput ratios paired by repeat with their median. `points` measures,
per operating point, the inference time per row, the cost of a 429, and the capacity and the
goodput past capacity it predicts. Every server runs on CPU 0 and the load generator on CPU 1
where the machine has two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.controller import LoadController, default_floor  # noqa: E402 - after the path set-up
from bench.serve_load import (  # noqa: E402 - after the path set-up, as serve_load does
    Payload,
    RawConnection,
    Server,
    bodies,
    first_answer,
    machine_busy_seconds,
    run_loop,
    stat_cpu_seconds,
    test_images,
)
from contract.model_dir import load_manifest  # noqa: E402

CONFIGS = ("run-to-the-end, fixed", "stage-level, fixed", "stage-level, adaptive",
           "run-to-the-end, adaptive")


def settings_for(config: str, target_ms: float, queue_rows: int, queue_wait_ms: float = 0.0) -> dict:
    s = {"threads": 1, "max_batch_size": 64, "max_batch_wait_ms": 2, "queue_bound": queue_rows,
         "queue_wait_s": queue_wait_ms / 1000, "max_connections": 4096, "max_instances": 1,
         "scheduling": "batch" if config.startswith("run-to-the-end") else "stage"}
    if config.endswith("adaptive"):
        s["latency_target_ms"] = target_ms
    return s


CPUS = sorted(os.sched_getaffinity(0))  # before pin() narrows this process to the client's


def pin(server: Server, cpu: int) -> None:
    """Every thread of the server on `cpu`, this process on the others (when there are two).
    The CPUs come from the affinity this process started with: after the first call its own is
    the client's core alone, which left every later server unpinned, on the load generator's
    core (the second server of `saturate` measured 0.88-0.94x the first, whichever it was)."""
    cpus = CPUS
    if len(cpus) < 2:
        return
    for tid in os.listdir(f"/proc/{server.proc.pid}/task"):
        os.sched_setaffinity(int(tid), {cpus[cpu]})
    os.sched_setaffinity(0, set(cpus) - {cpus[cpu]})


def cpu_seconds(server: Server) -> float:
    """CPU seconds the server process has used (all its threads): below 100% of the wall time
    of a saturation run, its one core was idle part of the time, so the server was not the
    bottleneck then."""
    return stat_cpu_seconds(Path(f"/proc/{server.proc.pid}/stat"))


def start(model: Path, config: str, target_ms: float, queue_rows: int,
          queue_wait_ms: float = 0.0) -> Server:
    server = Server(model, **settings_for(config, target_ms, queue_rows, queue_wait_ms))
    pin(server, 0)
    return server


async def closed_loop(url: str, payloads: list[Payload], labels: np.ndarray, outstanding: int,
                      seconds: float, warmup: float) -> dict:
    done, correct = 0, 0
    t0 = time.perf_counter()
    measure_from, stop_at = t0 + warmup, t0 + warmup + seconds

    async def worker(w: int) -> None:
        nonlocal done, correct
        conn, i = RawConnection(url), w
        try:
            while time.perf_counter() < stop_at:
                status, body = await conn.post(payloads[i % len(payloads)])
                t1 = time.perf_counter()
                if status == 200 and measure_from <= t1 < stop_at:
                    done += 1
                    correct += first_answer(body)["label"] == labels[i % len(payloads)]
                i += outstanding
        finally:
            await conn.close()

    await asyncio.gather(*(worker(w) for w in range(outstanding)))
    return {"throughput": done / seconds, "accuracy": correct / max(done, 1)}


async def open_loop(url: str, payloads: list[Payload], labels: np.ndarray, rate: float,
                    seconds: float, warmup: float, target_s: float, seed: int,
                    connections: int = 512) -> dict:
    """Poisson arrivals at `rate` a second over a pool of `connections` keep-alive connections,
    all opened before the clock starts. An arrival that finds every connection busy is not sent
    and counts as a client-side drop ("no connection"): the generator never opens a connection
    per outstanding request, whose set-up, once answers take seconds, cost the server's core
    more than the requests (the earlier generator collapsed every server at 2-3x that way)."""
    rng = np.random.default_rng(seed)
    pool = [RawConnection(url) for _ in range(connections)]
    await asyncio.gather(*(conn.get("/healthz") for conn in pool))
    idle = list(pool)
    latencies: list[float] = []
    counts: dict[int | str, int] = {}
    good = correct = dropped = 0
    blocks: list[int] = []
    lags: list[float] = []  # how far behind its schedule the generator sent each request
    t_start = time.perf_counter() + 0.05
    measure_from, stop_at = t_start + warmup, t_start + warmup + seconds
    arrivals = t_start + np.cumsum(rng.exponential(1.0 / rate, int(rate * (warmup + seconds) * 1.2
                                                                   + 100)))
    arrivals = arrivals[arrivals < stop_at].tolist()

    async def one(conn: RawConnection, i: int, scheduled: float) -> None:
        nonlocal good, correct
        try:
            status, body = await conn.post(payloads[i % len(payloads)])
        except (ConnectionError, asyncio.IncompleteReadError):
            status, body = "closed", b""
            await conn.close()
            conn = RawConnection(url)  # a fresh one, opened by its next request
        latency = time.perf_counter() - scheduled
        idle.append(conn)
        if not measure_from <= scheduled < stop_at:
            return
        counts[status] = counts.get(status, 0) + 1
        if status == 200:
            answer = first_answer(body)
            latencies.append(latency)
            good += latency <= target_s
            correct += answer["label"] == labels[i % len(payloads)]
            blocks.append(answer["exit_block"])

    tasks = set()
    cpu = time.process_time()
    for i, scheduled in enumerate(arrivals):
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        measured = scheduled >= measure_from
        if not idle:
            dropped += measured
            continue
        if measured:
            lags.append(time.perf_counter() - scheduled)
        task = asyncio.create_task(one(idle.pop(), i, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    client_cpu = (time.process_time() - cpu) / (time.perf_counter() - t_start)
    for conn in idle:  # every task is done: each live connection is back in idle
        await conn.close()
    lat = np.array(latencies or [float("nan")]) * 1000
    ok = counts.pop(200, 0)
    return {"offered": rate, "goodput": good / seconds, "throughput": ok / seconds,
            "p50": float(np.median(lat)), "p99": float(np.percentile(lat, 99)),
            "429": counts.pop(429, 0), "503": counts.pop(503, 0),
            "other": {str(k): v for k, v in counts.items()}, "no_connection": dropped,
            "accuracy": correct / max(ok, 1), "mean_exit_block": float(np.mean(blocks or [0])),
            "client_cpu": client_cpu,
            "client_lag_p99": float(np.percentile(lags, 99) * 1000) if lags else math.nan}


def inference_cost(model: Path, seconds: float) -> list[dict]:
    """Per operating point: the inference thread's CPU seconds per row, in this process (the
    batcher and onnxruntime, one thread, max batch 64, no HTTP), with 128 rows outstanding."""
    from app.batcher import Batcher
    from app.metrics import Metrics
    from app.runtime import ModelRuntime

    runtime = ModelRuntime(model, threads=1)
    runtime.warm_up()
    x, _ = test_images(runtime.manifest.dataset)
    x = x.astype(np.float32)

    class TimedRuntime:
        """The runtime, counting the CPU seconds its stage calls take on the calling thread."""

        def __init__(self) -> None:
            self.busy = 0.0

        def __getattr__(self, name: str):
            return getattr(runtime, name)

        def run_stage(self, k: int, features, rows: int):
            started = time.thread_time()
            try:
                return runtime.run_stage(k, features, rows)
            finally:
                self.busy += time.thread_time() - started

    async def measure(thresholds: np.ndarray) -> float:
        timed = TimedRuntime()
        batcher = Batcher(timed, Metrics().for_model("m", "1"), scheduling="batch")  # type: ignore[arg-type]
        batcher.start()
        stop_at, rows = time.perf_counter() + seconds, 0

        async def client(i: int) -> None:
            nonlocal rows
            while time.perf_counter() < stop_at:
                await batcher.submit(x[i % len(x)][None], thresholds, False).future
                rows += 1
                i += 128

        await asyncio.gather(*(client(i) for i in range(128)))
        await batcher.stop()
        return timed.busy / rows

    out = []
    for i, point in enumerate(runtime.manifest.operating_points):
        thresholds = np.array([np.inf if t is None else t for t in point.thresholds])
        out.append({"point": i, "compute_fraction": point.compute_fraction,
                    "expected_accuracy": point.expected_accuracy,
                    "accuracy_lower_bound": point.accuracy_lower_bound,
                    "test_accuracy": point.test_accuracy,
                    "inference_us": asyncio.run(measure(thresholds)) * 1e6})
    return out


def points(args: argparse.Namespace) -> int:
    """What a cheaper operating point can buy. A saturated server answers about 1 / (h + i)
    requests a second, h the CPU time of everything but inference per request (HTTP, decoding,
    the batcher: measured as the saturated server's CPU per answer minus i at point 0) and i the
    inference time per row at the point; the ratio of those capacities is what an adaptive
    server gains over a fixed one when neither refuses anything. Past capacity both also refuse,
    r CPU seconds per 429 (measured on a fixed server offered twice its capacity, its admission
    queue 25 ms: its CPU less its answers' h + i, per refusal). With a core's second going to
    A answers and L - A refusals, A = (1 - L r) / (h + i - r), so at any load past capacity
    the goodput ratio of a server at point p to one at point 0 is (h + i0 - r) / (h + ip - r):
    the dearer a refusal is against an answer's own work, the more a cheaper point gains."""
    manifest, payloads, y = load_inputs(args.model, args.images)
    costs = inference_cost(args.model, args.seconds)
    server = start(args.model, CONFIGS[0], args.target_ms, 4096)
    try:
        run_loop(closed_loop(server.url, payloads, y, args.outstanding, 1.0, 0.5))
        cpu, wall = cpu_seconds(server), time.perf_counter()
        r = run_loop(closed_loop(server.url, payloads, y, args.outstanding, args.seconds, 1.0))
        share = (cpu_seconds(server) - cpu) / (time.perf_counter() - wall)
    finally:
        server.close()
    per_answer = share / r["throughput"]
    rest = per_answer - costs[0]["inference_us"] / 1e6
    capacity = r["throughput"]
    server = start(args.model, CONFIGS[0], args.target_ms, max(8, int(capacity * 0.025)))
    try:
        run_loop(open_loop(server.url, payloads, y, capacity, 1.0, 0.5, args.target_ms / 1000, 0,
                           args.connections))
        cpu, wall = cpu_seconds(server), time.perf_counter()
        over = run_loop(open_loop(server.url, payloads, y, 2 * capacity, args.seconds, 0.0,
                                  args.target_ms / 1000, 1, args.connections))
        over_share = (cpu_seconds(server) - cpu) / (time.perf_counter() - wall)
    finally:
        server.close()
    refused_per_s = over["429"] / args.seconds
    refusal = max(0.0, over_share - over["throughput"] * per_answer) / max(refused_per_s, 1e-9)
    operating_points = load_manifest(args.model).operating_points
    floor = default_floor(operating_points)
    usable = len(LoadController(operating_points, args.target_ms).points)  # as the server does
    print(f"# operating points of {manifest['name']} ({manifest['preset']} on "
          f"{manifest['dataset']}); {machine()}")
    print(f"# saturated server (run-to-the-end, point 0): {capacity:.0f} answers/s at "
          f"{share * 100:.0f}% CPU = {per_answer * 1e6:.0f} us a request, of which inference "
          f"{costs[0]['inference_us']:.0f} us ({costs[0]['inference_us'] / per_answer / 1e4:.0f}%)"
          f" and the rest (HTTP, decoding, batcher) {rest * 1e6:.0f} us")
    print(f"# the same, offered 2x: {over['throughput']:.0f} answers/s and {refused_per_s:.0f} "
          f"429s/s at {over_share * 100:.0f}% CPU = {refusal * 1e6:.0f} us a refusal; default "
          f"floor {'-' if floor is None else f'{floor * 100:.2f}%'}")
    # the inference time per row a point needs for the 1.5x past capacity:
    # (h + i0 - r) / (h + i - r) >= 1.5
    needed = (per_answer - refusal) / 1.5 - (rest - refusal)
    print(f"# 1.5x past capacity needs a point at or under {needed * 1e6:.0f} us of inference a "
          f"row ({needed / (costs[0]['inference_us'] / 1e6):.2f} of point 0's); the test "
          "accuracy is what the sweep's accuracy measures (the same test images)")
    print("| point | val accuracy | accuracy lower bound | usable (default floor) | test accuracy | "
          "val compute | inference us/row | predicted capacity vs point 0 | predicted goodput vs "
          "point 0 past capacity (refusals counted) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in costs:
        dear, cheap = per_answer, rest + c["inference_us"] / 1e6
        bound, test = c["accuracy_lower_bound"], c["test_accuracy"]
        print(f"| {c['point']} | {c['expected_accuracy'] * 100:.2f}% | "
              f"{'-' if bound is None else f'{bound * 100:.2f}%'} | "
              f"{'yes' if c['point'] < usable else 'no'} | "
              f"{'-' if test is None else f'{test * 100:.2f}%'} | "
              f"{c['compute_fraction'] * 100:.1f}% | {c['inference_us']:.0f} | "
              f"{dear / cheap:.2f}x | {(dear - refusal) / (cheap - refusal):.2f}x |")
    return 0


def machine() -> str:
    import onnxruntime

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}")


def load_inputs(model: Path, count: int):
    manifest = json.loads((model / "manifest.json").read_text())
    x, y = test_images(manifest["dataset"])
    x, y = x[:count], y[:count]
    return manifest, bodies(x, "auto", "binary", manifest["name"]), y


def saturate(args: argparse.Namespace) -> int:
    manifest, payloads, y = load_inputs(args.model, args.images)
    queue_rows = 4096  # saturation: room for every outstanding request
    servers = {c: start(args.model, c, args.target_ms, queue_rows) for c in CONFIGS[:2]}
    if args.baseline_repo:  # the batcher before issue 14, from another checkout, as it was
        from bench import serve_load

        here, serve_load.REPO = serve_load.REPO, args.baseline_repo.resolve()
        try:
            servers["run-to-the-end, previous batcher"] = start(
                args.model, CONFIGS[0], args.target_ms, queue_rows)
        finally:
            serve_load.REPO = here
    runs: dict[str, list[dict]] = {c: [] for c in servers}
    try:
        for s in servers.values():  # warm-up
            run_loop(closed_loop(s.url, payloads, y, args.outstanding, 1.0, 0.5))
        for _ in range(args.repeats):
            for c, s in servers.items():
                cpu, wall = cpu_seconds(s), time.perf_counter()
                r = run_loop(closed_loop(s.url, payloads, y, args.outstanding, args.seconds, 1.0))
                r["server_cpu"] = (cpu_seconds(s) - cpu) / (time.perf_counter() - wall)
                runs[c].append(r)
    finally:
        for s in servers.values():
            s.close()
    print(f"# saturation, {manifest['name']} ({manifest['preset']} on {manifest['dataset']}), "
          f"{args.outstanding} requests outstanding, {args.seconds:g} s x {args.repeats} "
          f"interleaved repeats; {machine()}")
    print("| scheduler | images/s (median) | all runs | server CPU (median) | accuracy |")
    print("|---|---|---|---|---|")
    for c, r in runs.items():
        tput = [v["throughput"] for v in r]
        print(f"| {c} | {np.median(tput):.0f} | {', '.join(f'{v:.0f}' for v in tput)} | "
              f"{np.median([v['server_cpu'] for v in r]) * 100:.0f}% | "
              f"{np.mean([v['accuracy'] for v in r]) * 100:.2f}% |")
    return 0


def median_row(cells: list[dict]) -> dict:
    """One configuration at one load over its repeats: the median of each figure (refusals
    too), with every repeat's own figures kept under "repeats"."""
    keys = ("goodput", "throughput", "p50", "p99", "accuracy", "mean_exit_block", "429", "503",
            "no_connection", "client_cpu", "client_lag_p99", "server_cpu", "others_cpu")
    row = {k: float(np.median([c.get(k, math.nan) for c in cells])) for k in keys}
    other: dict[str, int] = {}
    for c in cells:
        for k, v in c["other"].items():
            other[k] = other.get(k, 0) + v
    row.update(offered=cells[0]["offered"], other=other,
               repeats=[{k: c.get(k, math.nan) for k in (*keys, "other")} for c in cells])
    return row


def measure_capacity(args: argparse.Namespace, payloads: list[Payload], y: np.ndarray) -> float:
    """Run-to-the-end at the calibrated point, closed loop (as `saturate`), median of three
    runs of --seconds: the capacity the sweep's loads are multiples of, measured in the same
    call, since this machine's speed drifts by up to 1.5x between calls minutes apart."""
    server = start(args.model, CONFIGS[0], args.target_ms, 4096)
    try:
        run_loop(closed_loop(server.url, payloads, y, 128, 1.0, 0.5))
        runs = [run_loop(closed_loop(server.url, payloads, y, 128, args.seconds, 0.5))
                for _ in range(3)]
    finally:
        server.close()
    each = [r["throughput"] for r in runs]
    capacity = float(np.median(each))
    print(f"# capacity: {capacity:.0f} images/s (runs: {', '.join(f'{v:.0f}' for v in each)})",
          file=sys.stderr, flush=True)
    return capacity


def sweep(args: argparse.Namespace) -> int:
    manifest, payloads, y = load_inputs(args.model, args.images)
    if not args.capacity:
        args.capacity = measure_capacity(args, payloads, y)
    # the admission queue holds what the server can answer in --queue-ms (default a quarter of
    # the target): past capacity the refusals take a share of the core and the machine's speed
    # drifts, so a fixed server answers well under its capacity and a queue of half the target
    # held 70-90 ms of its work (answers crowding the target: goodput swung 2x between repeats);
    # several values run every configuration at each, as configurations of their own
    queues = args.queue_ms or [args.target_ms / 4]
    configs = [c for c in CONFIGS if c in args.configs] if args.configs else list(CONFIGS)
    variants = [(c, q) for c in configs for q in queues]
    servers = {v: start(args.model, v[0], args.target_ms, queue_rows(args.capacity, v[1]),
                        args.queue_wait_ms) for v in variants}
    cells: dict[tuple[str, float, float], list[dict]] = {(c, q, load): [] for c, q in variants
                                                         for load in args.loads}
    try:
        for s in servers.values():  # warm-up
            run_loop(open_loop(s.url, payloads, y, args.capacity * 0.5, 1.0, 0.5,
                               args.target_ms / 1000, 0, args.connections))
        # repeats interleaved (A B C A B C): a slow spell of the machine hits every configuration
        for rep in range(args.repeats):
            for load in args.loads:
                for (config, q), s in servers.items():
                    cpu, busy, mine = cpu_seconds(s), machine_busy_seconds(), time.process_time()
                    wall = time.perf_counter()
                    r = run_loop(open_loop(s.url, payloads, y, args.capacity * load, args.seconds,
                                           args.warmup, args.target_ms / 1000,
                                           seed=int(load * 100) + 1000 * rep,
                                           connections=args.connections))
                    # over the whole cell (its warm-up too): how much of its core the server used,
                    # and how many cores everything else on the machine took meanwhile (other
                    # sessions' processes that /work/bin/quiet does not pause)
                    wall = time.perf_counter() - wall
                    server = cpu_seconds(s) - cpu
                    r["server_cpu"] = server / wall
                    r["others_cpu"] = max(0.0, machine_busy_seconds() - busy - server
                                          - (time.process_time() - mine)) / wall
                    cells[(config, q, load)].append(r)
                    print(f"# repeat {rep + 1}, {load:g}x, {label(config, q, queues)}: goodput "
                          f"{r['goodput']:.0f}/s, p50 {r['p50']:.1f} ms, accuracy "
                          f"{r['accuracy'] * 100:.2f}%, 429 {r['429']}, no connection "
                          f"{r['no_connection']}, client CPU {r['client_cpu'] * 100:.0f}%, "
                          f"server CPU {r['server_cpu'] * 100:.0f}%, "
                          f"other processes {r['others_cpu']:.2f} cores",
                          file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.close()
    rows = []
    for (config, q, load), runs in cells.items():
        r = median_row(runs)
        r.update(config=config, load=load, capacity=args.capacity, target_ms=args.target_ms,
                 floor=default_floor(load_manifest(args.model).operating_points),
                 queue_ms=q, queue_rows=queue_rows(args.capacity, q),
                 queue_wait_ms=args.queue_wait_ms, label=label(config, q, queues),
                 connections=args.connections, machine=machine(), model=manifest["name"],
                 seconds=args.seconds)
        rows.append(r)
    print(HEADER)
    for r in sorted(rows, key=row_order):
        print_row(r)
    print_ratios(cells, args.loads, queues)
    if args.results:
        path = Path(args.results)
        old = json.loads(path.read_text()) if path.is_file() else []
        new = {(r["config"], r["load"], r["queue_ms"]) for r in rows}
        keep = [o for o in old if (o["config"], o["load"], o.get("queue_ms")) not in new]
        path.write_text(json.dumps(keep + rows, indent=1) + "\n")
    return 0


def queue_rows(capacity: float, queue_ms: float) -> int:
    return max(8, int(capacity * queue_ms / 1000))


def label(config: str, queue_ms: float, queues: list[float]) -> str:
    return config if len(queues) == 1 else f"{config}, queue {queue_ms:g} ms"


def row_order(r: dict) -> tuple:
    return r["load"], CONFIGS.index(r["config"]), r.get("queue_ms") or 0


def print_ratios(cells: dict[tuple[str, float, float], list[dict]], loads: list[float],
                 queues: list[float]) -> None:
    """Adaptive goodput over fixed, paired by repeat: the configurations of one repeat ran
    back to back, so each pair saw the same state of the machine; the median of the paired
    ratios is what the target is checked with. 'best fixed' is, in each repeat, whichever fixed
    configuration (at whichever queue size) answered more within the target."""
    variants = sorted({(c, q) for c, q, _ in cells}, key=lambda v: (CONFIGS.index(v[0]), v[1]))
    fixed = [v for v in variants if v[0].endswith("fixed")]
    adaptive = [v for v in variants if v[0].endswith("adaptive")]
    if not fixed or not adaptive:
        return
    print("\n| load | adaptive | against | goodput ratio, median of paired repeats | each repeat |")
    print("|---|---|---|---|---|")
    for load in loads:
        for a in adaptive:
            good = [c["goodput"] for c in cells[(*a, load)]]
            against = {label(*f, queues): [c["goodput"] for c in cells[(*f, load)]]
                       for f in fixed}
            if len(fixed) > 1:
                against["best fixed"] = [max(v) for v in zip(*against.values(), strict=True)]
            for name, base in against.items():
                ratios = [g / b if b else math.inf for g, b in zip(good, base, strict=True)]
                print(f"| {load:g}x | {label(*a, queues)} | {name} | {np.median(ratios):.2f}x | "
                      f"{', '.join(f'{v:.2f}' for v in ratios)} |")


HEADER = ("| load | configuration | offered/s | goodput/s (median) | goodput/s, each repeat | "
          "answered/s | p50 ms | p99 ms | 429 | 503 | other | no free connection | accuracy | "
          "mean exit block | load generator CPU | generator lag p99 ms | server CPU | "
          "other processes, cores |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def print_row(r: dict, flush: bool = False) -> None:
    other = ", ".join(f"{k}: {v}" for k, v in r["other"].items()) or "0"
    each = ", ".join(f"{c['goodput']:.0f}" for c in r.get("repeats", [r]))
    print(f"| {r['load']:g}x | {r.get('label', r['config'])} | {r['offered']:.0f} | {r['goodput']:.0f} | {each} | "
          f"{r['throughput']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['429']:.0f} | "
          f"{r['503']:.0f} | {other} | {r.get('no_connection', math.nan):.0f} | "
          f"{r['accuracy'] * 100:.2f}% | {r['mean_exit_block']:.2f} | "
          f"{r.get('client_cpu', math.nan) * 100:.0f}% | {r.get('client_lag_p99', math.nan):.1f} | "
          f"{r.get('server_cpu', math.nan) * 100:.0f}% | {r.get('others_cpu', math.nan):.2f} |",
          flush=flush)


def plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(Path(args.results).read_text())
    first = rows[0]
    capacities = sorted({r["capacity"] for r in rows})
    capacity = (f"{capacities[0]:.0f}" if len(capacities) == 1 else
                f"{capacities[0]:.0f}-{capacities[-1]:.0f} (measured in each call)")
    queues = sorted({r["queue_rows"] for r in rows})
    print(f"# overload, {first['model']}, capacity {capacity} images/s (run-to-the-end at the "
          f"calibrated point), target {first['target_ms']:g} ms, admission queue "
          f"{'-'.join(str(q) for q in (queues[0], queues[-1]) if q)} rows; {first['machine']}")
    print(HEADER)
    for r in sorted(rows, key=row_order):
        print_row(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    styles = dict(zip(CONFIGS, ("o-", "s--", "^-", "v:"), strict=True))
    series = sorted({(r["config"], r.get("queue_ms") or 0, r.get("label", r["config"]))
                     for r in rows}, key=lambda v: (CONFIGS.index(v[0]), v[1]))
    for config, queue_ms, name in series:
        mine = sorted((r for r in rows if r["config"] == config
                       and (r.get("queue_ms") or 0) == queue_ms), key=lambda r: r["load"])
        loads = [r["load"] for r in mine]
        style = styles[config]
        # goodput as a multiple of the capacity measured in the same call: the machine's speed
        # drifts between calls, and each row's load is a multiple of its own call's capacity
        for ax, key, scale in ((ax1, "goodput", None), (ax2, "accuracy", 100)):
            mid = np.array([r[key] * (scale or 1 / r["capacity"]) for r in mine])
            each = [[c[key] * (scale or 1 / r["capacity"]) for c in r.get("repeats", [r])]
                    for r in mine]
            spread = [mid - [min(e) for e in each], [max(e) for e in each] - mid]
            ax.errorbar(loads, mid, yerr=spread, fmt=style, capsize=3, label=name)
    ax1.set_xlabel("offered load (x capacity)")
    ax1.set_ylabel(f"goodput (answers within {first['target_ms']:g} ms per s)\n"
                   "x capacity, median and range")
    if first.get("floor") is not None:
        ax2.axhline(first["floor"] * 100, color="grey", linestyle=":", label="floor (default)")
    ax2.set_xlabel("offered load (x capacity)")
    ax2.set_ylabel("accuracy of the answers (%)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{first['model']}: open-loop Poisson arrivals, capacity {capacity} images/s")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("saturate", "sweep", "points"):
        s = sub.add_parser(name)
        s.add_argument("--model", type=Path, default=REPO / "models/digits32-24")
        s.add_argument("--target-ms", type=float, default=100.0)
        s.add_argument("--seconds", type=float, default=6.0)
        s.add_argument("--images", type=int, default=2000, help="test images cycled through")
    for name in ("saturate", "points"):
        sub.choices[name].add_argument("--outstanding", type=int, default=128)
    sub.choices["points"].add_argument("--connections", type=int, default=1024,
                                       help="the generator's pool for the 2x run (see sweep)")
    sat = sub.choices["saturate"]
    sat.add_argument("--repeats", type=int, default=3)
    sat.add_argument("--baseline-repo", type=Path, default=None,
                     help="a checkout of the code before issue 14 (git worktree add DIR da15f04): "
                          "its run-to-the-end batcher runs beside the two")
    sw = sub.choices["sweep"]
    sw.add_argument("--capacity", type=float, default=0,
                    help="images/s from `saturate`; 0 (default): measured first, in this call")
    sw.add_argument("--loads", type=float, nargs="+", default=[0.5, 1, 1.5, 2, 3])
    sw.add_argument("--configs", nargs="*", default=None, help=f"a subset of {CONFIGS}")
    sw.add_argument("--warmup", type=float, default=2.0)
    sw.add_argument("--queue-ms", type=float, nargs="+", default=None,
                    help="admission queue (HFF_QUEUE_BOUND) as this many ms of --capacity "
                         "(default: a quarter of the target); several values run every "
                         "configuration at each")
    sw.add_argument("--queue-wait-ms", type=float, default=0.0,
                    help="HFF_QUEUE_WAIT_S in ms: how long a request past the queue bound waits "
                         "for room before 429 (default 0: open-loop arrivals past capacity gain "
                         "nothing by waiting, and 0 refuses on the hot path)")
    sw.add_argument("--connections", type=int, default=512,
                    help="keep-alive connections the generator sends over; an arrival that finds "
                         "none free is not sent and counts under 'no free connection'")
    sw.add_argument("--repeats", type=int, default=3,
                    help="interleaved repeats of every cell; the table shows their median")
    sw.add_argument("--results", default=None, help="JSON file the rows are merged into")
    pl = sub.add_parser("plot")
    pl.add_argument("--results", required=True)
    pl.add_argument("--out", default=str(REPO / "docs/overload.png"))
    args = p.parse_args()
    if getattr(args, "model", None) is not None:
        args.model = args.model.resolve()  # servers may run from another checkout's dir
    return {"saturate": saturate, "sweep": sweep, "points": points,
            "plot": plot}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
