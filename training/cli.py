"""hff-train: train an HFF network (or a baseline) into a checkpoint dir."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from contract.pydantic_errors import describe_errors
from model.checkpoint import (
    CONFIG_FILE,
    HELDOUT_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_config,
)
from model.config import list_presets, preset_config
from training import distributed
from training.data import DataError, list_datasets, load_dataset
from training.ff_objectives import add_ff_arguments, ff_settings
from training.objectives import OBJECTIVES
from training.trainer import STATE_FILE, TrainConfig, Trainer, make_run_config

PROG = "hff-train"


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error; we print one line that says what was wrong."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = OneLineParser(prog=PROG, description=__doc__,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", help=f"one of: {', '.join(list_datasets())}")
    p.add_argument("--data-dir", default=None, help="where a non-bundled data set's files are (default: the first of "
                   "$HFF_DATA_DIR/<name>, data/<name>, /usr/share/datasets/<name> that has them)")
    p.add_argument("--preset", default=None,
                   help=f"architecture ({', '.join(list_presets())}); default: the data set's")
    p.add_argument("--out", default=None, help="checkpoint dir (default: runs/<dataset>)")
    p.add_argument("--objective", default=defaults.objective, help=f"one of: {', '.join(OBJECTIVES)}")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--margin", type=float, default=None, help="additive cosine margin (model)")
    p.add_argument("--prototypes-per-class", type=int, default=None)
    p.add_argument("--no-augment", action="store_true", help="turn training augmentation off")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last completed epoch")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes that decode images (0: in the main process)")
    add_ff_arguments(p)
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
        model_ff, train_ff = ff_settings(args, vars(build_parser().parse_args([])))
    except ValueError as e:
        raise CliError(str(e)) from None
    try:  # sources of any size (image folders) are resized to the preset's input size
        image_size = preset_config(args.preset).input_shape[1:] if args.preset else None
    except KeyError as e:
        raise CliError(e.args[0]) from None
    data = load_dataset(args.dataset, args.data_dir, image_size=image_size)
    preset = args.preset or data.default_preset
    overrides = {
        "input_shape": data.input_shape, "class_names": data.class_names,
        "input_mean": data.mean, "input_std": data.std,
    }
    if args.margin is not None:
        overrides["margin"] = args.margin
    if args.prototypes_per_class is not None:
        overrides["prototypes_per_class"] = args.prototypes_per_class
    if args.objective == "ff":
        overrides["family"] = "ff"
        overrides["ff"] = model_ff
    try:
        model_cfg = preset_config(preset, **overrides)
        train_cfg = TrainConfig(objective=args.objective, epochs=args.epochs,
                                batch_size=args.batch_size, lr=args.lr,
                                weight_decay=args.weight_decay, augment=not args.no_augment,
                                ff=train_ff or None)
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
