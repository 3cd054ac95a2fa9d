"""The output layer + cross-entropy on paper: FLOPs, bytes and peak memory per operator, a predicted H100 time.

Runs forward + backward of three implementations on fake tensors (``FakeTensorMode`` on the meta
device: real shapes and dtypes, no arithmetic, no memory), at the shapes language models use, in
bf16, and counts, for every PyTorch operator that runs:

- FLOPs: 2 m n k for each matrix product (``mm``, ``addmm``, ``bmm``), at the rate of its input
  dtype; other operators count none (they are memory-bound);
- bytes: every element each operator reads and writes (views and allocations move nothing; an
  expanded input counts its storage, not its apparent size);
- memory: every storage an operator creates stays live until it is garbage collected; the peak of
  their sum is the peak *extra* memory of the call (the inputs excluded, the gradients included).

Predicted time = sum over operators of max(FLOPs / peak FLOP/s, bytes / bandwidth): a roofline per
operator, so an operator that is memory-bound costs its bytes even when the next one is
compute-bound. Constants: an H100 SXM (dense bf16 989 TFLOP/s, TF32 495, HBM3 3.35 TB/s).

The implementations:

- ``unfused``: ``F.cross_entropy(x @ W.T, t)`` in bf16, the (N, V) logits and their gradient.
- ``F.linear_cross_entropy``: PyTorch's chunked path (``LinearCrossEntropyOptions()``).
- ``celib``: ``celib.linear_cross_entropy`` with the CUDA chunk rule, its products as on a GPU
  (the half-precision weight gradient accumulated into float32 by ``addmm(out_dtype=float32)``),
  and each chunk's loss and logit gradient by the fused Triton kernel, which fake tensors cannot
  run: it is modelled by its measured traffic (the meter of ``celib.kernels``: 1 read + 1 write
  per logit for rows of up to 16384 classes, 2 reads + 1 write for longer rows), in place.

Derived, not measured: a GPU run (``benchmarks/gpu_check.py``) is what tells.

Run: ``python benchmarks/linear_ce_roofline.py``
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import celib  # noqa: E402
from celib import _chunks, linear  # noqa: E402

#: An H100 SXM: dense tensor-core FLOP/s by the products' input dtype, and HBM3 bytes per second.
FLOPS = {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 495e12}
BYTES_PER_S = 3.35e12
SHAPES = [(8192, 4096, 128256), (16384, 4096, 256000), (4096, 2048, 32000)]
#: Rows at most this long are one block of celib's kernel (1 read + 1 write per logit).
ONE_BLOCK = 16384

_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
               "view", "_unsafe_view", "reshape", "as_strided", "expand", "t", "transpose", "permute",
               "squeeze", "unsqueeze", "slice", "select", "lift_fresh", "set_", "resize_", "sym_size",
               "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_to_copy_meta"}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm"}


@dataclass
class Op:
    name: str
    flops: float
    bytes: float
    seconds: float


@dataclass
class Report:
    ops: list[Op] = field(default_factory=list)
    peak_bytes: int = 0

    @property
    def seconds(self) -> float:
        return sum(op.seconds for op in self.ops)

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops)

    @property
    def bytes(self) -> float:
        return sum(op.bytes for op in self.ops)


def _nbytes(t: torch.Tensor) -> int:
    """Bytes an operator touches of ``t``: its elements, but no more than its storage (expanded views)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def _matmul_flops(name: str, args) -> float:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    a, b = (tensors[-2], tensors[-1]) if name in ("addmm", "baddbmm") else (tensors[0], tensors[1])
    if a.dim() == 3:
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]


