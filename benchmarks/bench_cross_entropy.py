"""GPU benchmark of celib's fused cross-entropy kernel, forward + backward.

On a CUDA machine, for bfloat16 logits of shape (N, C) = (4096, 32000) and
(8192, 128256), it times loss + gradient for:

- ``celib``: ``celib.cross_entropy(..., backend="triton")``
- ``eager``: ``torch.nn.functional.cross_entropy`` on the bf16 logits
- ``eager_fp32``: the same on ``logits.float()`` (the common upcast)
- ``compile``: ``torch.compile`` of the eager version
- ``liger``: Liger-Kernel's ``LigerCrossEntropyLoss``, when it is installed

For each it reports the median time (CUDA events, after warm-up, over
``--repeats`` runs), the achieved bandwidth against the minimum traffic (read
every logit once and write every gradient element once: 2 * N * C * 2 bytes),
and the peak memory allocated during a run. Results go to a Markdown table on
stdout and to ``--out`` (JSON, with the GPU's name).

Without a GPU it says so, prints no timings, and instead reports the memory
traffic the kernel makes under Triton's interpreter for a small case.

Run: ``python benchmarks/bench_cross_entropy.py [--repeats 50] [--out results.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

import celib
from celib import kernels

SHAPES = [(4096, 32000), (8192, 128256)]


def candidates() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    found: dict[str, Callable] = {
        "celib": lambda x, t: celib.cross_entropy(x, t, backend="triton"),
        "eager": F.cross_entropy,
        "eager_fp32": lambda x, t: F.cross_entropy(x.float(), t),
        "compile": torch.compile(F.cross_entropy),
    }
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        found["liger"] = LigerCrossEntropyLoss()
    except ImportError:
        pass
    return found


def time_one(fn: Callable, logits: torch.Tensor, target: torch.Tensor, warmup: int, repeats: int) -> tuple[float, int]:
    """(median milliseconds, peak bytes) of forward + backward."""

    def step() -> None:
        x = logits.detach().requires_grad_(True)
        fn(x, target).backward()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def run_gpu(repeats: int, warmup: int, out: str) -> None:
    device = torch.cuda.get_device_name()
    print(f"GPU: {device}; torch {torch.__version__}")
    rows = []
    for n, c in SHAPES:
        torch.manual_seed(0)
        logits = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
        target = torch.randint(0, c, (n,), device="cuda")
        reference = celib.cross_entropy(logits.float(), target).item()
        min_bytes = 2 * n * c * logits.element_size()
        for name, fn in candidates().items():
            loss = fn(logits, target).float().item()
            assert abs(loss - reference) < 1e-2 * max(1.0, abs(reference)), (name, loss, reference)
            ms, peak = time_one(fn, logits, target, warmup, repeats)
            rows.append(dict(n=n, c=c, impl=name, median_ms=ms, bandwidth_tb_s=min_bytes / (ms * 1e-3) / 1e12,
                             floor_ms_at_3tb_s=min_bytes / 3e12 * 1e3, peak_gb=peak / 1e9))
    print()
    print("| N | C | implementation | median ms | TB/s vs minimum traffic | peak GB |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['c']} | {r['impl']} | {r['median_ms']:.3f} | {r['bandwidth_tb_s']:.2f} | {r['peak_gb']:.2f} |")
    with open(out, "w") as f:
        json.dump(dict(gpu=device, torch=torch.__version__, repeats=repeats, results=rows), f, indent=2)
    print(f"\nwritten: {out}")


#: Bytes moved per bf16 logit, forward + backward with an upstream gradient of 1, by PyTorch eager, counted
#: from its operators (see chapter 5): (read, written, the operators).
MODELLED = {
    "eager (bf16)": (6, 6, "log_softmax 2 R 2 W; nll backward 2 W; log_softmax backward 4 R 2 W"),
    "eager_fp32 (upcast)": (18, 18, "cast 2 R 4 W; log_softmax 4 R 4 W; zero-filled grad 4 W; "
                                    "backward 8 R 4 W; cast back 4 R 2 W"),
}


def kernel_configuration(c: int) -> list[str]:
    """celib's launch configuration for rows of c logits (bf16, index targets), compiled ahead of time for
    an H100 (sm_90a) in a fresh process (Triton in compiled mode), with ptxas's register report."""
    import os
    import subprocess

    from celib.kernels.launch import block_size

    block = block_size(c)
    launches = [("forward_kernel", True)] if block >= c else [("forward_kernel", False), ("backward_kernel", False)]
    if block >= c:
        launches.append(("scale_kernel", True))
    lines = []
    for kernel, single in launches:
        extra = f", single_block={single}" if kernel == "forward_kernel" else ""
        code = ("from celib.kernels.compile import compile_kernel as k; "
                f"r = k({kernel!r}, 90, 'bfloat16', {block}{extra}); "
                "print(r.kernel, r.num_warps, r.registers, r.spill_stores + r.spill_loads, r.warps_per_sm, sep='|')")
        env = dict(os.environ, TRITON_INTERPRET="0")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        name, warps, regs, spills, per_sm = out.stdout.strip().splitlines()[-1].split("|")
        lines.append(f"| {c} | {name} | {block} | {warps} | {regs} | {spills} | {per_sm} |")
    return lines


