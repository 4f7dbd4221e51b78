"""The torch modules that become the ONNX graphs, their MAC counts, and writing one to ONNX."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from contract.model_dir import GRAPH_INPUT
from model.onnx_verify import ExportError, check_graph, first_line

EXAMPLE_BATCH = 4  # > 1, so the exporter cannot specialise the batch axis to a constant


class FullGraph(nn.Module):
    """The whole network: pixels in [0, 1] -> (probs_1, ..., probs_L)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(logits.softmax(dim=1) for logits in self.net(x, detach=False))


class StageGraph(nn.Module):
    """Block k alone: its input (the [0, 1] image for block 1) -> (feature map, probs)."""

    def __init__(self, net: nn.Module, index: int):
        super().__init__()
        self.norm = net.input_norm if index == 0 else None  # normalisation lives in stage 1
        self.block = net.blocks[index]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.norm is not None:
            x = self.norm(x)
        h, logits = self.block(x)
        return h, logits.softmax(dim=1)


def block_macs(net: nn.Module, input_shape: tuple[int, ...]) -> list[int]:
    """Multiply-accumulates of each block (body + prototype head) for one input.

    conv: k*k*Cin*Cout*Hout*Wout per layer; linear: in*out; head: D*(C*P) for the prototype
    matmul. Norms, activations and pools are not counted (they are not multiply-accumulates).
    """
    counts: list[int] = []
    current = [0]

    def hook(module: nn.Module, _inputs: Any, output: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            current[0] += module.weight.numel() * output.shape[2] * output.shape[3]
        elif isinstance(module, nn.Linear):
            current[0] += module.weight.numel()

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = net.training
    net.eval()  # a batch of one through BatchNorm1d needs eval mode
    try:
        with torch.no_grad():
            h = net.input_norm(torch.zeros(1, *input_shape))
            for block in net.blocks:
                current[0] = 0
                h, _ = block(h)
                counts.append(current[0] + block.head.prototypes.numel())
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    return counts


def export_graph(module: nn.Module, example: Tensor, path: Path, output_names: list[str],
                 opset: int) -> None:
    """One module -> one ONNX file with input GRAPH_INPUT and a dynamic batch axis.

    The dynamo (torch.export) exporter: it is torch 2.13's default and maintained path, its
    optimiser folds BatchNorm into the convolutions and drops the Identity/Constant clutter the
    legacy TorchScript exporter leaves (58 nodes against 96 for digits-cnn), and the legacy
    exporter is deprecated with a removal notice. Both pass onnx.checker and parity here.
    """
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), _quiet_torch_onnx():
            # torch-internal deprecation notices are not the user's business
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            program = torch.onnx.export(
                module.eval(), (example,), None, input_names=[GRAPH_INPUT],
                output_names=output_names, opset_version=opset, dynamo=True,
                dynamic_shapes=({0: batch},), optimize=True, verbose=False)
            program.save(str(path), external_data=False)
        _strip_debug_metadata(path)
    except Exception as e:  # the exporter raises many types; all mean the same to the user
        raise ExportError(f"torch.onnx.export failed for {path.name}: "
                          f"{type(e).__name__}: {first_line(e)}") from e
    check_graph(path, opset, output_names)


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (source paths, line numbers, module names).

    It leaks the exporting machine's paths into the artifact and makes the content-hash version
    depend on where the code was run from; without it, the same checkpoint gives the same bytes.
    """
    import onnx

    proto = onnx.load(str(path))
    graphs = [proto.graph] + [f for f in proto.functions]
    for graph in graphs:
        del graph.metadata_props[:]
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        del value.metadata_props[:]
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _quiet_torch_onnx():
    """Mute the exporter's chatter: torchvision ops it cannot find (never used here) and the
    onnxscript optimiser's INFO lines per rewrite; real failures still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
