"""The training loop: epochs, AdamW + cosine schedule, per-block metrics, atomic checkpoints, resume.

Every epoch ends with weights.safetensors, train_state.pt and metrics.csv written atomically, so a
run killed at any point (SIGKILL included) resumes from its last completed epoch. Shuffling and
augmentation are seeded by (seed, epoch) (and the rank, under torchrun), so a resumed run takes the
same path as an unbroken one, whatever the number of DataLoader workers.

Conv networks train channels-last (NHWC) by default, on the CPU too: measured faster there for both
objectives (docs/training-memory.md). On CUDA, and on the CPU with `precision: bf16` (the
Fashion-MNIST recipe's where the CPU has native bf16), the training step runs under bf16
autocast, and so does the validation pass that ends each epoch (a monitor, twice as fast as fp32
there); the final evaluation, whose figures and held-out probabilities are the run's report and
early exit's calibration, stays fp32 on the CPU. The checkpoint is saved from CPU copies in the
standard layout, so it depends on neither. Under torchrun, each rank
trains on its DistributedSampler shard of every global batch, gradients are averaged across ranks
(training/distributed.py says why by hand rather than with DDP), metrics are summed over ranks
and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from model import atomic
from model.checkpoint import (
    HELDOUT_FILE,
    METRICS_FILE,
    CheckpointError,
    RunConfig,
    load_weights,
    save_config,
    save_weights,
)
from model.config import ModelConfig
from model.factory import build_model
from training import allocator, distributed
from training.data import DataSplits, random_erasing
from training.diagnostics import block_report
from training.distributed import SINGLE, DistInfo
from training.ff_objectives import FFTrainConfig
from training.objectives import Objective, make_objective
from training.readers import collate

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # optimizer + schedule + history; loaded with weights_only=True
CSV_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
SEPARATION_FILE = "separation.png"  # per-block test separation and accuracy (R for cumulative FF)


class TrainConfig(BaseModel):
    """Training hyperparameters (stored in config.json under `train`)."""

    model_config = ConfigDict(extra="forbid")

    objective: Literal["hff", "backprop", "ff"] = "hff"
    epochs: int = Field(40, ge=1, description="passes over the training split")
    batch_size: int = Field(64, ge=1, description="global batch: split across torchrun ranks "
                                                  "(ceil(B / N) each)")
    lr: float = Field(3e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(5e-4, ge=0, description="AdamW weight decay, on conv/linear "
                                                        "weights only")
    warmup_epochs: float = Field(1.0, ge=0)  # linear warm-up, then cosine decay to zero
    augment: bool = True  # the data set's training augmentation
    erasing: float = Field(0.0, ge=0.0, le=1.0,
                           description="share of training images with one random rectangle "
                                       "replaced by noise (random erasing; with augmentation)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0,
                                   description="label smoothing of every block's loss")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="training step's arithmetic: bf16 autocast or fp32 (auto: bf16 on "
                            "CUDA, fp32 on the CPU), and each epoch's validation pass's; the "
                            "final evaluation stays fp32 on the CPU")
    memory_format: Literal["channels-last", "contiguous"] = Field(
        "channels-last", description="layout of the network and the batches while training "
                                     "(channels-last: NHWC, faster on CPU and GPU here)")
    micro_batches: int = Field(
        1, ge=1, description="HFF only: train each block whose one batch norm follows its "
                             "first layers in this many slices of the batch, with the whole "
                             "batch's gradient and statistics (training/micro_batch.py): the "
                             "same step in less memory, about as fast")
    eval_batch_size: int = Field(512, ge=1)
    ff: FFTrainConfig | None = None  # Forward-Forward loss, gamma and remedy (objective ff)

    @model_validator(mode="after")
    def _micro_batches_need_local_losses(self) -> TrainConfig:
        if self.micro_batches > 1 and self.objective != "hff":
            raise ValueError(f"micro_batches {self.micro_batches} needs objective 'hff': only a "
                             f"block trained by its own loss can be sliced exactly, not "
                             f"{self.objective!r}")
        return self


class EpochRecord(BaseModel):
    epoch: int
    lr: float
    time_s: float
    train_loss: list[float]
    train_acc: list[float]
    val_loss: list[float]
    val_acc: list[float]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: not on norms, biases, prototypes or scales."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_weight = p.ndim >= 2 and not name.endswith("prototypes")
        (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator seeded by (seed, epoch, stream): 0 in one process, 1 + rank under torchrun."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch + stream * 1_000_003)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), per oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether `precision` means bf16 autocast on `device`: on CUDA by default, anywhere with
    "bf16"."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast (no loss scaling needed: bf16 has float32's range) where `uses_bf16`; fp32
    otherwise. On a CPU with native bf16 (AVX512-BF16, AMX) oneDNN's bf16 convolutions are faster
    than fp32 ones; elsewhere they are emulated and slower."""
    if uses_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x: Tensor, device: torch.device, channels_last: bool = False) -> Tensor:
    """Move a batch; with `channels_last`, 4-D images go NHWC (what oneDNN's and cuDNN's fastest
    convolutions want)."""
    if channels_last and x.ndim == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


