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
from celib._options import LossOptions
from celib.errors import InputError
from celib.kernels import _mode, autograd, launch  # none of them imports triton

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


def _cross_entropy(input, target, options: LossOptions, *, return_lse, inplace_backward, loss_dtype):
    """The kernel's path of :func:`celib.cross_entropy`, whose arguments (the target's values included,
    when asked) it takes already checked.

    Rows up to the one-block limit (``launch.block_size``: ``launch.tuning().max_block``, capped lower for
    probability targets and soft-capping) are read once, longer rows twice. A class index outside
    [0, C-1] (possible only with ``check_inputs=False``) gives its row a nan loss and gradient (never a
    finite wrong number, never a read outside the row). Without gradients (``torch.no_grad()``, or
    logits that do not require them) the forward computes none and never writes over the logits.
    """
    if loss_dtype is None:  # PyTorch's: the input's dtype, promoted with a probability target's
        loss_dtype = input.dtype if validate.is_index_target(target) else torch.promote_types(input.dtype,
                                                                                               target.dtype)
    if validate.is_index_target(target):
        if target.dtype not in (torch.int32, torch.int64):
            target = target.long()
    elif target.dtype not in DTYPES:  # float64 probabilities: the kernel reads float32, never rounded lower
        target = target.float()
    # The one-block limit in force now, kept for backward, which may run after a launch.tuned() block ends.
    block = launch.tuning().max_block
    batch_shape = validate.index_target_shape(input)
    if torch.compiler.is_compiling():  # one opaque op (see celib.kernels.autograd)
        if inplace_backward:
            raise InputError("inplace_backward=True is not supported under torch.compile (the compiler must "
                             "see every write); drop it there.")
        t = launch.as_rows(target) if target.is_floating_point() else target
        loss, lse, _, _ = autograd.cross_entropy_op(launch.as_rows(input), t, *options.as_args(), block)
        loss = loss.view(batch_shape) if options.reduction == "none" else loss
        lse = lse.view(batch_shape).detach()
    else:
        if inplace_backward and input.requires_grad and torch.is_grad_enabled():
            _check_overwritable(input)
        loss, lse = autograd.CrossEntropyFunction.apply(input, target, options, inplace_backward, block,
                                                        torch.is_grad_enabled())
    loss = loss.to(loss_dtype)
    return (loss, lse) if return_lse else loss


def _check_overwritable(logits: torch.Tensor) -> None:
    """Refuse logits whose elements share memory (an ``expand``-ed tensor): the gradient written over them
    would be read back by other rows as their logits, a silently wrong loss and gradient."""
    if torch._debug_has_internal_overlap(logits) != 0:  # 1: overlap; 2: too complex to tell
        raise InputError("inplace_backward=True writes the gradient over the logits' memory, and these logits "
                         "have elements that share memory (an expand()-ed or strided view); pass "
                         "logits.contiguous(), or drop inplace_backward.")
