"""The training loop: epochs, AdamW + cosine schedule, per-block metrics, atomic checkpoints, resume.

Every epoch ends with weights.safetensors, train_state.pt and metrics.csv written atomically, so a
run killed at any point (SIGKILL included) resumes from its last completed epoch. Shuffling and
augmentation are seeded by (seed, epoch), so a resumed run takes the same path as an unbroken one.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
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
from training.data import DataSplits
from training.diagnostics import block_report
from training.ff_objectives import FFTrainConfig
from training.objectives import Objective, make_objective

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # optimizer + schedule + history; loaded with weights_only=True
CSV_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
SEPARATION_FILE = "separation.png"  # per-block test separation and accuracy (R for cumulative FF)


class TrainConfig(BaseModel):
    """Training hyperparameters (stored in config.json under `train`)."""

    model_config = ConfigDict(extra="forbid")

    objective: Literal["hff", "backprop", "ff"] = "hff"
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)  # peak AdamW learning rate
    weight_decay: float = Field(5e-4, ge=0)  # on conv/linear weights only
    warmup_epochs: float = Field(1.0, ge=0)  # linear warm-up, then cosine decay to zero
    augment: bool = True  # the data set's training augmentation
    eval_batch_size: int = Field(512, ge=1)
    ff: FFTrainConfig | None = None  # Forward-Forward loss, gamma and remedy (objective ff)


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


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


@torch.no_grad()
def predict_blocks(objective: Objective, model: nn.Module, data: Dataset, batch_size: int,
                   device: torch.device) -> tuple[list[Tensor], Tensor]:
    """Every block's scores over a whole split, on the CPU: ([(N, classes)] * L, labels (N,))."""
    model.eval()
    chunks: list[list[Tensor]] = []
    labels = []
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        chunks.append([s.float().cpu() for s in objective.block_scores(model, x.to(device))])
        labels.append(y)
    return [torch.cat(per_block) for per_block in zip(*chunks, strict=True)], torch.cat(labels)


class Trainer:
    """Trains one run into `out_dir`. Construct, then `fit()`."""

    def __init__(self, config: RunConfig, data: DataSplits, out_dir: str | Path,
                 device: str = "cpu", progress: bool = True):
        self.config = config
        self.train_cfg = TrainConfig.model_validate(config.train)
        self.data = data
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.progress = progress
        torch.manual_seed(config.seed)
        self.model = build_model(config.model).to(self.device)
        self.objective = make_objective(config)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.train_cfg.weight_decay),
                                           lr=self.train_cfg.lr)
        self.steps_per_epoch = math.ceil(len(data.train) / self.train_cfg.batch_size)
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
        gen = epoch_generator(self.config.seed, epoch)
        torch.manual_seed(self.config.seed * 100_003 + epoch)  # dropout etc.
        loader = DataLoader(self.data.train, batch_size=self.train_cfg.batch_size, shuffle=True,
                            generator=gen, drop_last=False)
        blocks = self.config.model.num_blocks
        loss_sum = torch.zeros(blocks, device=self.device)
        correct = torch.zeros(blocks, device=self.device)
        seen = 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.train_cfg.epochs}", leave=False,
                   disable=not self.progress, unit="batch")
        for x, y in bar:
            if self.train_cfg.augment and self.data.augment is not None:
                x = self.data.augment(x, gen)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            stats = self.objective.train_step(self.model, x, y)
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += torch.stack(stats.loss) * len(y)
            correct += torch.stack(stats.correct).float()
            seen += len(y)
        return (loss_sum / seen).tolist(), (correct / seen).tolist()

    def evaluate(self, split: Dataset) -> tuple[dict[str, list[float]], list[Tensor], Tensor]:
        scores, labels = predict_blocks(self.objective, self.model, split,
                                        self.train_cfg.eval_batch_size, self.device)
        loss_fn = getattr(self.objective, "score_loss", None)  # FF reports its own loss
        return block_report(scores, labels, loss_fn), scores, labels

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate and write the final artifacts."""
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.out, self.config)
        for epoch in range(self.start_epoch + 1, self.train_cfg.epochs + 1):
            t0 = time.perf_counter()
            train_loss, train_acc = self._train_epoch(epoch)
            val, _, _ = self.evaluate(self.data.val)
            dt = time.perf_counter() - t0
            self.elapsed_s += dt
            self.history.append(EpochRecord(
                epoch=epoch, lr=self.scheduler.get_last_lr()[0], time_s=dt,
                train_loss=train_loss, train_acc=train_acc,
                val_loss=val["loss"], val_acc=val["accuracy"]))
            self._save_epoch(epoch)
            log.info("epoch %d/%d %.1fs  train acc %s  val acc %s", epoch, self.train_cfg.epochs, dt,
                     _fmt(train_acc), _fmt(val["accuracy"]))
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        val, val_scores, val_labels = self.evaluate(self.data.val)
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