def run_without_gpu() -> None:
    print("No CUDA GPU here: no timings are measured or printed.")
    print(f"({platform.machine()}, torch {torch.__version__}.) Run this script on a CUDA machine for the table.")
    if not kernels.available():
        print("triton is not installed either, so the kernel's traffic cannot be shown.")
        return
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    print("\nInstead, celib's memory traffic, forward + backward end to end (the kernels under Triton's "
          "interpreter plus every PyTorch operator on N x C tensors), in elements:")
    print("| N | C | block | upstream | logits read | gradient written | reads per logit | writes per logit |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, c, block, upstream in [(8, 1000, 1024, 1.0), (8, 1000, 1024, 0.5), (8, 1000, 256, 1.0),
                                  (8, 1000, 256, 0.5), (2, 32000, None, 1.0), (2, 128256, None, 1.0)]:
        torch.manual_seed(0)
        report = kernels.traffic(torch.randn(n, c), torch.randint(0, c, (n,)), max_block=block, upstream=upstream)
        print(f"| {n} | {c} | {report.block} | {upstream} | {report.logits_read} | {report.grad_written} | "
              f"{report.reads_per_logit:.2f} | {report.writes_per_logit:.2f} |")
    report = kernels.traffic(torch.randn(8, 1000), torch.randint(0, 1000, (8,)), backward=False)
    print(f"Forward only (evaluation, no gradient): {report.reads_per_logit:.2f} reads and "
          f"{report.writes_per_logit:.2f} writes per logit.")
    print("\nBytes per bf16 logit, forward + backward, upstream 1: celib from the meter above, PyTorch eager "
          "as a model of its operators (not measured here):")
    print("| implementation | bytes read | bytes written | where |")
    print("|---|---:|---:|---|")
    print("| celib, row in one block (C <= 8192) | 2 | 2 | forward kernel; backward moves nothing |")
    print("| celib, streamed row | 4 | 2 | forward kernel 2 R; backward kernel 2 R 2 W |")
    for name, (r, w, where) in MODELLED.items():
        print(f"| {name} | {r} | {w} | {where} |")
    print("\ncelib's launch configuration for the benchmark's shapes (bf16, compiled for sm_90a without a GPU):")
    print("| C | kernel | block | warps | registers/thread | spill bytes | warps/SM |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for _, c in SHAPES:
        for line in kernel_configuration(c):
            print(line)
    from celib.kernels.launch import block_size

    for n, c in SHAPES:
        passes = (1, 1) if block_size(c) >= c else (2, 1)
        moved = (passes[0] + passes[1]) * n * c * 2
        print(f"celib at bf16 ({n}, {c}): {passes[0]} read + {passes[1]} write per logit = {moved / 1e9:.2f} GB, "
              f"a floor of {moved / 3e12 * 1e3:.3f} ms at 3 TB/s (arithmetic, not a measurement).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default="bench_cross_entropy.json")
    args = parser.parse_args()
    if torch.cuda.is_available():
        run_gpu(args.repeats, args.warmup, args.out)
    else:
        run_without_gpu()
    return 0


if __name__ == "__main__":
    sys.exit(main())
