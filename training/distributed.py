"""torch.distributed for the trainer: process group from torchrun's environment, gradient and
metric reduction, and the rule that only rank 0 writes.

Launch with `torchrun --nproc_per_node N -m training ...` (one node) or, on every node,
`torchrun --nnodes M --node_rank R --nproc_per_node N --rdzv_backend c10d
--rdzv_endpoint HOST:PORT -m training ...`. Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def env_info() -> DistInfo:
    """Rank and world size from the variables torchrun sets (a plain run: rank 0 of 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return DistInfo(rank=int(os.environ["RANK"]), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str) -> tuple[DistInfo, str]:
    """Join the process group torchrun describes; returns the info and this rank's device."""
    info = env_info()
    if not info.enabled:
        return info, device
    if device.startswith("cuda"):
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    log.debug("rank %d/%d on %s (%s)", info.rank, info.world_size, device, backend)
    return info, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_parameters(model: nn.Module, info: DistInfo) -> None:
    """Every rank starts from rank 0's weights and buffers."""
    if info.enabled:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def all_reduce_gradients(model: nn.Module, info: DistInfo) -> None:
    """Average the gradients over ranks, in one flat buffer (one collective per step).

    Why not DistributedDataParallel: HFF local training runs each block's loss.backward() as soon
    as that block has run, and objectives call `model.blocks[k]` directly rather than
    `model.forward`, so DDP's forward-triggered reducer would not see the per-block passes (and a
    DDP wrapper per block would start one bucketed all-reduce per block per step with no overlap
    to gain on CPU). Averaging all gradients once, after the objective's backward calls and
    before `optimizer.step()`, is correct for every objective (HFF, backprop, FF) and keeps the
    Objective interface untouched. Parameters with no gradient on this step are left out, the
    same on every rank, as every rank runs the same code on same-shaped batches.
    """
    if not info.enabled:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (total parameters,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def average_buffers(model: nn.Module, info: DistInfo) -> None:
    """Average BatchNorm running statistics (the only buffers ranks change), so ranks agree before
    evaluation and rank 0's checkpoint holds statistics of the whole data, not of its shard."""
    if not info.enabled:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var):
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf /= info.world_size


def all_reduce_sum(tensor: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(tensor: Tensor, info: DistInfo) -> Tensor:
    """Concatenate every rank's rows in rank order (row counts may differ by rank)."""
    if not info.enabled:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(info.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def shard_range(n: int, info: DistInfo) -> range:
    """The contiguous slice of n items this rank evaluates (ranks in order cover 0..n-1)."""
    per, extra = divmod(n, info.world_size)
    start = info.rank * per + min(info.rank, extra)
    return range(start, start + per + (1 if info.rank < extra else 0))
