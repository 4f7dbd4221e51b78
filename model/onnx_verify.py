"""Verification of exported graphs: onnx.checker, opset and tensor names, onnxruntime parity.

hff-export runs these on every graph before a model dir is written; a failure is an ExportError
whose message says what differed, by how much and where.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from contract.model_dir import FULL_GRAPH, GRAPH_INPUT, stage_file

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
# The dynamo exporter writes opset 18 natively; below that it tries a version converter that
# fails on these graphs and silently falls back to 18, so lower opsets are refused up front.
MIN_OPSET = 18
PARITY_BATCHES = (1, 7, 64)
PARITY_ATOL = 1e-5  # on probabilities


class ExportError(Exception):
    """The export cannot be done or failed verification; the message says why in one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def max_opset() -> int:
    import onnx

    return onnx.defs.onnx_opset_version()


def check_opset(opset: int) -> None:
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset {opset} is not supported: use {MIN_OPSET} to {top} "
                          f"(default {DEFAULT_OPSET})")


def check_graph(path: Path, opset: int, output_names: list[str]) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejects {path.name}: {first_line(e)}") from e
    graph = onnx.load(str(path), load_external_data=False)
    got = {o.domain: o.version for o in graph.opset_import}.get("")
    if got != opset:
        raise ExportError(f"{path.name} was written with opset {got}, not the {opset} asked for")
    inputs = [i for i in graph.graph.input]
    if [i.name for i in inputs] != [GRAPH_INPUT]:
        raise ExportError(f"{path.name} has inputs {[i.name for i in inputs]}, "
                          f"expected {[GRAPH_INPUT]}")
    if not inputs[0].type.tensor_type.shape.dim[0].dim_param:
        raise ExportError(f"{path.name} has a fixed batch size; the batch axis must be dynamic")
    outputs = [o.name for o in graph.graph.output]
    if outputs != output_names:
        raise ExportError(f"{path.name} has outputs {outputs}, expected {output_names}")


def make_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot load {path.name}: {first_line(e)}") from e


def run_session(session: Any, x: np.ndarray) -> list[np.ndarray]:
    """All outputs of one graph for input `x` (kept separate so tests can corrupt it)."""
    return session.run(None, {GRAPH_INPUT: x})


def verify_parity(full: nn.Module, model_dir: Path, num_blocks: int,
                  input_shape: tuple[int, ...], atol: float = PARITY_ATOL,
                  batches: tuple[int, ...] = PARITY_BATCHES, seed: int = 0) -> float:
    """onnxruntime against torch on every block's probabilities, whole graph and chained stages.

    Returns the largest absolute difference seen; raises ExportError when it exceeds `atol`.
    """
    whole = make_session(model_dir / FULL_GRAPH)
    stages = [make_session(model_dir / stage_file(k)) for k in range(1, num_blocks + 1)]
    gen = torch.Generator().manual_seed(seed)
    worst, where = 0.0, ""
    for batch in batches:
        x = torch.rand(batch, *input_shape, generator=gen)  # pixels in [0, 1]
        with torch.no_grad():
            ref = [p.numpy() for p in full(x)]
        got = {FULL_GRAPH: run_session(whole, x.numpy())}
        h, chained = x.numpy(), []
        for session in stages:
            h, probs = run_session(session, h)
            chained.append(probs)
        got["chained stages"] = chained
        for graph, outputs in got.items():
            for k, (a, b) in enumerate(zip(outputs, ref, strict=True), 1):
                if a.shape != b.shape:
                    raise ExportError(f"{graph} gives probs_{k} of shape {a.shape} at batch "
                                      f"{batch}, torch gives {b.shape}")
                diff = float(np.abs(a - b).max())
                if not diff <= worst:  # also catches NaN
                    worst, where = diff, f"probs_{k} of {graph} at batch {batch}"
    if not worst <= atol:
        raise ExportError(f"onnxruntime disagrees with torch by {worst:.3g} (tolerance {atol:g}) "
                          f"on {where}")
    log.info("parity: largest difference %.3g at batches %s", worst, list(batches))
    return worst
