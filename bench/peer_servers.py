"""The peer servers bench/peers.py compares hff-serve with, each serving the same model.onnx.

    python bench/peer_servers.py mosec    MODEL_DIR PORT
    python bench/peer_servers.py litserve MODEL_DIR PORT

Both take the body hff-serve's /predict takes ({"instances": [...]}, one or more instances), run
the whole graph (model.onnx) on a dynamic batch of up to 64 instances gathered for up to 2 ms, and
answer {"predictions": [{"label", "confidence"}, ...]}. Each gets its best honest setting, measured
side by side with `bench/peers.py --servers hff mosec` (or `litserve`) at 64 connections, the
settings changed through the environment (PEER_WORKERS: inference worker processes):
- mosec: one worker process (the Rust front end parses HTTP and batches on every core), orjson for
  decode and encode. PEER_WORKERS=2 gave 12,900-15,600 requests/s against 18,200-19,900 for one
  worker in three alternating pairs of runs: two workers split each batch and both compete
  with the front end for the two cores.
- LitServe: its ZeroMQ queue (`fast_queue`), one inference worker and one API server process
  per usable core (PEER_API_SERVERS overrides). One API server gave 976-1,283 requests/s against
  1,760-2,070 for two in three alternating pairs; three and four were level with two
  (1,959-2,219). Two inference workers (PEER_WORKERS=2, with two API servers): 1,657-1,976
  against 1,959-2,161 for one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import litserve as ls
import numpy as np
import orjson
from mosec import Server, Worker

MAX_BATCH = 64
MAX_WAIT_MS = 2


class Model:
    """model.onnx in onnxruntime with the options hff-serve's runtime uses (no spinning threads)."""

    def __init__(self, model_dir: Path):
        import onnxruntime as ort

        manifest = json.loads((model_dir / "manifest.json").read_text())
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_dir / manifest["full_graph"]), options,
                                            providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[-1].name  # the last block's probabilities
        self.shape = tuple(manifest["input"]["shape"])  # (C, H, W)

    def rows(self, body: dict) -> np.ndarray:
        """One request's instances -> (n, C, H, W) float32."""
        return np.asarray(body["instances"], dtype=np.float32).reshape(-1, *self.shape)

    def predict(self, x: np.ndarray) -> list[dict]:
        probs = self.session.run([self.output], {"input": x})[0]  # (N, num_classes)
        labels = probs.argmax(axis=1)
        return [{"label": int(k), "confidence": float(p[k])} for k, p in zip(labels, probs, strict=True)]


class MosecInference(Worker):
    """mosec's worker process: whole batches in, one answer per request out."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Model(Path(os.environ["PEER_MODEL_DIR"]))

    def deserialize(self, data: bytes) -> np.ndarray:
        return self.model.rows(orjson.loads(data))

    def serialize(self, data: list[dict]) -> bytes:
        return orjson.dumps({"predictions": data})

    def forward(self, data: list[np.ndarray]) -> list[list[dict]]:
        return split(self.model.predict(np.concatenate(data)), [len(x) for x in data])


class LitServeAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = Model(Path(os.environ["PEER_MODEL_DIR"]))

    def decode_request(self, request: dict) -> np.ndarray:
        return self.model.rows(request)

    def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        return np.concatenate(inputs), [len(x) for x in inputs]

    def predict(self, batch: tuple[np.ndarray, list[int]]) -> list[list[dict]]:
        x, sizes = batch
        return split(self.model.predict(x), sizes)

    def unbatch(self, output: list[list[dict]]) -> list[list[dict]]:
        return output

    def encode_response(self, output: list[dict]) -> dict:
        return {"predictions": output}


def split(preds: list[dict], sizes: list[int]) -> list[list[dict]]:
    """A batch's answers back into one list per request."""
    out, start = [], 0
    for n in sizes:
        out.append(preds[start:start + n])
        start += n
    return out


def serve_mosec(port: int) -> None:
    sys.argv = [sys.argv[0], "--port", str(port), "--address", "127.0.0.1", "--log-level",
                "warning"]
    server = Server()
    workers = int(os.environ.get("PEER_WORKERS", "1"))
    server.append_worker(MosecInference, num=workers, max_batch_size=MAX_BATCH,
                         max_wait_time=MAX_WAIT_MS)
    server.run()


def serve_litserve(port: int) -> None:
    workers = int(os.environ.get("PEER_WORKERS", "1"))
    server = ls.LitServer(LitServeAPI(max_batch_size=MAX_BATCH, batch_timeout=MAX_WAIT_MS / 1000),
                          accelerator="cpu", workers_per_device=workers, fast_queue=True)
    api_servers = int(os.environ.get("PEER_API_SERVERS", len(os.sched_getaffinity(0))))
    server.run(host="127.0.0.1", port=port, num_api_servers=api_servers, log_level="warning",
               generate_client_file=False)


if __name__ == "__main__":
    kind, model_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ["PEER_MODEL_DIR"] = model_dir  # the worker processes (spawned) read it
    {"mosec": serve_mosec, "litserve": serve_litserve}[kind](port)
