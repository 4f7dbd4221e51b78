"""onnxruntime sessions for one model dir: the full graph and one session per stage graph.

CPU is the tested path. On CUDA, stage features stay on the device between stages through
IOBinding as long as every row of a batch survives; when rows exit, the survivors are compacted on
the host and uploaded again (the stage graphs take no row-index input to gather with), and batch
sizes are padded to power-of-two buckets so that cuDNN's per-shape search runs only at warm-up.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from contract.model_dir import (
    GRAPH_INPUT,
    STAGE_FEATURES,
    STAGE_OUTPUTS,
    STAGE_PROBS,
    Manifest,
    ModelDirError,
    full_graph_outputs,
    load_manifest,
)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def available_cores() -> int:
    """Cores this process may run on (cgroup/taskset aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_providers(device: str) -> list[str]:
    """Execution providers for `device` ('auto', 'cpu', 'cuda'), CPU always last as the fallback."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        log.warning("device cuda was asked for, but this onnxruntime offers only %s (install the "
                    "serve-gpu extra, onnxruntime-gpu): serving on the CPU", ", ".join(available))
    return [CPU]


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below `max_batch`, then `max_batch`: the batch sizes warm-up runs."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


@dataclass
class StageOutput:
    features: Any  # np.ndarray (rows, *feature_shape), or an OrtValue on the device
    probs: np.ndarray  # (rows, num_classes) float32, on the host


class ModelRuntime:
    """Loads a model dir and runs it; not thread-safe by itself (the batcher uses one thread)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", threads: int = 0,
                 max_batch_size: int = 64, spinning: bool = False, concurrent_calls: int = 1):
        self.model_dir = Path(model_dir)
        self.manifest: Manifest = load_manifest(self.model_dir)
        self.threads = threads or available_cores()
        self.max_batch_size = max_batch_size
        providers = choose_providers(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1  # graphs run one at a time: never oversubscribe the cores
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads must not spin: the event loop needs those cores between calls
        # (`spinning` is for bench/serve_load.py's in-process ceiling, which has no loop).
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if spinning else "0")
        self.full = self._session(self.manifest.full_graph, options, providers)
        self.stages = [self._session(s.file, options, providers) for s in self.manifest.stages]
        self.providers = self.full.get_providers()
        self.on_cuda = self.providers[0] == CUDA
        # whole-graph calls that run beside others (app.batcher) share the cores out: a second
        # session of model.onnx with threads // concurrent_calls threads (CPU only)
        self.concurrent_calls = 1 if self.on_cuda else max(1, min(concurrent_calls, self.threads))
        self.full_shared = self.full
        if self.concurrent_calls > 1:
            options.intra_op_num_threads = max(1, self.threads // self.concurrent_calls)
            self.full_shared = self._session(self.manifest.full_graph, options, providers)
        if CUDA in providers and not self.on_cuda:
            log.warning("onnxruntime could not start the CUDA provider (no GPU?): serving on the CPU")
        self.device = "cuda" if self.on_cuda else "cpu"
        self.full_outputs = [o.name for o in self.full.get_outputs()]
        expected = full_graph_outputs(self.manifest.num_blocks)
        if self.full_outputs != expected:
            raise ModelDirError(f"{self.model_dir / self.manifest.full_graph} has outputs "
                                f"{self.full_outputs}, the manifest implies {expected}")
        self._check_graphs()
        log.info("loaded %s version %s from %s: %d blocks, %d stage graphs, providers %s, "
                 "%d intra-op threads", self.manifest.name, self.manifest.version, self.model_dir,
                 self.manifest.num_blocks, len(self.stages), ",".join(self.providers), self.threads)

    def _check_graphs(self) -> None:
        """Every graph's declared shapes agree with the manifest (input shape, class count, stage
        shapes), so an edited manifest or a foreign graph fails at load, not on a request."""
        m = self.manifest
        classes = [m.num_classes]

        def check(name: str, tensor: Any, want: list[int]) -> None:
            got = tensor.shape[1:]  # without the batch axis; a symbolic dim is a str: unchecked
            if len(got) != len(want) or any(isinstance(g, int) and g != w
                                            for g, w in zip(got, want, strict=False)):
                raise ModelDirError(f"{self.model_dir / name}: {tensor.name} has shape "
                                    f"[batch, {', '.join(map(str, got))}], but the manifest "
                                    f"implies [batch, {', '.join(map(str, want))}]")

        check(m.full_graph, self.full.get_inputs()[0], list(m.input.shape))
        for output in self.full.get_outputs():
            check(m.full_graph, output, classes)
        for spec, session in zip(m.stages, self.stages, strict=True):
            outputs = {o.name: o for o in session.get_outputs()}
            if set(outputs) != set(STAGE_OUTPUTS):
                raise ModelDirError(f"{self.model_dir / spec.file} has outputs {sorted(outputs)}, "
                                    f"a stage graph has {STAGE_OUTPUTS}")
            check(spec.file, session.get_inputs()[0], spec.input_shape)
            check(spec.file, outputs[STAGE_FEATURES], spec.feature_shape)
            check(spec.file, outputs[STAGE_PROBS], classes)

    def _session(self, name: str, options: ort.SessionOptions,
                 providers: list[str]) -> ort.InferenceSession:
        path = self.model_dir / name
        try:
            return ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise ModelDirError(f"{path} cannot be loaded by onnxruntime: {e}") from None

    @property
    def has_stages(self) -> bool:
        return len(self.stages) == self.manifest.num_blocks

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest.input.shape
        return c, h, w

    def _pad(self, x: np.ndarray) -> np.ndarray:
        """On CUDA, pad the batch axis to a warmed bucket size; CPU kernels need no padding."""
        if not self.on_cuda:
            return x
        n = x.shape[0]
        size = next((b for b in batch_buckets(self.max_batch_size) if b >= n), n)
        if size == n:
            return x
        pad = np.zeros((size - n, *x.shape[1:]), dtype=x.dtype)
        return np.concatenate([x, pad])  # (n, ...) -> (bucket, ...)

    def run_full(self, x: np.ndarray, shared: bool = False) -> list[np.ndarray]:
        """Every block's probabilities, (rows, num_classes) each, from model.onnx in one call;
        `shared`: other calls run at the same time, so on this call's share of the threads."""
        n = x.shape[0]
        session = self.full_shared if shared else self.full
        outputs = session.run(self.full_outputs, {GRAPH_INPUT: self._pad(x)})
        return [o[:n] for o in outputs]

    def run_stage(self, k: int, x: Any, rows: int) -> StageOutput:
        """Block k (0-based) on `x` (host array or device OrtValue) holding `rows` real rows."""
        session = self.stages[k]
        if not self.on_cuda:
            features, probs = session.run(STAGE_OUTPUTS, {GRAPH_INPUT: x})
            return StageOutput(features, probs)
        binding = session.io_binding()
        if isinstance(x, np.ndarray):
            binding.bind_cpu_input(GRAPH_INPUT, self._pad(np.ascontiguousarray(x)))
        else:
            binding.bind_ortvalue_input(GRAPH_INPUT, x)
        binding.bind_output(STAGE_FEATURES, "cuda")  # stays on the device for the next stage
        binding.bind_output(STAGE_PROBS, "cpu")
        session.run_with_iobinding(binding)
        features, probs = binding.get_outputs()
        return StageOutput(features, probs.numpy()[:rows])

    @staticmethod
    def select_rows(features: Any, keep: np.ndarray, rows: int) -> Any:
        """The surviving rows of a stage's features; a device value passes through when all stay."""
        if isinstance(features, np.ndarray):
            return features[keep]
        if keep.all() and keep.size == rows:
            return features  # every real row survives: no host round trip
        return features.numpy()[:rows][keep]

    @staticmethod
    def to_host(features: Any, rows: int) -> np.ndarray:
        """A device value's first `rows` rows as a host array (to split or join stage inputs)."""
        if isinstance(features, np.ndarray):
            return features[:rows]
        return features.numpy()[:rows]

    def warm_up(self) -> float:
        """Run every graph at each bucket batch size once, checking what comes out; returns the
        seconds it took. A graph that fails here raises ModelDirError."""
        t0 = time.perf_counter()
        c, h, w = self.input_shape
        want = (None, self.manifest.num_classes)
        for b in batch_buckets(self.max_batch_size):
            x = np.zeros((b, c, h, w), dtype=np.float32)
            try:
                outputs = self.run_full(x)
                if self.full_shared is not self.full:
                    outputs += self.run_full(x, shared=True)
                features: Any = x
                for k in range(len(self.stages)):
                    out = self.run_stage(k, features, b)
                    outputs.append(out.probs)
                    features = out.features
            except Exception as e:  # onnxruntime's own exception types
                raise ModelDirError(f"{self.model_dir}: a graph fails on a batch of {b} zero "
                                    f"images: {str(e).strip().splitlines()[0]}") from None
            for probs in outputs:
                if probs.shape != (b, want[1]):
                    raise ModelDirError(f"{self.model_dir}: a graph gives probabilities of shape "
                                        f"{list(probs.shape)} for {b} images, expected "
                                        f"[{b}, {want[1]}] (num_classes)")
        seconds = time.perf_counter() - t0
        log.info("warm-up done in %.2fs (batch sizes %s)", seconds,
                 batch_buckets(self.max_batch_size))
        return seconds
