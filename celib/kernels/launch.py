"""Host side of the kernels: shapes, strides, launch configurations, and the three launches."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from celib.errors import InputError

#: Largest block of logits one program holds; longer rows are streamed in blocks of this size.
#: Rows up to this length are read once (forward + backward), longer ones twice. 8192 is the largest
#: block that compiles without spilling registers on sm_80, sm_90a and sm_100a for every feature set:
#: at 16384 a program must hold 16 or more float32 values per thread for z alone, and ptxas spills
#: (64 to 560 bytes per thread at 16 or 32 warps; see ``python -m celib.kernels.compile``).
MAX_BLOCK = 8192


def num_warps(block: int) -> int:
    """Warps per program for a block of ``block`` logits: 4 up to 2048, then one warp per 512 logits
    (16 values of a row per thread; 8192 -> 16 warps).

    Checked by compiling every configuration for sm_80, sm_90a and sm_100a and reading ptxas's
    register report (``tests/test_gpu_compile.py``): none spills. With 4 warps a block of 4096 needed
    225-255 registers per thread (8 warps per SM); with 32 warps ptxas caps a thread at 64 registers.
    """
    return max(4, min(16, block // 512))


@lru_cache(maxsize=None)
def _kernels():
    """The kernels: compiled for GPUs, or, on a machine without CUDA, run by Triton's interpreter.

    Triton chooses between the two when it is first imported (the TRITON_INTERPRET
    variable); ``celib.kernels`` sets that variable when it is imported on a
    machine without a GPU, so nobody has to set it by hand.
    """
    from celib.kernels import kernel  # Triton's mode was chosen when celib.kernels was imported

    return kernel


def interpreted() -> bool:
    """True when the kernels run under Triton's interpreter (on the CPU)."""
    kernel = _kernels()  # first: it decides the mode before triton is imported
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel.forward_kernel, InterpretedFunction)


def block_size(num_classes: int, max_block: int = MAX_BLOCK) -> int:
    """Power-of-two block: the whole row if it fits in ``max_block``, else ``max_block``."""
    return min(triton_next_power_of_2(num_classes), max_block)


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View logits (C,), (N, C) or (N, C, d1, ..., dk) as (N, C, S) without copying when possible."""
    if x.dim() == 1:
        return x.view(1, -1, 1) if x.is_contiguous() else x.reshape(1, -1, 1)
    inner = 1
    for size in x.shape[2:]:
        inner *= size
    return x.reshape(x.shape[0], x.shape[1], inner)


def _quiet(device: torch.device):
    """Under the interpreter (NumPy), silence inf * 0 and log(0) in lanes that tl.where then discards."""
    if device.type == "cpu":
        return np.errstate(invalid="ignore", divide="ignore")
    return contextlib.nullcontext()


def _check_device(logits: torch.Tensor) -> None:
    if not logits.is_cuda and not interpreted():
        raise InputError(
            "CPU tensors need Triton's interpreter, but triton was imported in compiled mode (a GPU is present, "
            "or triton was imported before celib.kernels). Move the tensors to the GPU, or set TRITON_INTERPRET=1 "
            "before importing triton."
        )


def _target_strides(target: torch.Tensor) -> tuple[int, int, int]:
    return (target.stride(0), target.stride(2), target.stride(1)) if target.is_floating_point() else (1, 0, 0)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(N, C, S) strides in the kernels' order: n, s, c."""
    return t.stride(0), t.stride(2), t.stride(1)


@dataclass
class Forward:
    """Results of the forward launch: per-row loss and lse (float32, (N*S,)); per-row statistics for
    the backward launch (float32, (3, N*S): m, log d, coef); the gradient (one-block rows) or None."""

    loss: torch.Tensor
    lse: torch.Tensor
    stats: torch.Tensor
    grad: torch.Tensor | None


def forward(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, grad_scale, compute_grad,
            grad_out=None, max_block=MAX_BLOCK) -> Forward:
    """Run the forward kernel over every row.

    Args:
        logits: (N, C, S) view (see :func:`as_rows`), float16/bfloat16/float32, any strides.
        target: (N*S,) integer class indices, or (N, C, S) probabilities.
        grad_scale: () float32 device tensor multiplying every gradient row (1 / mean's denominator).
        compute_grad: write the gradient now, if the row fits in one block (else backward does).
        grad_out: where to write it ((N, C, S), e.g. the logits themselves); a new tensor if None.
    """
    n, c, s = logits.shape
    rows, device = n * s, logits.device
    _check_device(logits)
    block = block_size(c, max_block)
    single = block >= c
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    stats = torch.empty(3, rows, dtype=torch.float32, device=device)
    grad = None
    if compute_grad and single:
        grad = grad_out if grad_out is not None else torch.empty((n, c, s), dtype=logits.dtype, device=device)
    g = grad if grad is not None else logits  # never written without the gradient
    w = weight.float().contiguous() if weight is not None else loss  # a dummy pointer when unused
    if rows:
        launch_forward = _kernels().forward_kernel[(rows,)]
        with _quiet(device):
            launch_forward(
                logits, *_strides(logits), target, *_target_strides(target), w, g, *_strides(g),
                loss, lse, stats, grad_scale,
                rows, s, c, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0),
                PROB_TARGET=target.is_floating_point(), HAS_WEIGHT=weight is not None,
                HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=grad is not None, BLOCK=block, SINGLE_BLOCK=single,
                num_warps=num_warps(block),
            )
    return Forward(loss, lse, stats, grad)


def backward(logits, target, weight, ignore_index, label_smoothing, softcap, stats, grad_scale, upstream,
             grad_out=None, max_block=MAX_BLOCK) -> torch.Tensor:
    """The gradient of streamed rows: re-read the logits, write grad_scale * upstream * dloss/dz.

    ``upstream`` is a () tensor (mean, sum) or one value per row ((N*S,), reduction="none").
    """
    n, c, s = logits.shape
    rows = n * s
    grad = grad_out if grad_out is not None else torch.empty((n, c, s), dtype=logits.dtype, device=logits.device)
    w = weight.float().contiguous() if weight is not None else stats
    up = upstream.reshape(-1) if upstream.dim() else upstream.reshape(1)
    if rows:
        block = block_size(c, max_block)
        with _quiet(logits.device):
            _kernels().backward_kernel[(rows,)](
                logits, *_strides(logits), target, *_target_strides(target), w, grad, *_strides(grad),
                stats, grad_scale, up, 1 if upstream.dim() else 0,
                rows, s, c, ignore_index, float(label_smoothing), float(softcap or 1.0),
                PROB_TARGET=target.is_floating_point(), HAS_WEIGHT=weight is not None,
                HAS_SOFTCAP=softcap is not None, BLOCK=block, num_warps=num_warps(block),
            )
    return grad


def scale_(grad: torch.Tensor, upstream: torch.Tensor, max_block=MAX_BLOCK) -> torch.Tensor:
    """grad (N, C, S) *= upstream (() or (N*S,)) in place, on the device; no traffic where upstream is 1."""
    n, c, s = grad.shape
    up = upstream.reshape(-1) if upstream.dim() else upstream.reshape(1)
    if n * s:
        block = block_size(c, max_block)
        _kernels().scale_kernel[(n * s,)](grad, *_strides(grad), up, 1 if upstream.dim() else 0, s, c,
                                          BLOCK=block, num_warps=num_warps(block))
    return grad
