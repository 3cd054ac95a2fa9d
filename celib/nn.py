"""``torch.nn``-style modules wrapping :mod:`celib.functional`."""

from __future__ import annotations

import torch
from torch import nn

from celib import functional, validate
from celib.linear import linear_cross_entropy

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss", "FocalLoss", "LinearCrossEntropyLoss"]


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`celib.cross_entropy`; mirrors :class:`torch.nn.CrossEntropyLoss`.

    PyTorch's arguments in PyTorch's positions (the deprecated ``size_average``
    and ``reduce`` included), then every keyword-only option of
    :func:`celib.cross_entropy`. ``weight`` (shape (C,)) is registered as a
    buffer, so ``.to(device)`` moves it.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        backend: str = "auto",
        check_inputs: bool = True,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_lse: bool = False,
        inplace_backward: bool = False,
        loss_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = validate.legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.backend = backend
        self.check_inputs = check_inputs
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.loss_dtype = loss_dtype

    def forward(self, input: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The loss, or ``(loss, lse)`` with ``return_lse=True`` (see :func:`celib.cross_entropy`)."""
        return functional.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            backend=self.backend,
            check_inputs=self.check_inputs,
            z_loss=self.z_loss,
            softcap=self.softcap,
            return_lse=self.return_lse,
            inplace_backward=self.inplace_backward,
            loss_dtype=self.loss_dtype,
        )


class BCEWithLogitsLoss(nn.Module):
    """Module form of :func:`celib.binary_cross_entropy_with_logits`; mirrors :class:`torch.nn.BCEWithLogitsLoss`
    (its arguments in its positions, the deprecated ``size_average``/``reduce`` included)."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        pos_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = validate.legacy_reduction(size_average, reduce, reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )


class FocalLoss(nn.Module):
    """Module form of :func:`celib.focal_loss` (multi-class softmax focal loss): the class ``weight`` first, as
    in :class:`CrossEntropyLoss`, the other options keyword-only."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        *,
        gamma: float = 2.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.focal_loss(input, target, self.weight, gamma=self.gamma, ignore_index=self.ignore_index,
                                     reduction=self.reduction)


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`celib.linear_cross_entropy`: ``loss(input, linear_weight, target, linear_bias=None)``.

    It holds the loss options (and the class ``weight`` as a buffer), not the linear layer: pass the
    output layer's weight (e.g. ``lm_head.weight``) at each call, so the layer stays where the model has it.
    """

    def __init__(self, weight: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                 chunk_size: int | None = None, chunk_memory: int | None = None, backend: str = "auto",
                 check_inputs: bool = True, loss_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.chunk_size, self.chunk_memory = z_loss, softcap, chunk_size, chunk_memory
        self.backend, self.check_inputs, self.loss_dtype = backend, check_inputs, loss_dtype

    def forward(self, input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                linear_bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            softcap=self.softcap, chunk_size=self.chunk_size, chunk_memory=self.chunk_memory, backend=self.backend,
            check_inputs=self.check_inputs, loss_dtype=self.loss_dtype,
        )
