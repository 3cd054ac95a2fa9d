"""The reductions celib's own loss code shares (the kernel's autograd, the chunk engine, the
vocabulary-parallel losses, focal losses, z-loss): the weight each position keeps, the mean's
denominator and gradient scale (:func:`mean_scale`), and :func:`reduce`, written once. (The torch
backend of ``cross_entropy`` and ``nll_loss`` is ``torch.nn.functional``'s own reduction.)

A mean whose denominator is 0 has PyTorch's value, the sum divided by 0: nan (0 / 0) for a batch in
which nothing is kept (every target ``ignore_index``, or an empty batch), and +-inf or nan when class
weights (negative ones allowed) sum to 0 over the kept targets. Its gradient here is 0, as PyTorch's is
when nothing is kept; where weights sum to 0, PyTorch's gradient (and so the torch backend's) is inf or
nan.
"""

from __future__ import annotations

import math

import torch

from celib._options import LossOptions

__all__ = ["accumulator", "grad_scale", "kept_weight", "mean_scale", "reduce"]


def kept_weight(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Per position of an index target: ``weight[target]`` (1 without class weights), 0 where ignored.

    A class index outside [0, C-1] (possible only in an unchecked call) reads a clamped index: never out
    of bounds; the loss of that row is the kernel's nan either way.
    """
    kept = target != ignore_index
    if weight is None:
        return kept.to(dtype)
    safe = torch.where(kept, target, torch.zeros_like(target)).clamp(0, weight.shape[0] - 1).long()
    return weight.to(dtype)[safe] * kept


def mean_scale(target: torch.Tensor, options: LossOptions,
               dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(the mean's denominator, the gradient scale 1 / denominator) for ``options.reduction == "mean"``,
    else (None, 1); () tensors in ``dtype`` on the target's device, with no host synchronisation.

    The denominator is the kept weight's sum for index targets (any shape), the number of positions for
    probability targets, which must be at least 2-D with the classes on dim 1: (N, C, d1, ...).
    """
    if options.reduction != "mean":
        return None, torch.ones((), dtype=dtype, device=target.device)
    if target.is_floating_point():
        positions = math.prod(size for dim, size in enumerate(target.shape) if dim != 1)
        denominator = torch.tensor(float(positions), dtype=dtype, device=target.device)
    else:
        denominator = kept_weight(target, options.weight, options.ignore_index, dtype).sum()
    return denominator, grad_scale(denominator)


def grad_scale(denominator: torch.Tensor) -> torch.Tensor:
    """``1 / denominator``, the mean's factor on every gradient row; 0 where the denominator is 0."""
    return torch.where(denominator != 0, 1 / denominator, torch.zeros_like(denominator))


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and denominators are formed in: float32 for half precision, else ``dtype``.

    (A float16 count or sum overflows at 65 504: a mean over more elements would be 0 or nan.)
    """
    return torch.promote_types(dtype, torch.float32)


def reduce(rows: torch.Tensor, reduction: str, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """``rows`` as they are (``"none"``), summed (``"sum"``), or summed and divided by ``denominator``
    (``"mean"``); where it is 0, the sum / 0 (nan or +-inf, as PyTorch) with a zero gradient. A mean is
    formed in :func:`accumulator`'s dtype and returned in the rows' dtype."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    acc = accumulator(rows.dtype)
    total, denominator = rows.sum(dtype=acc), denominator.to(acc)
    nonzero = denominator != 0
    safe = torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, total / safe, (total / denominator).detach()).to(rows.dtype)
