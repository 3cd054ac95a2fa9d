"""celib's fused softmax-cross-entropy kernel, written in Triton.

Structure, one job per module: :mod:`~celib.kernels.kernel` holds the Triton
kernel, :mod:`~celib.kernels.launch` the host-side launcher,
:mod:`~celib.kernels.autograd` the ``torch.autograd.Function``, and
:mod:`~celib.kernels.meter` a memory-traffic meter; this module holds the
public functions and the ``nn.Module``.

Importing this package does not import triton: :func:`available` says whether
it can run. On CUDA tensors the compiled kernel runs; on a machine without a
GPU the same kernel runs under Triton's interpreter (slow, for testing and
teaching), which this package selects when it is imported (``import celib``
does), unless triton was imported before it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import nn

from celib import validate
from celib.errors import InputError

#: Logit dtypes the kernel takes (it accumulates in float32).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _prefer_interpreter_without_gpu() -> None:
    """On a machine without a GPU, ask Triton for its interpreter before anything imports triton.

    Triton fixes its mode (compiled or interpreted) when it is first imported,
    from the TRITON_INTERPRET variable; without a GPU the compiled mode cannot
    run at all. PyTorch itself imports triton lazily (for example on the first
    optimizer step), so celib sets the variable when it is imported, not when
    the kernel is first used. A value the user set is left alone.
    """
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_prefer_interpreter_without_gpu()


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as absent
        return False


_TRITON = _find_triton()  # looked up once: torch.compile can then trace available()


def available() -> bool:
    """True when the triton package can be imported."""
    return _TRITON


def applies(input: torch.Tensor, target: torch.Tensor) -> bool:
    """True when ``backend="auto"`` should use the kernel: a CUDA tensor of a supported dtype, triton installed."""
    return bool(input.is_cuda and input.dtype in DTYPES and input.dim() >= 1 and available())


def _require_triton() -> None:
    if not available():
        raise ImportError(
            "backend='triton' needs the triton package, which is not installed (it exists for Linux): "
            "pip install 'triton>=3.6', or reinstall celib from its source tree with the extra, "
            "pip install '.[triton]' (not 'celib' from the package index: that name belongs to another "
            "project). Use backend='torch' (or 'auto') instead."
        )
    from celib._versions import check_triton

    check_triton()


def triton_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    loss_dtype: torch.dtype | None = None,
    check_inputs: bool = True,
    max_block: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy computed by the fused kernel; the semantics of :func:`celib.cross_entropy`.

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ..., dk), float16, bfloat16 or
            float32, any strides; CUDA (compiled kernel) or CPU (interpreter).
        target: class indices (int64 or int32) of the batch shape, or
            probabilities of the input's shape.
        weight: as in :func:`celib.cross_entropy`.
        ignore_index: as in :func:`celib.cross_entropy`.
        reduction: as in :func:`celib.cross_entropy`.
        label_smoothing: as in :func:`celib.cross_entropy`.
        z_loss: as in :func:`celib.cross_entropy`.
        softcap: as in :func:`celib.cross_entropy`.
        return_lse: as in :func:`celib.cross_entropy`.
        loss_dtype: as in :func:`celib.cross_entropy`.
        inplace_backward: write the gradient over the logits' storage, so the
            extra memory is O(N) instead of O(N C). The logits' values are
            destroyed by the forward pass, and backward can run only once.
        check_inputs: raise :class:`celib.InputError` for a class index outside
            [0, C-1]: one host synchronisation per call (a reduction of the N
            targets read with ``bool()``). With ``False`` the call never
            synchronises, and a wrong index gives that row a nan loss and
            gradient (never a finite wrong number, never a read outside the row).
        max_block: largest block of logits per program (a power of two; default
            :data:`celib.kernels.launch.MAX_BLOCK`, 16384, or 8192 with
            probability targets or soft-capping). Rows longer than this are
            streamed, reading each logit twice.

    Raises:
        ImportError: triton is not installed.
        InputError: invalid arguments, as :func:`celib.cross_entropy`.
    """
    _require_triton()
    from celib.kernels.launch import MAX_BLOCK

    validate.check_cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing)
    if input.dtype not in DTYPES:
        raise InputError(
            f"the Triton kernel takes float16, bfloat16 or float32 logits, got {input.dtype}; "
            f"use backend='torch' for {input.dtype}."
        )
    validate.check_extras(z_loss, softcap)
    block = MAX_BLOCK if max_block is None else int(max_block)
    if block < 1 or block & (block - 1):
        raise InputError(f"max_block must be a power of two, got {max_block}.")
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
    batch_shape = input.shape[:0] if input.dim() == 1 else input.shape[:1] + input.shape[2:]
    return (loss.view(batch_shape) if reduction == "none" else loss), lse.view(batch_shape)


class TritonCrossEntropyLoss(nn.Module):
    """Module form of :func:`triton_cross_entropy` (mirrors :class:`torch.nn.CrossEntropyLoss`)."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None,
                 inplace_backward: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.inplace_backward = z_loss, softcap, inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return triton_cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, inplace_backward=self.inplace_backward,
        )


def traffic(input: torch.Tensor, target: torch.Tensor, *, backward: bool = True, upstream: float = 1.0,
            max_block: int | None = None, **kwargs):
    """Count the memory traffic of one call, end to end, under Triton's interpreter (CPU tensors).

    Runs ``triton_cross_entropy(input, target, **kwargs)`` and, with ``backward=True``,
    ``(loss * upstream).backward()`` (with ``upstream=1.0`` that is the usual ``loss.backward()``;
    for ``reduction="none"``, ``loss.backward(torch.full_like(loss, upstream))``), and counts every
    element the kernels load and store plus every element PyTorch operators outside the kernels
    read or write of N x C tensors. ``backward=False`` runs the forward only, under ``torch.no_grad()``
    (evaluation). Returns a :class:`celib.kernels.meter.Traffic`.
    """
    _require_triton()
    from celib.kernels.launch import MAX_BLOCK, as_rows, block_size, interpreted

    if input.is_cuda or not interpreted():  # interpreted() also picks Triton's mode before triton is imported
        raise InputError("the traffic meter counts under Triton's interpreter: pass CPU tensors, on a machine "
                         "without a GPU (or with TRITON_INTERPRET=1 set before triton is imported).")
    from celib.kernels.meter import measure

    x = input.detach().clone().requires_grad_(backward)
    block = block_size(input.shape[0] if input.dim() == 1 else input.shape[1], max_block or MAX_BLOCK,
                       probability_target=target.is_floating_point(), softcap=kwargs.get("softcap") is not None)

    def run():
        if not backward:
            with torch.no_grad():
                triton_cross_entropy(x, target, max_block=max_block, **kwargs)
            return x, None
        loss = triton_cross_entropy(x, target, max_block=max_block, **kwargs)
        up = torch.full_like(loss, upstream)  # the gradient of (loss * upstream).sum() w.r.t. loss
        loss.backward(up)
        return x, x.grad

    return measure(run, as_rows(x), block)


__all__ = ["DTYPES", "TritonCrossEntropyLoss", "applies", "available", "traffic", "triton_cross_entropy"]
