"""hff-train: train an HFF network (or a baseline) into a checkpoint dir."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from contract.cli import DefaultsHelpFormatter, OneLineParser
from contract.pydantic_errors import describe_errors
from model.checkpoint import (
    CONFIG_FILE,
    HELDOUT_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_config,
)
from model.config import FFConfig, ModelConfig, list_presets, preset_config
from training import allocator, distributed
from training.data import DataError, list_datasets, load_dataset
from training.ff_objectives import FFTrainConfig
from training.flags import add_flags, given
from training.objectives import OBJECTIVES
from training.trainer import STATE_FILE, TrainConfig, Trainer, make_run_config

PROG = "hff-train"
# The flags that set config fields, by field; type, choices, default and help come from the field.
TRAIN_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr",
               "weight_decay": "--weight-decay", "memory_format": "--memory-format",
               "erasing": "--erasing", "label_smoothing": "--label-smoothing",
               "precision": "--precision", "micro_batches": "--micro-batches"}
MODEL_FLAGS = {"margin": "--margin", "prototypes_per_class": "--prototypes-per-class"}
FF_MODEL_FLAGS = {"goodness": "--ff-goodness", "threshold": "--ff-threshold",
                  "label_embedding": "--ff-embedding", "score_blocks": "--ff-score-blocks"}
FF_TRAIN_FLAGS = {"loss": "--ff-loss", "alpha": "--ff-alpha", "gamma": "--gamma",
                  "remedy": "--remedy", "weight": "--remedy-weight", "gate_tau": "--gate-tau",
                  "gate_kappa": "--gate-kappa", "depth_alpha": "--depth-alpha"}


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = OneLineParser(prog=PROG, description=__doc__,
                      formatter_class=DefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits",
                   help=f"one of: {', '.join(list_datasets())}; fashion-mnist brings its recipe "
                        "(epochs, batch, erasing, label smoothing: the README), under the flags")
    p.add_argument("--data-dir", default=None, help="where a non-bundled data set's files are (default: the first of "
                   "$HFF_DATA_DIR/<name>, data/<name>, /usr/share/datasets/<name> that has them)")
    p.add_argument("--preset", default=None,
                   help=f"architecture ({', '.join(list_presets())}); default: the data set's")
    p.add_argument("--out", default=None, help="checkpoint dir (default: runs/<dataset>)")
    p.add_argument("--objective", default=defaults.objective, help=f"one of: {', '.join(OBJECTIVES)}")
    add_flags(p, TrainConfig, TRAIN_FLAGS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_flags(p, ModelConfig, MODEL_FLAGS, default_text="the preset's")
    p.add_argument("--no-augment", action="store_true", help="turn training augmentation off")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last completed epoch")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes that decode images (0: in the main process)")
    ff = p.add_argument_group("Forward-Forward (--objective ff)")
    add_flags(ff, FFConfig, FF_MODEL_FLAGS)
    add_flags(ff, FFTrainConfig, FF_TRAIN_FLAGS)
    return p


class TqdmHandler(logging.Handler):
    """Log lines printed through tqdm, so they do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record))


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for but torch sees no CUDA device")
    return name


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"  # one per process: torchrun ranks probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CliError(f"cannot write to output dir {out}: {e.strerror or e}") from None


