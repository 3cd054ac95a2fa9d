"""What a cross-entropy call computes, as one value: :class:`LossOptions`.

Built once per call by :func:`celib.validate.loss_options` (after the checks),
then passed whole to the Triton launches of :mod:`celib.kernels.launch`, the
row losses of the chunk engine (:mod:`celib._chunks`) and the vocabulary-parallel
losses. (``celib.cross_entropy``'s PyTorch path passes its arguments to
``F.cross_entropy`` as they are.) It is also the one place the kernel's
compile-time flags are derived (:meth:`LossOptions.kernel_flags`).

``torch.library`` ops take only tensors and scalars, so an op's signature lists
the fields in the dataclass's order: :meth:`LossOptions.as_args` flattens,
``LossOptions(*args)`` rebuilds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["LossOptions"]


@dataclass(frozen=True, eq=False)
class LossOptions:
    """The options of one cross-entropy call, checked (see :func:`celib.cross_entropy`).

    Attributes:
        weight: class weights, (C,) float, or None.
        ignore_index: the index target value that contributes no loss and no gradient.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        label_smoothing: in [0, 1].
        z_loss: >= 0, the coefficient of ``lse**2``.
        softcap: > 0 or None; logits become ``softcap * tanh(logits / softcap)``.
    """

    weight: torch.Tensor | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None

    def as_args(self) -> tuple:
        """The fields in order, for a ``torch.library`` op's arguments."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def replace(self, **changes) -> LossOptions:
        """A copy with ``changes`` (e.g. the class weight cast to the accumulation dtype)."""
        return dataclasses.replace(self, **changes)

    def kernel_flags(self, probability_target: bool) -> dict[str, bool]:
        """The Triton kernels' compile-time flags for these options, one name per idea.

        ``HAS_CLASS_MASS``: per-class factors in the loss (probability targets or smoothing).
        """
        smoothing = self.label_smoothing != 0.0
        return dict(PROB_TARGET=probability_target, HAS_WEIGHT=self.weight is not None,
                    HAS_SMOOTHING=smoothing, HAS_SOFTCAP=self.softcap is not None,
                    HAS_CLASS_MASS=probability_target or smoothing, HAS_Z_LOSS=self.z_loss != 0.0)

    def kernel_scalars(self) -> dict[str, float | int]:
        """The options the kernels read at run time, by their argument names."""
        return dict(ignore_index=self.ignore_index, smoothing=self.label_smoothing,
                    z_loss=self.z_loss, softcap=1.0 if self.softcap is None else self.softcap)
