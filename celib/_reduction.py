"""The reductions every loss of celib shares: the weight each position keeps, the mean's denominator, and
:func:`reduce`, written once.

One convention for a batch in which nothing is kept (every target ``ignore_index``, an empty batch, or
class weights that sum to 0 over the kept targets), PyTorch's: the mean is nan (0 / 0) and every gradient
is 0.
"""

from __future__ import annotations

import torch


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


def grad_scale(denominator: torch.Tensor) -> torch.Tensor:
    """``1 / denominator``, the mean's factor on every gradient row; 0 where the denominator is 0."""
    return torch.where(denominator != 0, 1 / denominator, torch.zeros_like(denominator))


def reduce(rows: torch.Tensor, reduction: str, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """``rows`` as they are (``"none"``), summed (``"sum"``), or summed and divided by ``denominator``
    (``"mean"``): nan where it is 0, with a zero gradient (``torch.where``, not an ``inf * 0``)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    nonzero = denominator != 0
    safe = torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, total / safe, torch.full_like(total, float("nan")))
