"""``torch.nn``-style modules wrapping :mod:`celib.functional`."""

from __future__ import annotations

import torch
from torch import nn

from celib import functional

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss", "FocalLoss", "LinearCrossEntropyLoss"]


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`celib.cross_entropy`; mirrors :class:`torch.nn.CrossEntropyLoss`.

    ``weight`` (shape (C,)) is registered as a buffer, so ``.to(device)`` moves it.
    The keyword-only options are passed through to :func:`celib.cross_entropy`.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        backend: str = "auto",
        check_inputs: bool = True,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.backend = backend
        self.check_inputs = check_inputs
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            backend=self.backend,
            check_inputs=self.check_inputs,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )


class BCEWithLogitsLoss(nn.Module):
    """Module form of :func:`celib.binary_cross_entropy_with_logits`; mirrors :class:`torch.nn.BCEWithLogitsLoss`."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        pos_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )


class FocalLoss(nn.Module):
    """Module form of :func:`celib.focal_loss` (multi-class softmax focal loss)."""

    def __init__(
        self,
        gamma: float = 2.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.focal_loss(input, target, self.gamma, self.weight, self.ignore_index, self.reduction)


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`celib.linear_cross_entropy`: ``loss(input, linear_weight, target, linear_bias=None)``.

    It holds the loss options (and the class ``weight`` as a buffer), not the linear layer: pass the
    output layer's weight (e.g. ``lm_head.weight``) at each call, so the layer stays where the model has it.
    """

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None,
                 chunk_size: int | None = None, backend: str = "auto", check_inputs: bool = True) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.chunk_size = z_loss, softcap, chunk_size
        self.backend, self.check_inputs = backend, check_inputs

    def forward(self, input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                linear_bias: torch.Tensor | None = None) -> torch.Tensor:
        from celib.linear import linear_cross_entropy

        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            softcap=self.softcap, chunk_size=self.chunk_size, backend=self.backend, check_inputs=self.check_inputs,
        )
