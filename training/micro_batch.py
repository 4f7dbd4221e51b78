"""One HFF block's training step in micro-batches, with the gradient of the whole batch.

A block trained by its own local loss needs only its own activations, so its memory can be cut by
running the batch through it a slice at a time and summing the gradients. Every layer of a block
treats samples one by one except batch normalisation, whose mean and variance couple the whole
batch: normalising each slice by its own statistics would train a different network ("ghost"
batch norm). So a block whose one batch norm follows its first layers (the stem, e.g. a
convolution) takes three steps, and its gradient is the whole batch's:

  A. the stem on the whole batch (autograd keeps only its input), and the norm's statistics over
     the whole batch (mean and biased variance per channel, as BatchNorm computes them in
     training), slice by slice; the running statistics are updated once, as one call would;
  B. each slice of the stem's output through the rest of the block with the norm fixed at those
     statistics, its share of the batch's loss back-propagated at once: every gradient but the
     part that flows through the mean and variance, plus the norm's dgamma = sum(g * xhat) and
     dbeta = sum(g) over the whole batch;
  C. that missing part added to the stem output's gradient, -gamma * rstd * (dbeta + xhat_i *
     dgamma) / M per channel (M = samples x height x width; the batch-norm gradient's two mean
     terms), and one backward pass through the stem.

The block's large maps after the norm (the normalised and activated maps, the pooling indices,
their gradients) then exist for one slice at a time; the stem's output and its gradient are
kept whole. Each layer runs once, as without slices. fmnist-vgg's block 1 (one convolution,
28x28x32 maps) is HFF's whole peak memory; in slices, the peak moves to block 2.
Backprop cannot do the same: its batch norms' statistics get their gradient from every later
layer, so an exact slice of one block needs the whole network's backward pass first. A block
with no batch norm just runs slice by slice; a block with more than one (or a norm without
affine parameters) runs whole (`split_at_norm`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from training.losses import correct_count


class NormSplit(NamedTuple):
    """A block body as stem -> norm -> rest; norm None: no layer couples the batch."""

    stem: nn.Module
    norm: _BatchNorm | None
    rest: nn.Module


def split_at_norm(body: nn.Module) -> NormSplit | None:
    """The body cut around its one batch norm; None when it cannot run exactly in slices."""
    layers = list(body) if isinstance(body, nn.Sequential) else [body]
    norms = [i for i, layer in enumerate(layers) if isinstance(layer, _BatchNorm)]
    if not norms:
        return NormSplit(nn.Sequential(), None, body)
    if len(norms) > 1 or not layers[norms[0]].affine:
        return None
    i = norms[0]
    return NormSplit(nn.Sequential(*layers[:i]), layers[i], nn.Sequential(*layers[i + 1:]))


class SliceResult(NamedTuple):
    features: Tensor  # the block's output for the whole batch, detached
    loss: Tensor  # the batch's mean loss, detached
    correct: Tensor  # correctly classified samples


def batch_statistics(norm: _BatchNorm, slices: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, int]:
    """The mean and biased variance per channel (float32) that `norm` in training would
    normalise the whole batch with, from its slices, and the number of values per channel.
    Each slice's come from the kernel BatchNorm itself uses (its normalised output, a slice
    in size, is dropped: a whole-batch temporary left the malloc holding 6 MiB more), combined
    by Chan et al.'s pairwise update."""
    mean = var = None
    count = 0
    with torch.no_grad():
        for part in slices:
            part = part.to(torch.promote_types(part.dtype, torch.float32))  # float32 statistics
            _, m, invstd = torch.native_batch_norm(part, None, None, None, None, True, 0.0, norm.eps)
            v = invstd.pow(-2) - norm.eps
            n = part.numel() // part.shape[1]
            if mean is None:
                mean, var, count = m, v, n
                continue
            delta = m - mean
            total = count + n
            var = (var * count + v * n + delta.square() * (count * n / total)) / total
            mean = mean + delta * (n / total)
            count = total
    return mean, var, count


def update_running_stats(norm: _BatchNorm, mean: Tensor, var: Tensor, count: int) -> None:
    """What one training-mode BatchNorm call on the whole batch does to its running statistics."""
    if not norm.track_running_stats or norm.running_mean is None:
        return
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
        factor = (1.0 / float(norm.num_batches_tracked) if norm.momentum is None
                  else norm.momentum)  # None: a cumulative average, as _BatchNorm.forward does
        norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
        unbiased = var * (count / max(1, count - 1))
        norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), factor)


