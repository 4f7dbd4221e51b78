"""Inference speed of HFF (one pass) against Forward-Forward (one pass per class), same backbone.

Both networks are built from the same block list (same widths, same norm layers); HFF adds its
prototype heads, FF embeds the label as a one-hot overlay on the first C input values (so its first
layer costs what HFF's does). FF scores the C label variants of a batch as one label-major (C * B)
stack of rows, no loop over images or labels; each side gets its fastest pass size on the machine
at hand:

1. Sweep: in each memory layout (--layouts: contiguous, channels-last; network and batch alike)
   and for sub-batches of b = 1, 2, 4, ... images, HFF's images/s through one pass of b images
   and FF's through one pass of its C * b rows (label embedding, blocks, goodness), alternating,
   median of --sweep-rounds; plus minor page faults per image / row (fresh memory the kernel has
   to map: glibc maps large allocations afresh and unmaps them on free). The fastest layout and
   size of each side is kept. Passes over --sweep-max-rows FF rows are left to the stacked row.
2. Table: HFF in passes of its best size against FF in chunks of its best size (the headline),
   and against FF's single stacked (C * B)-row pass (labelled; it measures memory traffic, not
   the label passes). The timed call is the whole prediction: HFF's last-block argmax (every
   block's head computed, as served), FF's argmax of the summed goodness. The forms are timed in
   alternating rounds, median images/s over the rounds; the ratio's limit is C, the label passes
   FF needs at equal cost per row.

    python bench/hff_vs_ff.py                        # 10 classes 1x8x8 and 100 classes 3x32x32
    python bench/hff_vs_ff.py --classes 100 --batches 256 --threads 1
    python bench/hff_vs_ff.py --preset-100 cifar-cnn --device cuda --sweep-max-rows 100000
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.config import ModelConfig, preset_config  # noqa: E402
from model.factory import build_model  # noqa: E402

# A light cifar-shaped backbone, so 100 classes x batch 256 (25,600 images per FF pass) stays
# measurable on a small CPU; --preset-100 cifar-cnn takes the full VGG-style stack instead.
CIFAR_SMALL = {
    "blocks": [
        {"kind": "conv", "width": 16, "downsample": "maxpool"},
        {"kind": "conv", "width": 32, "downsample": "maxpool"},
        {"kind": "conv", "width": 64, "downsample": "maxpool"},
    ],
    "pool_grid": 2,
}
CASES = {10: ((1, 8, 8), "preset_10"), 100: ((3, 32, 32), "preset_100")}


def pair(classes: int, shape: tuple[int, int, int], preset: str | None) -> tuple[torch.nn.Module, ...]:
    """(HFF, FF) with the same blocks for `classes` classes and input `shape`."""
    data = {"input_shape": shape, "class_names": [f"c{i}" for i in range(classes)],
            "input_mean": [0.5] * shape[0], "input_std": [0.25] * shape[0]}
    if preset is None:
        hff_cfg = ModelConfig(name="cifar-small", **CIFAR_SMALL, **data)
    else:
        hff_cfg = preset_config(preset, **data)
    ff_cfg = hff_cfg.model_copy(update={"family": "ff"})
    ff_cfg = ModelConfig.model_validate({**ff_cfg.model_dump(), "ff": {"label_embedding": "overlay"}})
    return build_model(hff_cfg).eval(), build_model(ff_cfg).eval(), hff_cfg


def throughput(fn: Callable[[], torch.Tensor], images: int, min_time: float,
               sync: Callable[[], None]) -> tuple[float, float]:
    """(images/s, minor page faults per image) of `fn`, called until `min_time` s have passed."""
    calls, faults, t0 = 0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    while True:
        fn()
        sync()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            return calls * images / elapsed, faults / (calls * images)


LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}


class Form(NamedTuple):
    """How a side runs: memory layout of the network and the batch, and images per pass."""

    layout: str
    images: int


class Pair(NamedTuple):
    """Both networks and the batch, per layout."""

    hff: dict[str, torch.nn.Module]
    ff: dict[str, torch.nn.Module]
    x: dict[str, torch.Tensor]

    def sub(self, b: int) -> Pair:
        return self._replace(x={k: v[:b] for k, v in self.x.items()})


def run_hff(p: Pair, form: Form) -> Callable[[], torch.Tensor]:
    """HFF's prediction in passes of `form.images` images."""
    hff, x = p.hff[form.layout], p.x[form.layout]
    return lambda: torch.cat([hff(part)[-1] for part in x.split(form.images)]).argmax(1)


