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


def available() -> bool:
    """True when the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def applies(input: torch.Tensor, target: torch.Tensor) -> bool:
    """True when ``backend="auto"`` should use the kernel: a CUDA tensor of a supported dtype, triton installed."""
    return bool(input.is_cuda and input.dtype in DTYPES and input.dim() >= 1 and available())


def _require_triton() -> None:
    if not available():
        raise ImportError(
            "backend='triton' needs the triton package, which is not installed (it exists for Linux: "
            "pip install 'celib[triton]'). Use backend='torch' (or 'auto') instead."
        )


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
        weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        return_lse, loss_dtype: as in :func:`celib.cross_entropy`.
        inplace_backward: write the gradient over the logits' storage, so the
            extra memory is O(N) instead of O(N C). The logits' values are
            destroyed by the forward pass, and backward can run only once.
        check_inputs: raise :class:`celib.InputError` for a class index outside
            [0, C-1] (synchronises with the device). With ``False`` a wrong
            index gives a meaningless loss but no out-of-bounds access.
        max_block: largest block of logits per program (a power of two; default
            :data:`celib.kernels.launch.MAX_BLOCK`). Rows longer than this are
            streamed, reading each logit twice.

    Raises:
        ImportError: triton is not installed.
        InputError: invalid arguments, as :func:`celib.cross_entropy`.
    """
    _require_triton()
    from celib.kernels.autograd import CrossEntropyFunction
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
    loss, lse = CrossEntropyFunction.apply(
        input, target, weight, ignore_index, reduction, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), inplace_backward, loss_dtype, block,
    )
    return (loss, lse) if return_lse else loss


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


def traffic(input: torch.Tensor, target: torch.Tensor, *, max_block: int | None = None, **kwargs):
    """Run the kernel once (forward with gradient) on CPU tensors under the interpreter and count
    the elements it loads and stores. Returns a :class:`celib.kernels.meter.Traffic`.

    ``kwargs`` are those of :func:`triton_cross_entropy` (weight=..., label_smoothing=..., ...).
    """
    _require_triton()
    from celib.kernels.launch import MAX_BLOCK, as_rows, block_size, interpreted

    if input.is_cuda or not interpreted():  # interpreted() also picks Triton's mode before triton is imported
        raise InputError("the traffic meter counts under Triton's interpreter: pass CPU tensors, on a machine "
                         "without a GPU (or with TRITON_INTERPRET=1 set before triton is imported).")
    from celib.kernels.meter import measure

    x = input.detach().clone().requires_grad_(True)
    block = block_size(input.shape[0] if input.dim() == 1 else input.shape[1], max_block or MAX_BLOCK)

    def run():
        from celib.kernels import autograd

        grads = {}
        original = autograd.launch

        def capture(*args, **kw):
            out = original(*args, **kw)
            grads["grad"] = out.grad
            return out

        autograd.launch = capture
        try:
            triton_cross_entropy(x, target, max_block=max_block, **kwargs)
        finally:
            autograd.launch = original
        return x, grads.get("grad")

    return measure(run, as_rows(x), block)


__all__ = ["DTYPES", "TritonCrossEntropyLoss", "applies", "available", "traffic", "triton_cross_entropy"]
