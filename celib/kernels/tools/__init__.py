"""Instruments for celib's kernels, apart from the runtime (which never imports them).

- :func:`traffic` counts the memory traffic of one cross-entropy call, forward
  and backward, end to end (:mod:`celib.kernels.tools.meter`);
- :mod:`celib.kernels.tools.resources` compiles each launch for real GPUs
  without one and reads registers, spills and SASS instructions.

Both depend on Triton internals; they are tested with the pinned Triton and the
oldest supported one.
"""

from __future__ import annotations

import contextlib

import torch

from celib.errors import InputError
from celib.kernels.tools.meter import Traffic

__all__ = ["Traffic", "traffic"]


def traffic(input: torch.Tensor, target: torch.Tensor, *, backward: bool = True, upstream: float = 1.0,
            max_block: int | None = None, **kwargs) -> Traffic:
    """Count the memory traffic of one call, end to end, under Triton's interpreter (CPU tensors).

    Runs ``celib.cross_entropy(input, target, backend="triton", **kwargs)`` (with the one-block
    limit ``max_block`` if given) and, with ``backward=True``, ``(loss * upstream).backward()``
    (with ``upstream=1.0`` that is the usual ``loss.backward()``; for ``reduction="none"``,
    ``loss.backward(torch.full_like(loss, upstream))``), and counts every element the kernels load
    and store plus every element PyTorch operators outside the kernels read or write of N x C
    tensors. ``backward=False`` runs the forward only, under ``torch.no_grad()`` (evaluation).
    """
    from celib import functional
    from celib.kernels import _mode, launch
    from celib.kernels.tools.meter import measure

    if input.is_cuda or not _mode.interpreted():
        raise InputError("the traffic meter counts under Triton's interpreter: pass CPU tensors, on a machine "
                         "without a GPU (or with TRITON_INTERPRET=1 set before triton is imported).")
    x = input.detach().clone().requires_grad_(backward)

    def limit():
        return launch.tuned(max_block=max_block) if max_block else contextlib.nullcontext()

    def run():
        with limit():
            if not backward:
                with torch.no_grad():
                    functional.cross_entropy(x, target, backend="triton", **kwargs)
                return x, None
            loss = functional.cross_entropy(x, target, backend="triton", **kwargs)
            loss.backward(torch.full_like(loss, upstream))  # the gradient of (loss * upstream).sum()
            return x, x.grad

    with limit():
        block = launch.block_size(input.shape[0] if input.dim() == 1 else input.shape[1],
                                  probability_target=target.is_floating_point(),
                                  softcap=kwargs.get("softcap") is not None)
    return measure(run, launch.as_rows(x), block)
