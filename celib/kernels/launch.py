"""Host side of the kernel: shapes, strides, the mean's denominator, and the launch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from celib.errors import InputError

#: Largest block of logits one program holds; longer rows are streamed in blocks of this size.
MAX_BLOCK = 8192


@lru_cache(maxsize=None)
def _kernel():
    """The kernel: compiled for GPUs, or, on a machine without CUDA, run by Triton's interpreter.

    Triton chooses between the two when it is first imported (the TRITON_INTERPRET
    variable); ``celib.kernels`` sets that variable when it is imported on a
    machine without a GPU, so nobody has to set it by hand.
    """
    from celib.kernels.kernel import cross_entropy_kernel  # Triton's mode was chosen when celib.kernels was imported

    return cross_entropy_kernel


def interpreted() -> bool:
    """True when the kernel runs under Triton's interpreter (on the CPU)."""
    kernel = _kernel()  # first: it decides the mode before triton is imported
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def block_size(num_classes: int, max_block: int = MAX_BLOCK) -> int:
    """Power-of-two block: the whole row if it fits in ``max_block``, else ``max_block``."""
    return min(triton_next_power_of_2(num_classes), max_block)


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass
class Launch:
    """Results of one kernel launch: per-row loss and lse (float32, (N*S,)), the gradient (or None)."""

    loss: torch.Tensor
    lse: torch.Tensor
    grad: torch.Tensor | None


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View logits (C,), (N, C) or (N, C, d1, ..., dk) as (N, C, S) without copying when possible."""
    if x.dim() == 1:
        return x.view(1, -1, 1) if x.is_contiguous() else x.reshape(1, -1, 1)
    inner = 1
    for size in x.shape[2:]:
        inner *= size
    return x.reshape(x.shape[0], x.shape[1], inner)


def launch(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: torch.Tensor,
    compute_grad: bool,
    grad_out: torch.Tensor | None = None,
    max_block: int = MAX_BLOCK,
) -> Launch:
    """Run the kernel once over every row.

    Args:
        logits: (N, C, S) view (see :func:`as_rows`), float16/bfloat16/float32, any strides.
        target: (N*S,) integer class indices, or (N, C, S) probabilities.
        grad_scale: () float32 device tensor multiplying every gradient row (1 / mean's denominator).
        grad_out: where to write the gradient ((N, C, S), e.g. the logits themselves); a new
            tensor if None.
    """
    n, c, s = logits.shape
    rows = n * s
    device = logits.device
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    grad = None
    if compute_grad:
        grad = grad_out if grad_out is not None else torch.empty((n, c, s), dtype=logits.dtype, device=device)
    prob = target.is_floating_point()
    t_strides = (target.stride(0), target.stride(2), target.stride(1)) if prob else (1, 0, 0)
    g = grad if grad is not None else logits  # never written when compute_grad is False
    block = block_size(c, max_block)
    kernel = _kernel()
    if not logits.is_cuda and not interpreted():
        raise InputError(
            "CPU tensors need Triton's interpreter, but triton was imported in compiled mode (a GPU is present, "
            "or triton was imported before celib.kernels). Move the tensors to the GPU, or set TRITON_INTERPRET=1 "
            "before importing triton."
        )
    w = weight.float().contiguous() if weight is not None else loss  # a dummy pointer when unused
    if rows:
        kernel[(rows,)](
            logits, logits.stride(0), logits.stride(2), logits.stride(1),
            target, *t_strides,
            w,
            g, g.stride(0), g.stride(2), g.stride(1),
            loss, lse, grad_scale,
            s, c, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0),
            PROB_TARGET=prob, HAS_WEIGHT=weight is not None, HAS_SOFTCAP=softcap is not None,
            COMPUTE_GRAD=compute_grad, BLOCK=block, SINGLE_BLOCK=block >= c,
        )
    return Launch(loss, lse, grad)