def prepare_new_run(args: argparse.Namespace, out: Path):
    if args.objective not in OBJECTIVES:
        raise CliError(f"unknown objective {args.objective!r} (known: {', '.join(OBJECTIVES)})")
    try:
        model_ff = given(args, FFConfig, FF_MODEL_FLAGS)
        train_ff = given(args, FFTrainConfig, FF_TRAIN_FLAGS)
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.objective != "ff" and (model_ff or train_ff):
        flags = [FF_MODEL_FLAGS.get(f) or FF_TRAIN_FLAGS[f] for f in [*model_ff, *train_ff]]
        raise CliError(f"{', '.join(flags)} only apply to --objective ff")
    try:  # sources of any size (image folders) are resized to the preset's input size
        image_size = preset_config(args.preset).input_shape[1:] if args.preset else None
    except KeyError as e:
        raise CliError(e.args[0]) from None
    data = load_dataset(args.dataset, args.data_dir, image_size=image_size)
    preset = args.preset or data.default_preset
    overrides = {
        "input_shape": data.input_shape, "class_names": data.class_names,
        "input_mean": data.mean, "input_std": data.std, **given(args, ModelConfig, MODEL_FLAGS),
    }
    if args.objective == "ff":
        overrides["family"] = "ff"
        overrides["ff"] = model_ff
    try:
        model_cfg = preset_config(preset, **overrides)
        # The data set's recipe is HFF's and backprop's (but micro-batches, which only local
        # losses can take); FF keeps its own defaults.
        recipe = {} if args.objective == "ff" else dict(data.train_defaults)
        if args.objective != "hff":
            recipe.pop("micro_batches", None)
        train_cfg = TrainConfig(objective=args.objective, augment=not args.no_augment,
                                ff=train_ff if args.objective == "ff" else None,
                                **{**recipe, **given(args, TrainConfig, TRAIN_FLAGS)})
    except KeyError as e:
        raise CliError(e.args[0]) from None
    except ValidationError as e:
        raise CliError(f"invalid option: {describe_errors(e, root='config')}") from None
    if (out / CONFIG_FILE).exists():
        if not args.overwrite:
            raise CliError(f"{out} already holds a run: pass --resume to continue it or "
                           "--overwrite to start over")
        if distributed.env_info().is_main:
            for name in (STATE_FILE, WEIGHTS_FILE, METRICS_FILE, HELDOUT_FILE):
                (out / name).unlink(missing_ok=True)
    config = make_run_config(model_cfg, args.dataset, args.data_dir, args.seed, train_cfg)
    return config, data


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/{args.dataset}")
    if args.num_workers < 0:
        raise CliError("--num-workers must be 0 or more")
    # Under torchrun: join the process group (gloo on CPU, nccl on CUDA); a plain run is rank 0 of 1.
    info, device = distributed.init(resolve_device(args.device))
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    options = {"device": device, "progress": not args.no_progress,
               "num_workers": args.num_workers, "dist_info": info}
    if args.resume:
        config = load_config(out)
        data = load_dataset(config.dataset, config.data_dir,
                            image_size=config.model.input_shape[1:])
        check_writable(out)
        trainer = Trainer(config, data, out, **options)
        if (out / STATE_FILE).exists():
            trainer.load_state()
            if info.is_main:
                print(f"{PROG}: resuming {out} after epoch {trainer.start_epoch}", file=sys.stderr)
    else:
        config, data = prepare_new_run(args, out)
        check_writable(out)
        trainer = Trainer(config, data, out, **options)
    distributed.barrier(info)  # every rank has checked `out` before rank 0 writes into it
    t0 = time.perf_counter()
    metrics = trainer.fit()
    if info.is_main:
        print_summary(metrics, out, time.perf_counter() - t0)
    return 0


def print_summary(metrics: dict, out: Path, wall_s: float) -> None:
    test = metrics["test"]
    print(f"\n{metrics['preset']} on {metrics['dataset']} ({metrics['objective']}), "
          f"{metrics['epochs']} epochs, {wall_s:.1f}s")
    print(f"{'block':>5}  {'test acc':>8}  {'separation':>10}")
    for k, (acc, sep) in enumerate(zip(test["accuracy"], test["separation"], strict=True), 1):
        print(f"{k:>5}  {acc * 100:>7.2f}%  {sep:>10.3f}")
    print(f"final test accuracy: {metrics['final_test_accuracy'] * 100:.2f}%")
    print(f"checkpoint: {out}")


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself, not a caller in-process: jemalloc when installed
        try:
            allocator.reexec_with_jemalloc()
        except allocator.AllocatorError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        return run(args)
    except (CliError, DataError, CheckpointError) as e:
        message = str(e)
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep its last line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; resume with --resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
