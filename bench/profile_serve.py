"""Where one request's time goes: py-spy samples hff-serve (all threads) under wrk load.

    python bench/profile_serve.py --digits models/digits [--source /tmp/base] [--svg docs/x.svg]
    python bench/profile_serve.py --cifar models/cifar-random   # KServe binary, early exit off

Starts the server (from this checkout, or from --source to profile another design), loads it with
wrk (64 connections, one JSON instance per POST /predict; with --cifar one cifar-cnn image per
KServe binary infer request, early exit off), records 10 s with py-spy (--svg: another 10 s as a
flame graph), and prints the share of the server's busy samples in each layer of the request path.
A sample counts for the innermost layer on its stack, so the shares add up to 100%; idle samples
(threads waiting) are left out of the table. Below it, per thread: the share of the recording the inference thread spent
in onnxruntime (the rest the model waited between batches), and the cores each thread of the
server used meanwhile (/proc; onnxruntime's pool threads included).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from peers import json_payload, kserve_binary_payload, wrk_load  # noqa: E402 - bench/ scripts
from serve_load import REPO, Server, thread_cpu  # noqa: E402

# (layer, substrings of a frame "function (file:line)"), innermost match wins; checked in order.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("onnxruntime (session.run)", ("onnxruntime/capi",)),
    ("prometheus metrics", ("prometheus_client/",)),
    ("pydantic validation", ("pydantic/", "pydantic_core/", "model_validate")),
    ("JSON encode/decode", ("json/", "orjson", "render (starlette/responses")),
    ("query-string parsing", ("urllib/parse", "QueryParams", "parse_qsl")),
    ("FastAPI dependency solving", ("fastapi/dependencies/",)),
    ("FastAPI/Starlette routing, middleware, responses", ("fastapi/", "starlette/")),
    ("request decoding (app/decoding.py)", ("app/decoding.py",)),
    ("batcher (app/batcher.py)", ("app/batcher.py",)),
    ("service: predictions, early-exit mode (app/service.py)", ("app/service.py",)),
    ("socket writes (app/http.py, one per response)", ("app/http.py",)),
    ("protections (app/guard.py, app/protocol.py, app/admission.py)",
     ("app/guard.py", "app/protocol.py", "app/admission.py")),
    ("hot path and routes (app/hotpath.py, app/middleware.py, app/routes, app/deps.py)",
     ("app/hotpath.py", "app/middleware.py", "app/routes/", "app/deps.py")),
    ("uvicorn HTTP protocol (httptools callbacks)", ("uvicorn/",)),
    ("granian (ASGI bridge)", ("granian/",)),
    ("numpy", ("numpy/",)),
    ("asyncio / uvloop event loop", ("asyncio/", "uvloop", "threading.py", "concurrent/")),
]


RATE = 200  # py-spy samples a second


def layer_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for name, needles in LAYERS:
            if any(n in frame for n in needles):
                return name
    return "other"


def samples(raw: Path) -> list[tuple[str, str, int]]:
    """(thread, stack without the process and thread frames, count) per line of a raw
    --threads recording."""
    out = []
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = next((f for f in frames[:2] if f.startswith("thread (")), "thread (?)")
        out.append((thread, ";".join(f for f in frames if not f.startswith(("thread (", "process "))),
                    int(n)))
    return out


def breakdown(raw: Path) -> dict[str, float]:
    counts: collections.Counter[str] = collections.Counter()
    for _, stack, n in samples(raw):
        counts[layer_of(stack)] += n
    total = sum(counts.values())
    return {k: v / total for k, v in counts.most_common()}


def top_functions(raw: Path, n: int) -> list[tuple[str, float]]:
    """The n innermost frames (self time) with the most busy samples."""
    counts: collections.Counter[str] = collections.Counter()
    for _, stack, k in samples(raw):
        counts[stack.split(";")[-1]] += k
    total = sum(counts.values())
    return [(frame, c / total) for frame, c in counts.most_common(n)]


def inference_in_onnxruntime(raw: Path, ticks: float) -> dict[str, float]:
    """Per inference thread, the share of the recording's sampling ticks it spent in
    onnxruntime: the rest it waited between batches (py-spy leaves idle threads out, so the
    thread's busy samples over all ticks)."""
    counts: collections.Counter[str] = collections.Counter()
    for thread, stack, n in samples(raw):
        if "onnxruntime/capi" in stack and "app/batcher.py" in stack:
            counts[thread.partition("): ")[2]] += n
    return {name: n / ticks for name, n in sorted(counts.items())}


def thread_names(raw: Path) -> dict[int, str]:
    """Thread id -> Python thread name, from the recording's "thread (<tid>): <name>" frames."""
    names = {}
    for thread, _, _ in samples(raw):
        tid, _, name = thread.removeprefix("thread (").partition("): ")
        if tid.isdigit():
            names[int(tid)] = name
    return names


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits", type=Path, default=REPO / "models/digits")
    p.add_argument("--cifar", type=Path, default=None,
                   help="profile this cifar-cnn model dir under KServe binary load (early exit "
                        "off) instead of digits under JSON")
    p.add_argument("--source", type=Path, default=REPO, help="the checkout to run hff-serve from")
    p.add_argument("--server", default="uvicorn", help="HFF_SERVER (uvicorn or granian)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--svg", type=Path, default=None, help="also write the flame graph here")
    p.add_argument("--top", type=int, default=0, help="also list the N functions with most self samples")
    p.add_argument("--raw", type=Path, default=None, help="also keep py-spy's raw stacks here")
    args = p.parse_args()
    from training.data import load_dataset

    if args.cifar is not None:
        manifest = json.loads((args.cifar / "manifest.json").read_text())
        image = np.random.default_rng(0).random(manifest["input"]["shape"], dtype=np.float32)
        payload = kserve_binary_payload(manifest["name"], image, early_exit="off")
    else:
        payload = json_payload("/predict", load_dataset("digits").test.tensors[0][0].numpy())
    settings = {"server": args.server} if args.server != "uvicorn" else {}
    model_dir = args.cifar if args.cifar is not None else args.digits
    server = Server(model_dir.resolve(), source=args.source.resolve(), **settings)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            wrk_load(server.url, payload, 64, 2, work)  # warm-up
            (work / "payload.json").write_text(json.dumps(
                [payload.path, payload.headers, payload.body.decode("latin-1")]))
            load = subprocess.Popen([sys.executable, "-c", (
                "import json, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path;"
                "from peers import wrk_load; from serve_load import Payload;"
                "path, headers, body = json.loads(Path(sys.argv[4], 'payload.json').read_text());"
                "p = Payload(path, headers, body.encode('latin-1'));"
                "r = wrk_load(sys.argv[2], p, 64, float(sys.argv[3]), Path(sys.argv[4]));"
                "print(round(r['throughput']))"),
                str(BENCH), server.url, str(args.seconds * (2 if args.svg else 1) + 4), str(work)],
                cwd=REPO, stdout=subprocess.PIPE, text=True)
            time.sleep(2)
            raw = work / "stacks.txt"
            record = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.proc.pid), "--duration",
                      f"{args.seconds:g}", "--rate", str(RATE), "--nonblocking", "--subprocesses",
                      "--threads", "--format", "raw",
                      "--output", str(raw)]
            cpu_before, t_before = thread_cpu(server.proc.pid), time.perf_counter()
            subprocess.run(record, check=True, capture_output=True)
            cpu_after, wall = thread_cpu(server.proc.pid), time.perf_counter() - t_before
            if args.svg is not None:  # a second recording under the same load, as SVG
                subprocess.run([*record[:-4], "--format", "flamegraph", "--output", str(args.svg)],
                               check=True, capture_output=True)
            rps = load.communicate()[0].strip()
            if args.raw is not None:
                args.raw.write_text(raw.read_text())
            shares = breakdown(raw)
            top = top_functions(raw, args.top)
            in_ort = inference_in_onnxruntime(raw, args.seconds * RATE)
            names = thread_names(raw)
            cores: collections.Counter[str] = collections.Counter()
            for tid, seconds in cpu_after.items():  # threads py-spy never saw: onnxruntime's pool
                cores[names.get(tid, "other threads (onnxruntime's pool)")] += (
                    seconds - cpu_before.get(tid, 0.0)) / wall
    finally:
        server.close()
    what = "KServe binary, cifar-cnn" if args.cifar is not None else "JSON /predict, digits"
    print(f"# {' '.join(sys.argv)}: {rps} requests/s under the profiler (64 connections, "
          f"{what})")
    print("| layer | share of busy samples |")
    print("|---|---|")
    for name, share in shares.items():
        print(f"| {name} | {share:.1%} |")
    for frame, share in top:
        print(f"# {share:6.1%} self  {frame}")
    for name, share in in_ort.items():
        print(f"# inference thread {name}: in onnxruntime {share:.1%} of the recording")
    print("# cores each thread used (CPU seconds / wall seconds, /proc): " + ", ".join(f"{name} {c:.2f}" for name, c in
                                            cores.most_common() if c >= 0.005))
    return 0


if __name__ == "__main__":
    sys.exit(main())