@torch.no_grad()
def predict_blocks(objective: Objective, model: nn.Module, data: Dataset, batch_size: int,
                   device: torch.device, num_workers: int = 0, info: DistInfo = SINGLE,
                   channels_last: bool = False, precision: str = "auto"
                   ) -> tuple[list[Tensor], Tensor]:
    """Every block's scores over a whole split, on the CPU: ([(N, classes)] * L, labels (N,)),
    in `precision`'s arithmetic (`autocast`).

    Under torchrun each rank scores a contiguous shard and the shards are gathered in order, so
    every rank returns the whole split.
    """
    model.eval()
    if info.enabled:
        data = Subset(data, list(distributed.shard_range(len(data), info)))
    chunks: list[Tensor] = []
    labels = []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", collate_fn=collate)
    for x, y in loader:
        with autocast(device, precision):
            scores = objective.block_scores(model, to_device(x, device, channels_last))
        chunks.append(torch.stack([s.float() for s in scores], dim=1))  # (B, L, classes)
        labels.append(y.to(device))
    stacked = distributed.gather_rows(torch.cat(chunks), info).cpu()  # (N, L, classes)
    all_labels = distributed.gather_rows(torch.cat(labels), info).cpu()
    return list(stacked.unbind(dim=1)), all_labels


class Trainer:
    """Trains one run into `out_dir`. Construct, then `fit()`."""

    def __init__(self, config: RunConfig, data: DataSplits, out_dir: str | Path,
                 device: str = "cpu", progress: bool = True, num_workers: int = 0,
                 dist_info: DistInfo = SINGLE):
        self.config = config
        self.train_cfg = TrainConfig.model_validate(config.train)
        self.data = data
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.dist = dist_info
        self.progress = progress and dist_info.is_main
        self.num_workers = num_workers
        torch.manual_seed(config.seed)
        self.model = build_model(config.model).to(self.device)
        self.channels_last = self.train_cfg.memory_format == "channels-last"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        distributed.broadcast_parameters(self.model, dist_info)
        self.objective = make_objective(config)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.train_cfg.weight_decay),
                                           lr=self.train_cfg.lr)
        # Global batch B: each of N ranks takes ceil(B / N) of it, so a run's optimisation (steps,
        # schedule, learning rate) does not change with the number of processes.
        self.rank_batch = math.ceil(self.train_cfg.batch_size / dist_info.world_size)
        rank_samples = math.ceil(len(data.train) / dist_info.world_size)
        self.steps_per_epoch = math.ceil(rank_samples / self.rank_batch)
        total = self.steps_per_epoch * self.train_cfg.epochs
        warmup = round(self.train_cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(total, warmup))
        self.history: list[EpochRecord] = []
        self.start_epoch = 0
        self.elapsed_s = 0.0  # training time of earlier sessions of a resumed run

    # --- resume -------------------------------------------------------------------------------

    def load_state(self) -> None:
        """Continue from the last completed epoch in out_dir (weights + train_state.pt)."""
        path = self.out / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: nothing to resume")
        try:
            # weights_only=True: unpickling is limited to tensors and plain containers, no code.
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # torch raises several types for a bad file
            raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
        load_weights(self.out, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = [EpochRecord.model_validate(r) for r in state["history"]]
        self.start_epoch = int(state["epoch"])
        self.elapsed_s = float(state["elapsed_s"])

    def _save_epoch(self, epoch: int) -> None:
        if not self.dist.is_main:
            return
        save_weights(self.out, self.model)
        state = {
            "epoch": epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": [r.model_dump() for r in self.history],
            "elapsed_s": self.elapsed_s,
        }
        atomic.write_with(self.out / STATE_FILE, lambda p: torch.save(state, p))
        atomic.write_text(self.out / CSV_FILE, self._csv())

    def _csv(self) -> str:
        blocks = self.config.model.num_blocks
        cols = ["epoch", "lr", "time_s"] + [
            f"{m}_{k}" for m in ("train_loss", "train_acc", "val_loss", "val_acc")
            for k in range(1, blocks + 1)
        ]
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(cols)
        for r in self.history:
            writer.writerow([r.epoch, f"{r.lr:.6g}", f"{r.time_s:.3f}"] + [
                f"{v:.6f}" for v in (*r.train_loss, *r.train_acc, *r.val_loss, *r.val_acc)])
        return buf.getvalue()

    # --- loop ---------------------------------------------------------------------------------

    def _train_epoch(self, epoch: int) -> tuple[list[float], list[float]]:
        self.model.train()
        rank = self.dist.rank
        torch.manual_seed(self.config.seed * 100_003 + epoch + rank * 1_000_003)  # dropout etc.
        # The sample order is fixed before the loader starts and augmentation draws in the main
        # process (workers only decode), so the batches do not depend on --num-workers: a
        # RandomSampler would let worker prefetching read the shared generator ahead.
        if self.dist.enabled:
            sampler = DistributedSampler(self.data.train, num_replicas=self.dist.world_size,
                                         rank=rank, shuffle=True, seed=self.config.seed)
            sampler.set_epoch(epoch)  # the shuffle is a function of (seed, epoch), as in one process
            order: Any = sampler
            aug_gen = epoch_generator(self.config.seed, epoch, 1 + rank)
        else:
            aug_gen = epoch_generator(self.config.seed, epoch)
            # Same draws, in the same order, as the DataLoader(shuffle=True, generator=gen) of
            # earlier versions (its worker base seed, then the permutation; see below for the
            # last batch), so runs and checkpoints of earlier versions are reproduced exactly.
            torch.empty((), dtype=torch.int64).random_(generator=aug_gen)
            order = torch.randperm(len(self.data.train), generator=aug_gen).tolist()
        n = len(self.data.train)
        last_batch = len(order) // self.rank_batch if len(order) % self.rank_batch else -1
        loader_args: dict[str, Any] = {"sampler": order, "generator": torch.Generator()}
        loader = DataLoader(self.data.train, batch_size=self.rank_batch, drop_last=False,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            collate_fn=collate, **loader_args)
        blocks = self.config.model.num_blocks
        loss_sum = torch.zeros(blocks, device=self.device)
        correct = torch.zeros(blocks, device=self.device)
        seen = torch.zeros((), device=self.device)
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.train_cfg.epochs}", leave=False,
                   disable=not self.progress, unit="batch")
        for i, (x, y) in enumerate(bar):
            if i == last_batch and not self.dist.enabled:
                # RandomSampler drew a second permutation on running out, just before it handed
                # over a short last batch: draw it here too, to keep the earlier versions' stream.
                torch.randperm(n, generator=aug_gen)
            if self.train_cfg.augment and self.data.augment is not None:
                x = self.data.augment(x, aug_gen)
                if self.train_cfg.erasing > 0:
                    x = random_erasing(x, aug_gen, self.train_cfg.erasing)
            x = to_device(x, self.device, self.channels_last)
            y = y.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.device, self.train_cfg.precision):
                stats = self.objective.train_step(self.model, x, y)
            distributed.all_reduce_gradients(self.model, self.dist)
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += torch.stack(stats.loss).float() * len(y)
            correct += torch.stack(stats.correct).float()
            seen += len(y)
        distributed.average_buffers(self.model, self.dist)
        totals = distributed.all_reduce_sum(torch.cat([loss_sum, correct, seen.view(1)]), self.dist)
        loss_sum, correct, seen = totals[:blocks], totals[blocks:2 * blocks], totals[-1]
        return (loss_sum / seen).tolist(), (correct / seen).tolist()

    def evaluate(self, split: Dataset, precision: str = "auto"
                 ) -> tuple[dict[str, list[float]], list[Tensor], Tensor]:
        scores, labels = predict_blocks(self.objective, self.model, split,
                                        self.train_cfg.eval_batch_size, self.device,
                                        num_workers=self.num_workers, info=self.dist,
                                        channels_last=self.channels_last, precision=precision)
        loss_fn = getattr(self.objective, "score_loss", None)  # FF reports its own loss
        return block_report(scores, labels, loss_fn), scores, labels

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate and write the final artifacts."""
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.out, self.config)
        # Each epoch's validation pass is a monitor, so it runs in the step's arithmetic (bf16
        # halves its time on a CPU with native bf16, 3-5% of the recipe's run); the report keeps
        # evaluate's default arithmetic (fp32 on the CPU, bf16 on CUDA).
        monitor = self.train_cfg.precision
        last_val = None
        for epoch in range(self.start_epoch + 1, self.train_cfg.epochs + 1):
            t0 = time.perf_counter()
            train_loss, train_acc = self._train_epoch(epoch)
            last_val = self.evaluate(self.data.val, monitor)
            val = last_val[0]
            dt = time.perf_counter() - t0
            self.elapsed_s += dt
            self.history.append(EpochRecord(
                epoch=epoch, lr=self.scheduler.get_last_lr()[0], time_s=dt,
                train_loss=train_loss, train_acc=train_acc,
                val_loss=val["loss"], val_acc=val["accuracy"]))
            self._save_epoch(epoch)
            log.info("epoch %d/%d %.1fs  train acc %s  val acc %s", epoch, self.train_cfg.epochs, dt,
                     _fmt(train_acc), _fmt(val["accuracy"]))
        same_arithmetic = uses_bf16(self.device, monitor) == uses_bf16(self.device)
        return self._finish(last_val if same_arithmetic else None)

    def _finish(self, last_val: tuple[dict[str, list[float]], list[Tensor], Tensor] | None = None
                ) -> dict[str, Any]:
        """Final evaluation and artifacts. `last_val`: the last epoch's validation pass when it
        scored these same weights (nothing changes them after it) in the report's arithmetic, so
        it is not run twice; a run resumed with no epoch left, or monitored in bf16, evaluates
        afresh."""
        val, val_scores, val_labels = last_val or self.evaluate(self.data.val)
        test, test_scores, test_labels = self.evaluate(self.data.test)
        if hasattr(self.objective, "report"):  # FF: combined prediction, gradient attenuation
            test.update(self.objective.report(test_scores, test_labels))
        metrics = {
            "objective": self.train_cfg.objective,
            "dataset": self.config.dataset,
            "preset": self.config.model.name,
            "seed": self.config.seed,
            "epochs": len(self.history),
            "train_time_s": round(self.elapsed_s, 3),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "final_test_accuracy": test.get("final_accuracy", test["accuracy"][-1]),
            "world_size": self.dist.world_size,
            "allocator": allocator.active(),  # the malloc it trained on (training/allocator.py)
            "test": test,
            "val": val,
            "history": [r.model_dump() for r in self.history],
        }
        # Per-block probabilities on held-out data: the exporter calibrates early exit from them.
        heldout = {
            "val_probs": torch.stack([s.softmax(1) for s in val_scores], 1).contiguous(),  # (N, L, C)
            "val_labels": val_labels,
            "test_probs": torch.stack([s.softmax(1) for s in test_scores], 1).contiguous(),
            "test_labels": test_labels,
        }
        if not self.dist.is_main:
            return metrics
        atomic.write_with(self.out / HELDOUT_FILE, lambda p: save_file(heldout, str(p)))
        atomic.write_json(self.out / METRICS_FILE, metrics)
        from training.plots import plot_curves, plot_separation

        title = f"{self.config.model.name} on {self.config.dataset} ({self.train_cfg.objective})"
        plot_curves(self.history, self.out / CURVES_FILE, title=title)
        plot_separation(test, self.out / SEPARATION_FILE, title=title)
        return metrics


def _fmt(values: list[float]) -> str:
    return "[" + " ".join(f"{v:.3f}" for v in values) + "]"


def make_run_config(model: ModelConfig, dataset: str, data_dir: str | None, seed: int,
                    train: TrainConfig) -> RunConfig:
    return RunConfig(model=model, dataset=dataset, data_dir=data_dir, seed=seed,
                     train=train.model_dump())
