"""Where one request's time goes: py-spy samples hff-serve (all threads) under wrk load.

    python bench/profile_serve.py --digits models/digits [--source /tmp/base] [--svg docs/x.svg]

Starts the server (from this checkout, or from --source to profile another design), loads it with
wrk (64 connections, one JSON instance per POST /predict), records 10 s with py-spy (--svg:
another 10 s as a flame graph), and prints the
share of the server's busy samples in each layer of the request path. A sample counts for the
innermost layer on its stack, so the shares add up to 100%; idle samples (threads waiting) are
left out.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from peers import json_payload, wrk_load  # noqa: E402 - bench/ is a folder of scripts
from serve_load import REPO, Server  # noqa: E402

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


def layer_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for name, needles in LAYERS:
            if any(n in frame for n in needles):
                return name
    return "other"


def breakdown(raw: Path) -> dict[str, float]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[layer_of(stack)] += int(n)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.most_common()}


def top_functions(raw: Path, n: int) -> list[tuple[str, float]]:
    """The n innermost frames (self time) with the most samples."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, k = line.rpartition(" ")
        if stack:
            counts[stack.split(";")[-1]] += int(k)
    total = sum(counts.values())
    return [(frame, c / total) for frame, c in counts.most_common(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits", type=Path, default=REPO / "models/digits")
    p.add_argument("--source", type=Path, default=REPO, help="the checkout to run hff-serve from")
    p.add_argument("--server", default="uvicorn", help="HFF_SERVER (uvicorn or granian)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--svg", type=Path, default=None, help="also write the flame graph here")
    p.add_argument("--top", type=int, default=0, help="also list the N functions with most self samples")
    p.add_argument("--raw", type=Path, default=None, help="also keep py-spy's raw stacks here")
    args = p.parse_args()
    from training.data import load_dataset

    image = load_dataset("digits").test.tensors[0][0].numpy()
    payload = json_payload("/predict", image)
    settings = {"server": args.server} if args.server != "uvicorn" else {}
    server = Server(args.digits.resolve(), source=args.source.resolve(), **settings)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            wrk_load(server.url, payload, 64, 2, work)  # warm-up
            load = subprocess.Popen([sys.executable, "-c", (
                "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path;"
                "from peers import wrk_load, json_payload;"
                "import numpy as np; from training.data import load_dataset;"
                "img = load_dataset('digits').test.tensors[0][0].numpy();"
                "r = wrk_load(sys.argv[2], json_payload('/predict', img), 64, float(sys.argv[3]),"
                " Path(sys.argv[4])); print(round(r['throughput']))"),
                str(BENCH), server.url, str(args.seconds * (2 if args.svg else 1) + 4), str(work)],
                cwd=REPO, stdout=subprocess.PIPE, text=True)
            time.sleep(2)
            raw = work / "stacks.txt"
            record = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.proc.pid), "--duration",
                      f"{args.seconds:g}", "--rate", "200", "--nonblocking", "--subprocesses",
                      "--format", "raw",
                      "--output", str(raw)]
            subprocess.run(record, check=True, capture_output=True)
            if args.svg is not None:  # a second recording under the same load, as SVG
                subprocess.run([*record[:-4], "--format", "flamegraph", "--output", str(args.svg)],
                               check=True, capture_output=True)
            rps = load.communicate()[0].strip()
            if args.raw is not None:
                args.raw.write_text(raw.read_text())
            shares = breakdown(raw)
            top = top_functions(raw, args.top)
    finally:
        server.close()
    print(f"# {' '.join(sys.argv)}: {rps} requests/s under the profiler (64 connections)")
    print("| layer | share of busy samples |")
    print("|---|---|")
    for name, share in shares.items():
        print(f"| {name} | {share:.1%} |")
    for frame, share in top:
        print(f"# {share:6.1%} self  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
