"""A memory-traffic meter for a cross-entropy call, forward and backward, under Triton's interpreter.

A development and teaching instrument, not runtime code: it wraps internals of
Triton's interpreter (its masked load and store, ``GridExecutor.__call__``).

Two counters run together:

- the kernels: the interpreter's masked load and store are wrapped, and the
  addresses each touches (only lanes whose mask is on) are recorded, then
  classified by the tensor they fall in (the logits, their gradient or any
  other N x C tensor, versus targets, weights and per-row values);
- PyTorch: a ``TorchDispatchMode`` sees every operator that runs outside the
  kernels (in the forward, in autograd's backward, in gradient accumulation)
  and counts the elements it reads and writes of tensors with at least N x C
  elements. Views and allocations move no data and are not counted; neither is
  the copying Triton's interpreter does around a launch (a GPU does none).

So it counts what a user's ``loss.backward()`` really moves, one element at a
time, not what a formula predicts.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Traffic", "measure"]

# Operators that move no tensor data: views, allocations, metadata.
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
               "view", "_unsafe_view", "reshape", "as_strided", "expand", "t", "transpose", "permute", "squeeze",
               "unsqueeze", "slice", "select", "lift_fresh", "set_", "resize_", "sym_size",
               "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type"}


@dataclass(frozen=True)
class Traffic:
    """Elements moved by one call (forward, or forward and backward).

    Attributes:
        logits: number of logits (N * C).
        logits_read: elements of N x C tensors loaded (logits or gradient; each load counts), by the
            kernels and by PyTorch operators together.
        grad_written: elements of N x C tensors stored, by both.
        other_read: every other element the kernels loaded (targets, weights, per-row values).
        other_written: every other element the kernels stored (per-row loss, lse, statistics).
        block: the block size the launches used.
        torch_ops: (operator, elements read, elements written) of each PyTorch operator on N x C tensors.
        host_syncs: values read back to the host by PyTorch operators (``.item()``, ``bool(t)``): on a
            GPU each one waits for the device.
    """

    logits: int
    logits_read: int
    grad_written: int
    other_read: int
    other_written: int
    block: int
    torch_ops: tuple[tuple[str, int, int], ...] = field(default=())
    host_syncs: int = 0

    @property
    def reads_per_logit(self) -> float:
        return self.logits_read / self.logits

    @property
    def writes_per_logit(self) -> float:
        return self.grad_written / self.logits


@contextmanager
def _recording_kernels():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    events: list[tuple[str, np.ndarray]] = []
    load, store = builder.create_masked_load, builder.create_masked_store
    call = interpreter.GridExecutor.__call__

    # The cache and eviction arguments after these differ between Triton versions (3.6 has an
    # eviction policy that 3.9 folds away): they are passed on as they come.
    def counting_load(ptrs, mask, *rest):
        events.append(("load", np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].ravel().copy()))
        return load(ptrs, mask, *rest)

    def counting_store(ptrs, value, mask, *rest):
        events.append(("store", np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].ravel().copy()))
        return store(ptrs, value, mask, *rest)

    def launch_unseen_by_torch_counter(self, *args, **kwargs):
        with _Paused():  # the interpreter copies each argument's storage around the launch: not GPU traffic
            return call(self, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = counting_load, counting_store
    interpreter.GridExecutor.__call__ = launch_unseen_by_torch_counter
    try:
        yield events
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
        interpreter.GridExecutor.__call__ = call


class _Paused:
    """Suspends the active :class:`_TorchCounter` (the interpreter's own copies are not GPU traffic)."""

    active: list[_TorchCounter] = []

    def __enter__(self):
        for counter in _Paused.active:
            counter.paused += 1

    def __exit__(self, *exc):
        for counter in _Paused.active:
            counter.paused -= 1
        return False


class _TorchCounter(TorchDispatchMode):
    """Counts elements read and written by PyTorch operators on tensors of at least ``threshold`` elements."""

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold, self.paused, self.ops, self.syncs = threshold, 0, [], 0
        self.storages: dict[int, int] = {}  # start address -> bytes of every N x C tensor seen

    def __enter__(self):
        _Paused.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _Paused.active.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not self.paused and name in ("_local_scalar_dense", "is_nonzero"):
            self.syncs += 1  # a tensor's value read on the host: on a GPU, a synchronisation
        if self.paused or name in _NO_TRAFFIC or func.namespace == "celib" or func.is_view:
            return out
        big = lambda t: isinstance(t, torch.Tensor) and t.numel() >= self.threshold  # noqa: E731
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if big(a)]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if big(o)]
        for t in inputs + outputs:
            self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        reads = sum(t.numel() for t in inputs)
        writes = sum(t.numel() for t in outputs)
        if name.endswith("_") and inputs:  # an in-place op writes its first argument
            writes = max(writes, inputs[0].numel())
        if name in ("zeros_like", "zeros", "ones_like", "full_like", "fill_", "zero_"):
            reads = 0  # writes only
        if reads or writes:
            self.ops.append((str(func), reads, writes))
        return out


def _inside(addresses: np.ndarray, ranges: dict[int, int]) -> np.ndarray:
    hit = np.zeros(len(addresses), dtype=bool)
    for start, nbytes in ranges.items():
        hit |= (addresses >= start) & (addresses < start + nbytes)
    return hit


def measure(run: Callable[[], tuple[torch.Tensor, torch.Tensor | None]], logits: torch.Tensor, block: int) -> Traffic:
    """Run ``run()`` (a cross-entropy call on CPU tensors, and its backward if any; it returns
    (logits, gradient or None)) and count what it moves."""
    with _recording_kernels() as events, _TorchCounter(logits.numel() or 1) as counter:
        _, grad = run()
    loads = np.concatenate([a for kind, a in events if kind == "load"] or [np.empty(0, np.uint64)])
    stores = np.concatenate([a for kind, a in events if kind == "store"] or [np.empty(0, np.uint64)])
    big = dict(counter.storages)  # the logits, their gradient, and every N x C tensor PyTorch made or used
    for tensor in [logits] + ([grad] if grad is not None else []):
        big[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    big_loads, big_stores = _inside(loads, big), _inside(stores, big)
    torch_reads = sum(r for _, r, _ in counter.ops)
    torch_writes = sum(w for _, _, w in counter.ops)
    return Traffic(
        logits=logits.numel(),
        logits_read=int(big_loads.sum()) + torch_reads,
        grad_written=int(big_stores.sum()) + torch_writes,
        other_read=int((~big_loads).sum()),
        other_written=int((~big_stores).sum()),
        block=block,
        torch_ops=tuple(counter.ops),
        host_syncs=counter.syncs,
    )
