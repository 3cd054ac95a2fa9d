"""A memory-traffic meter for the kernel, under Triton's interpreter.

It wraps the interpreter's masked load and store, records the addresses each
touches (only lanes whose mask is on), and classifies them afterwards by the
tensor they fall in. So it counts what the kernel really reads and writes, one
element at a time, not what a formula predicts.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Traffic:
    """Elements moved by one kernel launch.

    Attributes:
        logits: number of logits (N * C).
        logits_read: logit elements loaded (each load of the same element counts).
        grad_written: gradient elements stored.
        other_read: every other element loaded (targets, weights, the mean's scale).
        other_written: every other element stored (per-row loss and lse).
        block: the block size the launch used.
    """

    logits: int
    logits_read: int
    grad_written: int
    other_read: int
    other_written: int
    block: int

    @property
    def reads_per_logit(self) -> float:
        return self.logits_read / self.logits

    @property
    def writes_per_logit(self) -> float:
        return self.grad_written / self.logits


@contextmanager
def _recording() -> list:
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    events: list[tuple[str, np.ndarray]] = []
    load, store = builder.create_masked_load, builder.create_masked_store

    def counting_load(ptrs, mask, other, cache_policy, is_volatile):
        events.append(("load", np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].ravel().copy()))
        return load(ptrs, mask, other, cache_policy, is_volatile)

    def counting_store(ptrs, value, mask, cache_policy):
        events.append(("store", np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].ravel().copy()))
        return store(ptrs, value, mask, cache_policy)

    builder.create_masked_load, builder.create_masked_store = counting_load, counting_store
    try:
        yield events
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


def _inside(addresses: np.ndarray, tensor: torch.Tensor) -> np.ndarray:
    start = tensor.untyped_storage().data_ptr()
    return (addresses >= start) & (addresses < start + tensor.untyped_storage().nbytes())


def measure(run: Callable[[], tuple[torch.Tensor, torch.Tensor | None]], logits: torch.Tensor, block: int) -> Traffic:
    """Run ``run()`` (which launches the kernel once on CPU tensors and returns (logits, grad)) and count."""
    with _recording() as events:
        _, grad = run()
    loads = np.concatenate([a for kind, a in events if kind == "load"] or [np.empty(0, np.uint64)])
    stores = np.concatenate([a for kind, a in events if kind == "store"] or [np.empty(0, np.uint64)])
    logit_loads = _inside(loads, logits)
    grad_stores = _inside(stores, grad) if grad is not None else np.zeros(len(stores), bool)
    return Traffic(
        logits=logits.numel(),
        logits_read=int(logit_loads.sum()),
        grad_written=int(grad_stores.sum()),
        other_read=int((~logit_loads).sum()),
        other_written=int((~grad_stores).sum()),
        block=block,
    )
