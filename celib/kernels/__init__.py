"""celib's fused softmax-cross-entropy kernel, in Triton, reached through ``celib.cross_entropy(...,
backend="triton")`` (and ``"auto"`` on a GPU) and :func:`celib.linear_cross_entropy`.

One job per module: :mod:`~celib.kernels.kernel` the Triton kernels,
:mod:`~celib.kernels.launch` the host side (shapes, strides, the launch choices),
:mod:`~celib.kernels.autograd` the autograd Function and the ``torch.compile`` op,
``_mode`` compiled or interpreted; this module the entry point the functional API
calls. Instruments (the traffic meter, the compiled-resources table) live in
:mod:`celib.kernels.tools`, which the runtime never imports.

Importing this package does not import triton: :func:`available` says whether it
can run. On CUDA tensors the compiled kernel runs; on a machine without a GPU the
same kernel runs under Triton's interpreter (slow, for testing and teaching),
which this package selects when it is imported (see ``celib/kernels/_mode.py``
for why and how).
"""

from __future__ import annotations

import importlib.util

import torch

from celib import validate
from celib.errors import InputError
from celib.kernels import _mode

__all__ = ["DTYPES", "available"]

#: Logit dtypes the kernel takes (it accumulates in float32).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_mode.prefer_interpreter_without_gpu()


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as absent
        return False


_TRITON = _find_triton()  # looked up once: torch.compile can then trace available()


def available() -> bool:
    """True when the triton package can be imported."""
    return _TRITON


def _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, *, z_loss, softcap,
                   return_lse, inplace_backward, loss_dtype, check_inputs):
    """The kernel's path of :func:`celib.cross_entropy`, whose arguments it takes already checked.

    Rows up to the one-block limit (``launch.block_size``: ``launch.tuning().max_block``, capped lower for
    probability targets and soft-capping) are read once, longer rows twice.
    With ``check_inputs`` a class index outside [0, C-1] raises :class:`celib.InputError` (one host
    synchronisation); without it the call never synchronises, and such a row's loss and gradient are
    nan (never a finite wrong number, never a read outside the row).
    """
    from celib.kernels import launch

    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if validate.is_index_target(target):
        if check_inputs:
            validate.check_target_range(target, num_classes, ignore_index)
        if target.dtype not in (torch.int32, torch.int64):
            target = target.long()
    elif target.dtype != input.dtype and target.dtype not in DTYPES:
        target = target.to(input.dtype)
    if weight is not None:
        weight = weight.to(device=input.device)
    block = launch.tuning().max_block  # fixed now: backward may run after a launch.tuned() block has ended
    options = (ignore_index, reduction, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap))
    if torch.compiler.is_compiling():
        loss, lse = _compiled(input, target, weight, *options, inplace_backward, block)
    else:
        from celib.kernels.autograd import CrossEntropyFunction

        loss, lse = CrossEntropyFunction.apply(input, target, weight, *options, inplace_backward, block)
    loss = loss.to(loss_dtype or input.dtype)
    return (loss, lse) if return_lse else loss


def _compiled(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, inplace_backward,
              block):
    """The path under torch.compile: one opaque op, ``celib::cross_entropy`` (see celib.kernels.autograd)."""
    from celib.kernels.autograd import cross_entropy_op
    from celib.kernels.launch import as_rows

    if inplace_backward:
        raise InputError("inplace_backward=True is not supported under torch.compile (the compiler must see "
                         "every write); drop it there.")
    target = as_rows(target) if target.is_floating_point() else target
    loss, lse, _, _ = cross_entropy_op(as_rows(input), target, weight, ignore_index, reduction, label_smoothing,
                                       z_loss, softcap, block)
    batch_shape = validate.index_target_shape(input)
    return (loss.view(batch_shape) if reduction == "none" else loss), lse.view(batch_shape).detach()
