"""Online (streaming) softmax in NumPy: the algorithm the fused kernel runs, one block at a time.

A row of logits is read in blocks. After each block we know the maximum m of
what we have seen and the sum s of exp(z - m) over it. When a new block raises
the maximum from m to m', the old sum is rescaled by exp(m - m'), so one pass
gives log-sum-exp = m + log s (Milakov and Gimelshein, 2018). The loss of a
class-index target follows from the same pass; its gradient softmax - one_hot
needs the final m and s, so it is written in a second sweep over the row
(which a GPU kernel does from registers when the row fits in one block).

The loop runs over blocks, vectorised over rows: this is a teaching model of
the kernel, checked against :mod:`celib.ref` and PyTorch, not a fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["StreamTrace", "streaming_cross_entropy", "streaming_logsumexp"]


@dataclass
class StreamTrace:
    """What the streaming pass held after each block (arrays of shape (num_blocks, N))."""

    block_max: np.ndarray
    running_max: np.ndarray
    running_sum: np.ndarray


def streaming_logsumexp(
    z: ArrayLike, block_size: int
) -> tuple[np.ndarray, StreamTrace]:
    """Log-sum-exp of each row of ``z`` (N, C), reading each row once, in
    blocks of ``block_size``.

    Returns the (N,) log-sum-exp and the running statistics after each
    block.
    """
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    n, c = z.shape
    m = np.full(n, -np.inf)  # running max
    s = np.zeros(n)  # running sum of exp(z - m)
    trace = StreamTrace(*(np.empty((0, n)) for _ in range(3)))
    for start in range(0, c, block_size):
        block = z[:, start : start + block_size]
        block_max = block.max(axis=1)
        new_m = np.maximum(m, block_max)
        # While a row has seen only -inf, exp(-inf - (-inf)) would be nan:
        # shift by 0 there instead (every term is then exp(-inf) = 0).
        shift = np.where(new_m == -np.inf, 0.0, new_m)
        # rescale what we had to the new max, then add this block's terms
        terms = np.exp(block - shift[:, None]).sum(axis=1)
        s = s * np.exp(m - shift) + terms
        m = new_m
        trace.block_max = np.vstack([trace.block_max, block_max])
        trace.running_max = np.vstack([trace.running_max, m])
        trace.running_sum = np.vstack([trace.running_sum, s])
    with np.errstate(divide="ignore"):  # a row of -inf only: log 0 = -inf
        return m + np.log(s), trace


def streaming_cross_entropy(
    z: ArrayLike, target: ArrayLike, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row cross-entropy and its gradient, as the fused kernel does it.

    Pass 1 streams the blocks for log-sum-exp (the target's logit is
    one load by index, here as in the kernel);
    pass 2 writes the gradient softmax - one_hot block by block (p - 1 at
    the target, formed before any rounding to a smaller dtype).

    Args:
        z: (N, C) logits. target: (N,) class indices.
    Returns:
        loss (N,) and gradient (N, C) of the summed loss.
    """
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    target = np.asarray(target).reshape(-1)
    n, c = z.shape
    rows = np.arange(n)
    lse, _ = streaming_logsumexp(z, block_size)
    target_logit = z[rows, target]
    grad = np.empty_like(z)
    for start in range(0, c, block_size):
        cols = np.arange(start, min(start + block_size, c))
        p = np.exp(z[:, cols] - lse[:, None])
        p -= cols[None, :] == target[:, None]  # 1 off at the target class
        grad[:, cols] = p
    return lse - target_logit, grad