def block_step_in_slices(block: nn.Module, split: NormSplit, x: Tensor, y: Tensor, slices: int,
                         loss_fn: Callable[[Tensor, Tensor], Tensor]) -> SliceResult:
    """Back-propagate `block`'s mean loss on the batch (x, y) in `slices` micro-batches; the
    gradients it leaves are the whole batch's (module docstring)."""
    n = x.shape[0]
    slices = max(1, min(slices, n))  # a short last batch: no empty slice
    stem, norm, rest = split
    ys = y.tensor_split(slices)
    if norm is None:  # nothing couples the samples: each slice on its own
        return _run_slices(block, nn.Identity(), rest, x.tensor_split(slices), ys, n, loss_fn)
    # A: the stem on the whole batch (it saves only its input), and the norm's statistics
    z = stem(x)
    zs = z.detach().tensor_split(slices)
    mean, var, count = batch_statistics(norm, zs)
    update_running_stats(norm, mean, var, count)
    weight_grad, bias_grad = _grad_or_zero(norm.weight), _grad_or_zero(norm.bias)

    def fixed_norm(h: Tensor) -> Tensor:
        return F.batch_norm(h, mean, var, norm.weight, norm.bias, False, 0.0, norm.eps)

    # B: slice by slice from the stem's output on, the statistics held fixed; each slice's
    # gradient at the stem's output goes into grad_z as soon as it is made
    leaves = [part.detach().requires_grad_(z.requires_grad) for part in zs]
    grad_z = torch.empty_like(z) if z.requires_grad else None
    result = _run_slices(block, fixed_norm, rest, leaves, ys, n, loss_fn,
                         None if grad_z is None else grad_z.tensor_split(slices))
    if grad_z is None:  # a stem without parameters: nothing more to send back
        return result
    # C: the gradient through the batch's mean and variance, added per channel as an affine
    # map of z: scale * (dbeta + (z - mean) * rstd * dgamma) = a + b * z; then into the stem
    dgamma = (norm.weight.grad - weight_grad).to(var.dtype)
    dbeta = (norm.bias.grad - bias_grad).to(var.dtype)
    rstd = torch.rsqrt(var + norm.eps)
    scale = -(norm.weight.detach().to(var.dtype) * rstd) / count
    b = scale * rstd * dgamma
    a = scale * dbeta - b * mean
    shape = (1, -1) + (1,) * (x.dim() - 2)
    a, b = a.view(shape), b.view(shape)
    # added in float32, a slice at a time, and rounded once: in bf16 the terms' separate
    # roundings (they nearly cancel) made the stem's gradient 2.7x as far from float64's
    for out, part in zip(grad_z.tensor_split(slices), zs, strict=True):
        out.copy_(torch.addcmul(a + out.to(var.dtype), b, part.to(var.dtype)))
    z.backward(grad_z)
    return result


def _run_slices(block: nn.Module, norm: Callable[[Tensor], Tensor], rest: nn.Module,
                xs: list[Tensor] | tuple[Tensor, ...], ys: tuple[Tensor, ...], n: int,
                loss_fn: Callable[[Tensor, Tensor], Tensor],
                input_grads: tuple[Tensor, ...] | None = None) -> SliceResult:
    """Each slice through norm -> rest -> the block's head, its share of the batch's mean loss
    back-propagated at once (so one slice's maps are alive at a time); `input_grads`: where
    each slice's gradient at its input goes (the slice's own .grad is then let go)."""
    outputs, losses, correct = [], [], []
    for i, (part, target) in enumerate(zip(xs, ys, strict=True)):
        h = rest(norm(part))
        logits = block.head(h)
        loss = loss_fn(logits, target) * (part.shape[0] / n)
        loss.backward()
        if input_grads is not None:
            input_grads[i].copy_(part.grad)
            part.grad = None
        outputs.append(h.detach())
        losses.append(loss.detach())
        correct.append(correct_count(logits, target))
    return SliceResult(torch.cat(outputs), torch.stack(losses).sum(), torch.stack(correct).sum())


def _grad_or_zero(p: Tensor) -> Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