def run_ff(p: Pair, form: Form, classes: int) -> Callable[[], torch.Tensor]:
    """FF's prediction in chunks of `classes * form.images` rows."""
    ff, x = p.ff[form.layout], p.x[form.layout]
    return lambda: ff.predict(x, chunk=classes * form.images)


def sweep(p: Pair, classes, args, sync) -> tuple[Form, Form, list[str]]:
    """The fastest form of HFF and of FF (C rows per image), and the sweep table's rows."""
    batch = next(iter(p.x.values())).shape[0]
    sizes = sorted({min(2**i, batch) for i in range(batch.bit_length() + 1)})
    sizes = [b for b in sizes if classes * b <= args.sweep_max_rows] or sizes[:1]
    forms = [Form(layout, b) for layout in args.layouts for b in sizes]
    hff_rates: dict[Form, list[tuple[float, float]]] = {f: [] for f in forms}
    ff_rates: dict[Form, list[tuple[float, float]]] = {f: [] for f in forms}
    for _ in range(args.sweep_rounds):
        for form in forms:
            sub = p.sub(form.images)
            fh, ff = run_hff(sub, form), run_ff(sub, form, classes)
            fh(), ff()  # warm-up: oneDNN / cuDNN choose kernels per shape
            hff_rates[form].append(throughput(fh, form.images, args.sweep_time, sync))
            ff_rates[form].append(throughput(ff, form.images, args.sweep_time, sync))

    def median(rates: dict[Form, list[tuple[float, float]]], i: int) -> dict[Form, float]:
        return {f: statistics.median(r[i] for r in v) for f, v in rates.items()}

    hff_med, ff_med = median(hff_rates, 0), median(ff_rates, 0)
    hff_faults, ff_faults = median(hff_rates, 1), median(ff_rates, 1)
    best_hff, best_ff = max(hff_med, key=hff_med.get), max(ff_med, key=ff_med.get)
    rows = [f"| {classes} | {batch} | {f.layout} | {f.images} | {classes * f.images:,} "
            f"| {hff_med[f]:,.0f}{' (best)' if f == best_hff else ''} "
            f"| {ff_med[f]:,.0f}{' (best)' if f == best_ff else ''} "
            f"| {hff_faults[f]:.1f} | {ff_faults[f] / classes:.1f} |" for f in forms]
    return best_hff, best_ff, rows


