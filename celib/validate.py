"""Argument checks shared by the PyTorch losses and the Triton kernel.

Each check raises :class:`celib.InputError` with a message that says what is
wrong and what to do about it. The cheap checks (shapes, dtypes, option values)
never touch tensor data; :func:`check_target_range` reads the targets and so
synchronises with the device, which is why losses let callers skip it with
``check_inputs=False``.

Only :func:`check_target_range` is public (a user's training loop may want it
on its own); the other checks are celib's front ends' and may change.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from celib._options import LossOptions
from celib.errors import InputError

__all__ = ["check_target_range"]  # the rest are the front ends' own checks, not an API

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    """Raise unless ``reduction`` is one of ``allowed``."""
    if reduction not in allowed:
        raise InputError(
            f"reduction={reduction!r} is not supported; use one of {', '.join(map(repr, allowed))}."
        )


def legacy_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """The reduction PyTorch's deprecated ``size_average`` and ``reduce`` stand for, mapped as PyTorch maps
    them (with its deprecation warning), or ``reduction`` when both are None (the usual case).

    They sit at PyTorch's positions (``cross_entropy(input, target, weight, size_average, ignore_index,
    reduce, reduction, label_smoothing)``), so a call written for PyTorch means the same here. Only a bool
    or None is accepted: anything else there is a mistake (e.g. an ignore_index one place too early).
    """
    for name, value in (("size_average", size_average), ("reduce", reduce)):
        if value is not None and not isinstance(value, bool):
            raise InputError(
                f"{name}={value!r}: {name} is PyTorch's deprecated argument (a bool or None) at this position, "
                f"as in torch.nn.functional; pass the options after weight by keyword, e.g. ignore_index=... "
                f"or reduction=...")
    if size_average is None and reduce is None:
        return reduction
    from torch.nn import _reduction

    return _reduction.legacy_get_string(size_average, reduce)


def check_floating(name: str, tensor: object) -> None:
    """Raise unless ``tensor`` is a floating-point torch tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}; wrap it with torch.as_tensor(...).")
    if not tensor.is_floating_point():
        raise InputError(
            f"{name} must be a floating-point tensor (logits or probabilities), got dtype {tensor.dtype}; "
            f"convert it with {name}.float()."
        )


def check_same_shape(input: torch.Tensor, target: torch.Tensor) -> None:
    """Raise unless ``target`` has exactly the shape of ``input``."""
    if target.shape != input.shape:
        raise InputError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}; "
            f"they must be equal elementwise (no broadcasting)."
        )


def is_index_target(target: torch.Tensor) -> bool:
    """True for class-index targets (integer dtype), False for probability targets."""
    return not target.is_floating_point() and target.dtype != torch.bool


def num_classes(input: torch.Tensor) -> int:
    """C of logits (C,), (N, C) or (N, C, d1, ..., dk): the class dimension is dim 1 (dim 0 for 1-D)."""
    return input.shape[0] if input.dim() == 1 else input.shape[1]


def index_target_shape(input: torch.Tensor) -> tuple[int, ...]:
    """Shape a class-index target must have for logits of shape ``input.shape``.

    (C,) -> (), (N, C) -> (N,), (N, C, d1, ..., dk) -> (N, d1, ..., dk).
    """
    shape = tuple(input.shape)
    return shape[:0] if len(shape) == 1 else shape[:1] + shape[2:]


def check_class_weight(weight: torch.Tensor | None, num_classes: int, input: torch.Tensor) -> None:
    """Raise unless ``weight`` is None or a 1-D float tensor of length C on input's device."""
    if weight is None:
        return
    check_floating("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise InputError(
            f"weight must be a 1-D tensor with one entry per class ({num_classes}), got shape "
            f"{tuple(weight.shape)}."
        )
    if weight.device != input.device:
        raise InputError(f"weight is on {weight.device} but input is on {input.device}; move it with weight.to(input.device).")


