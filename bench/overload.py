"""Overload: open-loop Poisson arrivals past capacity, run-to-the-end vs stage-level vs adaptive.

Usage (cifar-cnn trained on digits32: `make models/digits32/manifest.json`):
    python bench/overload.py saturate --model models/digits32            # capacity, both schedulers
    python bench/overload.py points --model models/digits32    # what each operating point can buy
    python bench/overload.py sweep --model models/digits32 --capacity 900 \\
        --loads 0.5 1 1.5 2 3 --results docs/overload.json           # appends rows, prints them
    python bench/overload.py plot --results docs/overload.json --out docs/overload.png

Four server configurations, the same in everything else (one onnxruntime thread, max batch 64,
the admission queue sized to the latency target so that no configuration queues for seconds:
capacity x half the target in rows (--queue-ms), a request that finds it full refused at once
(--queue-wait-ms 0: open-loop arrivals gain nothing by waiting, and 0 refuses on the hot path),
and HFF_MAX_INSTANCES 1, since every request carries one image):
  run-to-the-end, fixed   HFF_SCHEDULING=batch, the calibrated thresholds
  stage-level, fixed      HFF_SCHEDULING=stage, the calibrated thresholds
  stage-level, adaptive   HFF_SCHEDULING=stage, HFF_LATENCY_TARGET_MS=<target> (default floor)
  run-to-the-end, adaptive  HFF_SCHEDULING=batch (the default) with the same controller
`saturate` measures capacity: closed-loop clients that keep 128 requests outstanding, both
schedulers at the calibrated point, interleaved repeats, with test accuracy. `sweep` offers
Poisson arrivals at multiples of that capacity (one labelled test image per request, KServe v2
binary tensors) for `--seconds` after a warm-up, over a pool of `--connections` keep-alive
connections opened beforehand (an arrival that finds none free is not sent and is counted as
"no free connection"); latency counts from each request's scheduled arrival, so a client that
falls behind shows as latency, not as a lighter load, and each cell reports the generator's CPU
share and how late it sent. Goodput is the answers (200) within the target per second. Every
cell is repeated (`--repeats`), the configurations interleaved (A B C D A B C D), and the table
shows each figure's median and every repeat's goodput; `points` measures, per operating point,
the inference time per row and the capacity it predicts. Every server runs on CPU 0 and the
load generator on CPU 1 where the machine has two.
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

from app.controller import default_floor  # noqa: E402 - after the path set-up
from bench.serve_load import (  # noqa: E402 - after the path set-up, as serve_load does
    Payload,
    RawConnection,
    Server,
    bodies,
    first_answer,
    run_loop,
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
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
                    "inference_us": asyncio.run(measure(thresholds)) * 1e6})
    return out


def points(args: argparse.Namespace) -> int:
    """What a cheaper operating point can buy: a server answers about 1 / (h + i) requests a
    second, h the CPU time of everything but inference per request (HTTP, decoding, the
    batcher: measured as the saturated server's CPU per answer minus i at point 0) and i the
    inference time per row at the point; the ratio of those capacities is the most an
    adaptive server can gain over a fixed one that holds its own capacity past overload."""
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
    per_answer = share / r["throughput"] * 1e6
    rest = per_answer - costs[0]["inference_us"]
    print(f"# operating points of {manifest['name']} ({manifest['preset']} on "
          f"{manifest['dataset']}); {machine()}")
    print(f"# saturated server (run-to-the-end, point 0): {r['throughput']:.0f} answers/s at "
          f"{share * 100:.0f}% CPU = {per_answer:.0f} us a request, of which inference "
          f"{costs[0]['inference_us']:.0f} us ({costs[0]['inference_us'] / per_answer * 100:.0f}%) "
          f"and the rest (HTTP, decoding, batcher) {rest:.0f} us")
    print("| point | val accuracy | accuracy lower bound | val compute | inference us/row | "
          "predicted capacity vs point 0 |")
    print("|---|---|---|---|---|---|")
    for c in costs:
        ratio = (rest + costs[0]["inference_us"]) / (rest + c["inference_us"])
        bound = c["accuracy_lower_bound"]
        print(f"| {c['point']} | {c['expected_accuracy'] * 100:.2f}% | "
              f"{'-' if bound is None else f'{bound * 100:.2f}%'} | "
              f"{c['compute_fraction'] * 100:.1f}% | {c['inference_us']:.0f} | {ratio:.2f}x |")
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
            "no_connection", "client_cpu", "client_lag_p99")
    row = {k: float(np.median([c[k] for c in cells])) for k in keys}
    other: dict[str, int] = {}
    for c in cells:
        for k, v in c["other"].items():
            other[k] = other.get(k, 0) + v
    row.update(offered=cells[0]["offered"], other=other,
               repeats=[{k: c[k] for k in (*keys, "other")} for c in cells])
    return row


def sweep(args: argparse.Namespace) -> int:
    manifest, payloads, y = load_inputs(args.model, args.images)
    # the admission queue holds what the server can answer in --queue-ms (half the target)
    queue_rows = max(8, int(args.capacity * (args.queue_ms or args.target_ms / 2) / 1000))
    configs = [c for c in CONFIGS if c in args.configs] if args.configs else list(CONFIGS)
    servers = {c: start(args.model, c, args.target_ms, queue_rows, args.queue_wait_ms)
               for c in configs}
    cells: dict[tuple[str, float], list[dict]] = {(c, load): [] for c in configs
                                                  for load in args.loads}
    try:
        for s in servers.values():  # warm-up
            run_loop(open_loop(s.url, payloads, y, args.capacity * 0.5, 1.0, 0.5,
                               args.target_ms / 1000, 0, args.connections))
        # repeats interleaved (A B C A B C): a slow spell of the machine hits every configuration
        for rep in range(args.repeats):
            for load in args.loads:
                for config, s in servers.items():
                    r = run_loop(open_loop(s.url, payloads, y, args.capacity * load, args.seconds,
                                           args.warmup, args.target_ms / 1000,
                                           seed=int(load * 100) + 1000 * rep,
                                           connections=args.connections))
                    cells[(config, load)].append(r)
                    print(f"# repeat {rep + 1}, {load:g}x, {config}: goodput {r['goodput']:.0f}/s,"
                          f" p50 {r['p50']:.1f} ms, accuracy {r['accuracy'] * 100:.2f}%, 429 {r['429']}, "
                          f"no connection {r['no_connection']}, client CPU {r['client_cpu'] * 100:.0f}%",
                          file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.close()
    rows = []
    for (config, load), runs in cells.items():
        r = median_row(runs)
        r.update(config=config, load=load, capacity=args.capacity, target_ms=args.target_ms,
                 floor=default_floor(load_manifest(args.model).operating_points),
                 queue_rows=queue_rows, queue_wait_ms=args.queue_wait_ms,
                 connections=args.connections, machine=machine(), model=manifest["name"],
                 seconds=args.seconds)
        rows.append(r)
    print(HEADER)
    for r in sorted(rows, key=lambda r: (r["load"], CONFIGS.index(r["config"]))):
        print_row(r)
    if args.results:
        path = Path(args.results)
        old = json.loads(path.read_text()) if path.is_file() else []
        keep = [o for o in old if (o["config"], o["load"]) not in {(r["config"], r["load"])
                                                                     for r in rows}]
        path.write_text(json.dumps(keep + rows, indent=1) + "\n")
    return 0


HEADER = ("| load | configuration | offered/s | goodput/s (median) | goodput/s, each repeat | "
          "answered/s | p50 ms | p99 ms | 429 | 503 | other | no free connection | accuracy | "
          "mean exit block | load generator CPU | generator lag p99 ms |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def print_row(r: dict, flush: bool = False) -> None:
    other = ", ".join(f"{k}: {v}" for k, v in r["other"].items()) or "0"
    each = ", ".join(f"{c['goodput']:.0f}" for c in r.get("repeats", [r]))
    print(f"| {r['load']:g}x | {r['config']} | {r['offered']:.0f} | {r['goodput']:.0f} | {each} | "
          f"{r['throughput']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['429']:.0f} | "
          f"{r['503']:.0f} | {other} | {r.get('no_connection', math.nan):.0f} | "
          f"{r['accuracy'] * 100:.2f}% | {r['mean_exit_block']:.2f} | "
          f"{r.get('client_cpu', math.nan) * 100:.0f}% | {r.get('client_lag_p99', math.nan):.1f} |",
          flush=flush)


def plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(Path(args.results).read_text())
    first = rows[0]
    print(f"# overload, {first['model']}, capacity {first['capacity']:g} images/s (run-to-the-end "
          f"at the calibrated point), target {first['target_ms']:g} ms, admission queue "
          f"{first['queue_rows']} rows; {first['machine']}")
    print(HEADER)
    for r in sorted(rows, key=lambda r: (r["load"], CONFIGS.index(r["config"]))):
        print_row(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for config, style in zip(CONFIGS, ("o-", "s--", "^-", "v:"), strict=True):
        mine = sorted((r for r in rows if r["config"] == config), key=lambda r: r["load"])
        if not mine:
            continue
        loads = [r["load"] for r in mine]
        for ax, key, scale in ((ax1, "goodput", 1), (ax2, "accuracy", 100)):
            mid = np.array([r[key] * scale for r in mine])
            each = [[c[key] * scale for c in r.get("repeats", [r])] for r in mine]
            spread = [mid - [min(e) for e in each], [max(e) for e in each] - mid]
            ax.errorbar(loads, mid, yerr=spread, fmt=style, capsize=3, label=config)
    ax1.set_xlabel("offered load (x capacity)")
    ax1.set_ylabel(f"goodput (answers within {first['target_ms']:g} ms per s),\nmedian and range")
    if first.get("floor") is not None:
        ax2.axhline(first["floor"] * 100, color="grey", linestyle=":", label="floor (default)")
    ax2.set_xlabel("offered load (x capacity)")
    ax2.set_ylabel("accuracy of the answers (%)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{first['model']}: open-loop Poisson arrivals, capacity "
                 f"{first['capacity']:g} images/s")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("saturate", "sweep", "points"):
        s = sub.add_parser(name)
        s.add_argument("--model", type=Path, default=REPO / "models/digits32")
        s.add_argument("--target-ms", type=float, default=100.0)
        s.add_argument("--seconds", type=float, default=6.0)
        s.add_argument("--images", type=int, default=2000, help="test images cycled through")
    for name in ("saturate", "points"):
        sub.choices[name].add_argument("--outstanding", type=int, default=128)
    sat = sub.choices["saturate"]
    sat.add_argument("--repeats", type=int, default=3)
    sat.add_argument("--baseline-repo", type=Path, default=None,
                     help="a checkout of the code before issue 14 (git worktree add DIR da15f04): "
                          "its run-to-the-end batcher runs beside the two")
    sw = sub.choices["sweep"]
    sw.add_argument("--capacity", type=float, required=True, help="images/s from `saturate`")
    sw.add_argument("--loads", type=float, nargs="+", default=[0.5, 1, 1.5, 2, 3])
    sw.add_argument("--configs", nargs="*", default=None, help=f"a subset of {CONFIGS}")
    sw.add_argument("--warmup", type=float, default=2.0)
    sw.add_argument("--queue-ms", type=float, default=None,
                    help="admission queue (HFF_QUEUE_BOUND) as this many ms of --capacity "
                         "(default: half the target)")
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