def measure(p: Pair, classes, hff_form, ff_forms, args, sync) -> tuple[float, list[tuple]]:
    """Alternating rounds of HFF in `hff_form` and FF in each of `ff_forms`: HFF's median
    images/s and, per FF form, (median images/s, page faults per row, per-round ratios)."""
    fns = [run_hff(p, hff_form)] + [run_ff(p, f, classes) for f in ff_forms]
    for fn in fns:
        fn()  # warm-up
    sync()
    batch = next(iter(p.x.values())).shape[0]
    rates: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(args.rounds):
        for fn, out in zip(fns, rates, strict=True):
            out.append(throughput(fn, batch, args.min_time, sync))
    hff_rounds = [r for r, _ in rates[0]]
    forms = [(statistics.median(r for r, _ in f), statistics.median(q for _, q in f) / classes,
              [h / r for h, (r, _) in zip(hff_rounds, f, strict=True)]) for f in rates[1:]]
    return statistics.median(hff_rounds), forms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100], choices=sorted(CASES))
    p.add_argument("--preset-10", default="digits-cnn", help="backbone for 10 classes, 1x8x8")
    p.add_argument("--preset-100", default=None,
                   help="backbone for 100 classes, 3x32x32 (default: a light 16-32-64 conv stack)")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per table cell")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed round (at least one call)")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                   help="memory layouts in the sweep (both networks and the batch)")
    p.add_argument("--sweep-rounds", type=int, default=2, help="alternating rounds of the pass-size sweep")
    p.add_argument("--sweep-time", type=float, default=0.2, help="seconds per sweep timing")
    p.add_argument("--sweep-max-rows", type=int, default=8192,
                   help="largest FF pass in the sweep, in rows (C per image)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"machine: {platform.machine()} {platform.processor()}, {os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"python {platform.python_version()}, torch {torch.__version__}; sweep: median of "
          f"{args.sweep_rounds} rounds of >= {args.sweep_time}s; table: {args.rounds} alternating "
          f"rounds of >= {args.min_time}s, median images/s")
    sweep_rows, table_rows = [], []
    with torch.inference_mode():
        for classes in args.classes:
            shape, preset_arg = CASES[classes]
            torch.manual_seed(0)
            hff, ff, cfg = pair(classes, shape, getattr(args, preset_arg))
            hff, ff = hff.to(device), ff.to(device)
            nets = {k: (copy.deepcopy(hff).to(memory_format=fmt), copy.deepcopy(ff).to(memory_format=fmt))
                    for k, fmt in LAYOUTS.items() if k in args.layouts}
            widths = "-".join(str(b.width) for b in cfg.blocks)
            for batch in args.batches:
                x = torch.rand(batch, *shape, device=device)
                p = Pair({k: h for k, (h, _) in nets.items()}, {k: f for k, (_, f) in nets.items()},
                         {k: x.contiguous(memory_format=LAYOUTS[k]) for k in nets})
                hff_form, ff_form, rows = sweep(p, classes, args, sync)
                sweep_rows += rows
                stacked = Form(ff_form.layout, batch)  # the single (C * B)-row pass, same layout
                ff_forms = [ff_form] + ([stacked] if ff_form != stacked else [])
                h, results = measure(p, classes, hff_form, ff_forms, args, sync)
                for form, (f, faults, ratios) in zip(ff_forms, results, strict=True):
                    text = f"{form.layout}, chunks of {classes * form.images:,} rows" if form == ff_form else ""
                    if form == stacked:
                        text += ("; = " if text else f"{form.layout}, ") + (
                            f"stacked: one {classes * batch:,}-row pass")
                    ratio = h / f
                    table_rows.append(
                        f"| {classes} | {'x'.join(map(str, shape))} | {cfg.name} ({widths}) | {batch} "
                        f"| {hff_form.layout}, passes of {hff_form.images} | {h:,.0f} | {text} | {f:,.0f} "
                        f"| {faults:.1f} | **{ratio:.1f}x** | {classes} | {ratio / classes:.2f} "
                        f"| {min(ratios):.1f}-{max(ratios):.1f} |")
                print(f"# {classes} classes, batch {batch}: done", file=sys.stderr, flush=True)
    print("\nPass-size sweep (images/s if the whole batch ran in passes of that size; FF: C rows "
          "per image):\n")
    print("| classes | batch | layout | images per pass | FF rows per pass | HFF img/s | FF img/s "
          "| HFF page faults / image | FF page faults / row |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(sweep_rows))
    print("\nHFF against FF, each in its fastest pass size from the sweep (and FF's stacked pass):\n")
    print("| classes | input | backbone | batch | HFF form | HFF img/s | FF form | FF img/s "
          "| FF page faults / row | HFF / FF | limit (C) | ratio / limit | per-round ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