def check_classification_args(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: str,
    allow_probabilities: bool,
) -> None:
    """Checks common to cross_entropy, nll_loss and focal_loss (no data is read)."""
    check_floating("input", input)
    if not isinstance(target, torch.Tensor):
        raise InputError(f"target must be a torch.Tensor, got {type(target).__name__}; wrap it with torch.as_tensor(...).")
    check_reduction(reduction)
    if input.dim() == 0:
        raise InputError("input must have a class dimension: shape (C,), (N, C) or (N, C, d1, ..., dk); got a 0-dim tensor.")
    classes = num_classes(input)
    if target.device != input.device:
        raise InputError(f"target is on {target.device} but input is on {input.device}; move it with target.to(input.device).")
    if target.is_floating_point():
        expected = index_target_shape(input)
        if not allow_probabilities:
            raise InputError(
                f"target has dtype {target.dtype} but this loss takes class indices; convert with target.long()."
            )
        if target.shape != input.shape:
            if tuple(target.shape) == expected:
                raise InputError(
                    f"target has shape {tuple(target.shape)} and dtype {target.dtype}: that shape means class indices, "
                    f"which must be an integer tensor; convert with target.long(). (A float target is read as class "
                    f"probabilities and must have the input's shape {tuple(input.shape)}.)"
                )
            raise InputError(
                f"probability target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}."
            )
    else:
        if target.dtype == torch.bool:
            raise InputError("target is a bool tensor; class indices must be integers: use target.long().")
        expected = index_target_shape(input)
        if tuple(target.shape) != expected:
            hint = ""
            if target.shape == input.shape:
                hint = (
                    " It has the input's shape, which looks like a one-hot encoding: pass class indices with "
                    "target.argmax(dim=1), or probabilities with target.float()."
                )
            elif input.dim() >= 3 and tuple(target.shape) == tuple(input.shape[:-1]):
                hint = (
                    f" The class dimension of input looks last: move it to dim 1 with input.movedim(-1, 1), "
                    f"or flatten with input.reshape(-1, {input.shape[-1]}) and target.reshape(-1)."
                )
            raise InputError(
                f"class-index target shape {tuple(target.shape)} does not fit input shape {tuple(input.shape)}: "
                f"expected {expected} (the input's shape without its class dimension, dim {0 if input.dim() == 1 else 1}).{hint}"
            )
    check_class_weight(weight, classes, input)


def check_output_layer(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                       names: tuple[str, str] = ("linear_weight", "linear_bias"),
                       sequences: bool = True) -> None:
    """Checks of an output layer's operands (no data is read): hidden states ``input``, (N, H) or, with
    ``sequences``, (B, T, H); its ``weight`` (V, H) and optional ``bias`` (V,), floating point, of the
    input's dtype and on its device. ``names`` are the weight's and the bias's argument names."""
    w_name, b_name = names
    check_floating("input", input)
    if isinstance(weight, torch.nn.Module):
        raise InputError(f"{w_name} must be the output layer's weight tensor, got a {type(weight).__name__} "
                         f"module; pass its .weight (and .bias as {b_name}).")
    check_floating(w_name, weight)
    if input.dim() not in ((2, 3) if sequences else (2,)):
        shapes = "(N, H) or (B, T, H)" if sequences else "(N, H)"
        raise InputError(f"input must be {shapes} hidden states, got shape {tuple(input.shape)}.")
    if weight.dim() != 2:
        raise InputError(f"{w_name} must be (V, H) (as nn.Linear(H, V).weight), got shape {tuple(weight.shape)}.")
    vocab, hidden = weight.shape
    if input.shape[-1] != hidden:
        transposed = f" It looks transposed: pass {w_name}.T." if vocab == input.shape[-1] else ""
        raise InputError(f"input's hidden size {input.shape[-1]} does not match {w_name} of shape "
                         f"{tuple(weight.shape)}, which expects H = {hidden}.{transposed}")
    operands = [(w_name, weight)]
    if bias is not None:
        check_floating(b_name, bias)
        if tuple(bias.shape) != (vocab,):
            raise InputError(f"{b_name} must have shape ({vocab},), one entry per row of {w_name}; got "
                             f"{tuple(bias.shape)}.")
        operands.append((b_name, bias))
    for name, t in operands:
        if t.dtype != input.dtype:
            raise InputError(f"input is {input.dtype} but {name} is {t.dtype}; cast one of them "
                             f"(e.g. {name}.to(input.dtype)).")
        if t.device != input.device:
            raise InputError(f"{name} is on {t.device} but input is on {input.device}; move it with "
                             f".to(input.device).")


