"""How many rows a chunk of :func:`celib.linear_cross_entropy` holds: the chunk-size policy.

Public as :func:`celib.linear.chunk_rows` and :data:`celib.linear.CHUNK_MEMORY`.
"""

from __future__ import annotations

import torch

from celib.errors import InputError

__all__ = ["CHUNK_MEMORY", "chunk_rows"]

#: The GPU the CUDA rule is derived for, an H100 SXM: dense tensor-core throughput (FLOP/s) per input
#: dtype, and HBM3 bandwidth (bytes/s). Their ratio is the machine balance, in FLOP per byte.
GPU_FLOPS = {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 495e12, torch.float64: 67e12}
GPU_BYTES_PER_S = 3.35e12
#: The default cap, in bytes, on one chunk's logits and their float32 working copy, per device type.
CHUNK_MEMORY = {"cuda": 2 * 2**30, "cpu": 256 * 2**20}
#: Rows per chunk on a CPU: a quarter of the batch, at least CPU_MIN_ROWS and at most CPU_ROWS (see
#: :func:`celib.linear.chunk_rows`).
CPU_ROWS, CPU_MIN_ROWS = 512, 128


def _chunk_bytes_per_row(num_classes: int, dtype: torch.dtype) -> int:
    """Bytes one row of a chunk takes: its logits in the input's dtype, plus a float32 copy for half inputs."""
    size = torch.finfo(dtype).bits // 8
    return num_classes * (size + (4 if size < 4 else 0))


def _roofline_rows(dtype: torch.dtype, hidden: int | None = None, vocab: int | None = None) -> int | None:
    """The fewest rows per chunk for which every matrix product of a chunk is compute-bound on the GPU.

    A chunk of n rows makes three products with the (V, H) weight: the logits (n V H multiply-adds,
    reading W: b V H bytes), the input's gradient (the same) and the weight's gradient, accumulated in
    float32 over the chunks: 2 n V H FLOP against reading and writing the (V, H) float32 accumulator,
    8 V H bytes, and reading the chunk's (n, V) logit gradient and (n, H) inputs, b n (V + H) bytes. That
    last product is the binding one: with the machine balance beta = F / B it is compute-bound when
    2 n V H / F >= (8 V H + b n (V + H)) / B, that is n >= 4 beta / (1 - beta b (1/H + 1/V) / 2)
    (H100, bf16, beta = 295: 1276 rows at H = 4096, V = 128256; 1395 at H = 2048, V = 32000). Without
    ``hidden`` the operands are left out: n >= 4 beta (1181 rows). Rounded up to a multiple of 128 (whole
    tensor-core tiles). None when no chunk is compute-bound (H below about beta b / 2): the memory cap
    then decides.
    """
    balance = GPU_FLOPS.get(dtype, GPU_FLOPS[torch.float32]) / GPU_BYTES_PER_S
    size = torch.finfo(dtype).bits // 8
    share = 1.0
    if hidden is not None:
        share -= balance * size * (1 / max(hidden, 1) + 1 / max(vocab or hidden, 1)) / 2
        if share <= 0:
            return None
    rows = int(-(-4 * balance // share))
    return -(-rows // 128) * 128


def chunk_rows(num_rows: int, num_classes: int, chunk_size: int | None = None, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               memory: int | None = None, hidden: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else the rule for the device, capped by a memory budget.

    - CUDA: the fewest rows for which every product of a chunk is compute-bound on an H100, its
      operands counted when ``hidden`` (H) is given (bf16, V = 128256: 1280 rows at H = 4096, 1408 at
      H = 2048 with V = 32000; 1280 without ``hidden``; 640 in float32), so chunking costs no more time
      than the unfused products (an estimate from published peaks, not a measurement).
    - CPU: a quarter of the batch, at least 128 and at most 512 rows. A CPU's
      matrix products are compute-bound at any of these sizes; what costs is the per-chunk work that
      does not scale with the rows, so chunks should be large, and a quarter of the batch keeps
      chunking worth its name for large batches (a batch under 512 rows gets 128-row chunks, so
      more than a quarter of its logits, or all of them, at once).
      ``benchmarks/bench_linear_ce.py`` measures the time against the unfused
      ``F.cross_entropy(x @ W.T)`` at several chunk sizes (the README shows a run).

    Either is capped so that a chunk's logits take at most ``memory`` bytes (default
    :data:`celib.linear.CHUNK_MEMORY` for the device: 2 GiB on CUDA, 256 MiB on CPU; a row counts its
    logits in the input's dtype plus a float32 copy for half inputs), and is at least 1 and at most N.
    A ``chunk_size`` that is given is returned as it is (a chunk larger than N is then the whole batch).
    Peak extra memory is then about one chunk, plus the float32 gradient of the weight and the
    gradient of the input.
    """
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise InputError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
        return int(chunk_size)
    kind = torch.device(device).type
    if kind == "cuda":
        rows = _roofline_rows(dtype, hidden, num_classes)
        if rows is None:  # no chunk is compute-bound: as few chunks as memory allows
            rows = max(num_rows, 1)
    else:  # a quarter of the batch, between 128 and CPU_ROWS rows
        rows = min(CPU_ROWS, max(CPU_MIN_ROWS, -(-num_rows // 4)))
    budget = CHUNK_MEMORY.get(kind, CHUNK_MEMORY["cpu"]) if memory is None else int(memory)
    if budget < 1:
        raise InputError(f"the chunk memory budget must be a positive number of bytes, got {memory}.")
    rows = min(rows, budget // _chunk_bytes_per_row(max(num_classes, 1), dtype))
    return max(1, min(max(num_rows, 1), rows))
