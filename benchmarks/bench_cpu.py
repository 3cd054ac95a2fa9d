"""CPU overhead of celib against calling PyTorch directly.

Measures, interleaving the runs in one process so that machine load affects
both sides alike:

1. ``celib.cross_entropy`` forward+backward vs ``torch.nn.functional.cross_entropy``
   at (N, C) = (4096, 32000) float32 (with and without ``check_inputs``);
2. ``celib.ref.cross_entropy`` (+ ``cross_entropy_grad``) in NumPy vs PyTorch
   forward+backward on the same float64 input.

Prints a Markdown table of median times and their ratios. Run:
``python benchmarks/bench_cpu.py [--repeats 25] [--n 4096] [--c 32000]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

import celib
import celib.ref as ref


def fwd_bwd(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x = logits.detach().requires_grad_(True)
        loss_fn(x, target).backward()

    return run


def interleaved(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median wall time (s) of each callable, calling them in turn ``repeats`` times after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for r in range(repeats):
        order = list(runs.items())
        for name, run in order if r % 2 == 0 else order[::-1]:  # alternate the order: no side always goes first
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--c", type=int, default=32000)
    parser.add_argument("--ref-n", type=int, default=1024, help="rows for the float64 NumPy comparison")
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.manual_seed(0)

    logits = torch.randn(args.n, args.c)
    target = torch.randint(0, args.c, (args.n,))
    t1 = interleaved(
        {
            "torch": fwd_bwd(F.cross_entropy, logits, target),
            "celib": fwd_bwd(celib.cross_entropy, logits, target),
            "celib_nocheck": fwd_bwd(lambda x, t: celib.cross_entropy(x, t, check_inputs=False), logits, target),
        },
        args.repeats,
    )

    x64 = torch.randn(args.ref_n, args.c, dtype=torch.float64)
    t64 = torch.randint(0, args.c, (args.ref_n,))
    x_np, t_np = x64.numpy(), t64.numpy()
    t2 = interleaved(
        {
            "torch64": fwd_bwd(F.cross_entropy, x64, t64),
            "ref64": lambda: (ref.cross_entropy(x_np, t_np), ref.cross_entropy_grad(x_np, t_np)),
        },
        max(3, args.repeats // 3),
    )

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, numpy {np.__version__}")
    print()
    print("| comparison | shape, dtype | baseline median | celib median | ratio |")
    print("|---|---|---:|---:|---:|")
    shape = f"({args.n}, {args.c}) float32"
    print(f"| celib.cross_entropy vs F.cross_entropy, fwd+bwd | {shape} | {t1['torch'] * 1e3:.1f} ms | "
          f"{t1['celib'] * 1e3:.1f} ms | {t1['celib'] / t1['torch']:.3f} |")
    print(f"| same, check_inputs=False | {shape} | {t1['torch'] * 1e3:.1f} ms | "
          f"{t1['celib_nocheck'] * 1e3:.1f} ms | {t1['celib_nocheck'] / t1['torch']:.3f} |")
    print(f"| celib.ref loss+grad (NumPy) vs torch fwd+bwd | ({args.ref_n}, {args.c}) float64 | "
          f"{t2['torch64'] * 1e3:.1f} ms | {t2['ref64'] * 1e3:.1f} ms | {t2['ref64'] / t2['torch64']:.3f} |")


if __name__ == "__main__":
    main()