def check_loss_dtype(loss_dtype: object) -> None:
    """Raise unless ``loss_dtype`` is None or a floating-point ``torch.dtype`` (a loss needs a gradient)."""
    if loss_dtype is not None and not (isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point):
        raise InputError(f"loss_dtype must be a floating-point torch.dtype (e.g. torch.float32) or None, got "
                         f"{loss_dtype!r}.")


def _check_real(name: str, value: object) -> None:
    """Raise unless ``value`` is a real number (not a bool, a string or None): every backend reads it alike."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}; convert it first (e.g. float(...)).")


def check_label_smoothing(label_smoothing: float) -> None:
    """Raise unless 0 <= label_smoothing <= 1."""
    _check_real("label_smoothing", label_smoothing)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise InputError(f"label_smoothing must lie in [0, 1], got {label_smoothing}.")


def cross_entropy_options(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> LossOptions:
    """All shape, dtype and option checks of :func:`celib.cross_entropy` (no data is read); the options."""
    check_classification_args(input, target, weight, reduction, allow_probabilities=True)
    return loss_options(weight, ignore_index, reduction, label_smoothing, z_loss, softcap)


def check_extras(z_loss: float, softcap: float | None) -> None:
    """Raise unless z_loss >= 0 and softcap is None or positive (the LLM options of cross_entropy)."""
    _check_real("z_loss", z_loss)
    if softcap is not None:
        _check_real("softcap", softcap)
        if not 0 < float(softcap) < math.inf:
            raise InputError(f"softcap must be a positive finite number or None, got {softcap}.")
    if not 0 <= float(z_loss) < math.inf:  # nan and inf included
        raise InputError(f"z_loss must be a finite number >= 0, got {z_loss}.")


def loss_options(weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None) -> LossOptions:
    """The checked options of one call, as the :class:`~celib._options.LossOptions` every backend takes.

    Checks the option values (not their fit to a tensor: the class weight's shape is checked with the
    input, by :func:`check_class_weight`) and normalises the numbers to Python floats.
    """
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    if isinstance(ignore_index, bool):
        raise InputError(f"ignore_index must be an int, got {ignore_index!r}.")
    try:
        ignore_index = operator.index(ignore_index)  # any integer type (numpy's too), as PyTorch
    except TypeError:
        raise InputError(f"ignore_index must be an int, got {ignore_index!r}.") from None
    check_extras(z_loss, softcap)
    return LossOptions(weight, ignore_index, reduction, float(label_smoothing), float(z_loss),
                       None if softcap is None else float(softcap))


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise if an index target holds a class outside [0, C-1] other than ``ignore_index``.

    Reads the target (a device synchronisation on GPU). Probability targets are
    not checked. Under ``torch.compile`` the check is skipped: reading a value on
    the host would break the graph. There, PyTorch's own CPU kernels still raise
    for an out-of-range index, and celib's Triton kernel never reads outside a
    row (a wrong index gives a meaningless loss); check the targets in eager mode,
    e.g. with :func:`celib.diagnose` on the first batch.
    """
    if torch.compiler.is_compiling() or not is_index_target(target) or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        value = int(target[position])
        raise InputError(
            f"target holds class index {value} at position {position}, outside [0, {num_classes - 1}] for "
            f"{num_classes} classes (and not ignore_index={ignore_index}). Check the label encoding "
            f"(labels starting at 1? a padding value?) or the number of outputs of the model; mark positions to "
            f"skip with ignore_index."
        )


def check_probabilities(name: str, tensor: torch.Tensor, fix: str) -> None:
    """Raise unless every element of ``tensor`` lies in [0, 1] (reads the data, so skipped under
    ``torch.compile``); ``fix`` ends the message."""
    if torch.compiler.is_compiling():
        return
    nan = torch.isnan(tensor)
    if tensor.numel() and bool(((tensor < 0) | (tensor > 1) | nan).any()):
        found = "NaN" if bool(nan.any()) else f"values in [{float(tensor.min()):.4g}, {float(tensor.max()):.4g}]"
        raise InputError(f"{name} must hold probabilities in [0, 1], found {found}. {fix}")