class Meter(TorchDispatchMode):
    """Counts FLOPs and bytes of every operator and tracks the live storages it creates."""

    def __init__(self) -> None:
        super().__init__()
        self.report = Report()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}

    def add(self, name: str, flops: float, nbytes: float, dtype: torch.dtype | None = None) -> None:
        rate = FLOPS.get(dtype, FLOPS[torch.float32])
        self.report.ops.append(Op(name, flops, nbytes, max(flops / rate, nbytes / BYTES_PER_S)))

    def track(self, outputs) -> None:
        for t in outputs:
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.report.peak_bytes = max(self.report.peak_bytes, sum(n for _, n in self.live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "torch_nn":  # PyTorch's chunked op: meter the operators it is made of
            from torch.nn.modules import linear_cross_entropy as chunked

            with self:
                return getattr(chunked, name)._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if func.namespace == "prim":  # metadata (prim.device, ...)
            return out
        leaves = torch.utils._pytree.tree_leaves
        outputs = [o for o in leaves(out) if isinstance(o, torch.Tensor)]
        mutates = name.endswith("_") or "out" in kwargs
        # a new storage comes only from an operator that is neither a view nor writes into a tensor
        self.track([] if func.is_view or mutates or name in ("view", "_unsafe_view", "alias") else outputs)
        if name in _NO_TRAFFIC or func.is_view:
            return out
        inputs = [a for a in leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if "out" in kwargs:  # the destination is written, not read (unless it is also an input)
            inputs = [a for a in leaves(args) if isinstance(a, torch.Tensor)]
        reads = sum(_nbytes(t) for t in inputs)
        writes = sum(_nbytes(t) for t in outputs)
        if name in ("zeros", "zeros_like", "fill_", "zero_", "full", "full_like", "ones_like", "new_zeros"):
            reads = 0
        flops = _matmul_flops(name, args) if name in _MATMUL else 0.0
        # a product runs at the rate of the operands it multiplies (not of an accumulator it adds into)
        operands = [a for a in args if isinstance(a, torch.Tensor)][-2:] if name in _MATMUL else inputs
        dtype = next((a.dtype for a in operands if a.is_floating_point()), None)
        self.add(str(func.overloadpacket), flops, reads + writes, dtype)
        return out


@contextlib.contextmanager
def _modelled_kernel(meter: Meter):
    """celib's per-chunk loss + gradient as its Triton kernel does it: in place over the chunk's logits,
    at the kernel's measured traffic (modelled; fake tensors cannot run a Triton kernel)."""
    original = _chunks.TritonRowLoss.loss_and_grad

    def kernel(self, z, rows, scale, upstream, want_grad):
        n, c = z.shape
        passes = (1, 1) if c <= ONE_BLOCK else (2, 1)  # reads, writes per logit: the kernels' meter
        if want_grad:
            meter.add("celib fused kernel (modelled)", 0.0, (passes[0] + passes[1]) * z.numel() * z.element_size())
        else:
            meter.add("celib fused kernel, forward only (modelled)", 0.0, z.numel() * z.element_size())
        return torch.empty(n, dtype=torch.float32, device=z.device)

    _chunks.TritonRowLoss.loss_and_grad = kernel
    _chunks._OUT_DTYPE_ADDMM["meta", torch.bfloat16] = True  # as on CUDA: bf16 products accumulated in float32
    try:
        yield
    finally:
        _chunks.TritonRowLoss.loss_and_grad = original
        _chunks._OUT_DTYPE_ADDMM.pop(("meta", torch.bfloat16), None)


def run(impl: str, n: int, h: int, v: int, dtype=torch.bfloat16, rows: int | None = None) -> Report:
    """Forward + backward of ``impl`` at (N, H, V) on fake tensors, metered."""
    with FakeTensorMode():
        x = torch.empty(n, h, dtype=dtype, device="meta", requires_grad=True)
        w = torch.empty(v, h, dtype=dtype, device="meta", requires_grad=True)
        t = torch.zeros(n, dtype=torch.long, device="meta")
        meter = Meter()
        with meter:
            if impl == "unfused":
                loss = F.cross_entropy(x @ w.t(), t)
            elif impl == "F.linear_cross_entropy":
                loss = F.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions())
            elif impl == "celib":
                rows = rows or linear.chunk_rows(n, v, dtype=dtype, device="cuda", hidden=h)
                with _modelled_kernel(meter):
                    loss = celib.linear_cross_entropy(x, w, t, chunk_size=rows, backend="triton", check_inputs=False)
            else:
                raise ValueError(impl)
            loss.backward()
            del loss
            meter.track([])
    return meter.report


def main() -> int:
    print("On paper (fake tensors, an H100's constants; derived, not measured). Forward + backward, bf16, "
          "index targets; extra memory = peak of the storages the call creates (gradients included).")
    print("| N, H, V | implementation | rows per chunk | TFLOP | GB moved | predicted ms | vs unfused | "
          "peak extra GB | vs unfused |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, h, v in SHAPES:
        base = run("unfused", n, h, v)
        for impl in ("unfused", "F.linear_cross_entropy", "celib"):
            r = base if impl == "unfused" else run(impl, n, h, v)
            rows = linear.chunk_rows(n, v, dtype=torch.bfloat16, device="cuda", hidden=h) if impl == "celib" else ""
            print(f"| {n}, {h}, {v} | {impl} | {rows} | {r.flops / 1e12:.1f} | {r.bytes / 1e9:.1f} | "
                  f"{r.seconds * 1e3:.1f} | {r.seconds / base.seconds:.2f} | {r.peak_bytes / 1e9:.2f} | "
                  f"{r.peak_bytes / base.peak_bytes:.2f} |")
    n, h, v = SHAPES[0]
    print(f"\nThe chunk rule's trade-off at ({n}, {h}, {v}), bf16: rows per chunk against predicted time and "
          "peak extra memory (celib; the rule's choice marked).")
    print("| rows per chunk | chunks | predicted ms | peak extra GB |")
    print("|---:|---:|---:|---:|")
    chosen = linear.chunk_rows(n, v, dtype=torch.bfloat16, device="cuda", hidden=h)
    for rows in sorted({32, 128, 256, 512, 1024, chosen, 2048, 4096}):
        r = run("celib", n, h, v, rows=rows)
        mark = " (the rule)" if rows == chosen else ""
        print(f"| {rows}{mark} | {-(-n // rows)} | {r.seconds * 1e3:.1f} | {r.peak_bytes / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
