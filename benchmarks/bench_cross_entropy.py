"""celib's fused cross-entropy on paper: memory traffic counted, launch resources compiled, no GPU needed.

Two things a GPU timing depends on, established without a GPU (derived, not measured time):

1. Traffic, forward + backward end to end: the kernels run under Triton's
   interpreter while :func:`celib.kernels.tools.traffic` counts every element they
   load and store, every PyTorch operator on N x C tensors between them, and
   every host synchronisation.
2. Resources as a launch compiles them, for an H100 (sm_90a): registers,
   spills, resident warps and SASS instructions per logit
   (:mod:`celib.kernels.tools.resources`), against the ~10 instructions per byte an
   H100 can issue: a kernel over that is issue-bound before memory-bound.

Measured GPU timings come from ``benchmarks/gpu_check.py`` on a GPU.

Run: ``python benchmarks/bench_cross_entropy.py``
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # the meter counts under the interpreter, also on a GPU machine

import torch  # noqa: E402

from celib import kernels  # noqa: E402
from celib.kernels import tools  # noqa: E402

SHAPES = [(4096, 32000), (8192, 128256)]


def traffic_table() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    print("Memory traffic, forward + backward end to end (the kernels under Triton's interpreter plus every "
          "PyTorch operator on N x C tensors), in elements; index targets, so each row also loads its "
          "target's logit once (N more reads):")
    print("| N | C | block | upstream | logits read | gradient written | reads per logit | writes per logit |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, c, block, upstream in [(8, 1000, 1024, 1.0), (8, 1000, 1024, 0.5), (8, 1000, 256, 1.0),
                                  (8, 1000, 256, 0.5), (2, 16384, None, 1.0), (2, 32000, None, 1.0),
                                  (2, 128256, None, 1.0)]:
        torch.manual_seed(0)
        report = tools.traffic(torch.randn(n, c), torch.randint(0, c, (n,)), max_block=block, upstream=upstream)
        print(f"| {n} | {c} | {report.block} | {upstream} | {report.logits_read} | {report.grad_written} | "
              f"{report.reads_per_logit:.2f} | {report.writes_per_logit:.2f} |")
    report = tools.traffic(torch.randn(8, 1000), torch.randint(0, 1000, (8,)), backward=False)
    print(f"Forward only (evaluation, no gradient): {report.reads_per_logit:.2f} reads and "
          f"{report.writes_per_logit:.2f} writes per logit.")
    x, t = torch.randn(4, 300), torch.randint(0, 300, (4,))
    on, off = (tools.traffic(x, t, check_inputs=flag).host_syncs for flag in (True, False))
    print(f"Host synchronisations per call: {on} with check_inputs=True (the target range check), "
          f"{off} with check_inputs=False.")


def resources() -> None:
    code = ("from celib.kernels.tools.resources import Config, compile_config, budget\n"
            "from celib.kernels.launch import block_size\n"
            f"for n, c in {SHAPES + [(8192, 16384)]!r}:\n"
            "    one = block_size(c) >= c\n"
            "    pair = [Config('forward', c), Config('backward', c, skip_unit=one)]\n"
            "    rs = [compile_config(k, 90) for k in pair]\n"
            "    names = ['one-block', None] if one else ['streamed forward', 'streamed backward']\n"
            "    for r, name in zip(rs, names):\n"
            "        per = (f'{r.per_logit:.1f} (budget {budget(name):.0f})' if name\n"
            "               else f'{r.exit_per_logit:.1f} to its exit at upstream 1')\n"
            "        print(f'| {c} | {r.kernel} | {r.block} | {r.num_warps} | {r.registers} | {r.spills} | '\n"
            "              f'{r.warps_per_sm} | {per} |')\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    print("\nLaunch resources, compiled as a launch specialises them, for an H100 (sm_90a), bf16, index targets; "
          "instructions per logit are a static SASS count; the budget is what an H100 issues while its memory "
          "moves the kernel's bytes (4 per logit for the one-block forward, whose backward exits at upstream 1; "
          "2 for the streamed forward, 4 for its backward):")
    print("| C | kernel | block | warps | registers/thread | spill bytes | warps/SM | instructions/logit |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    print(out.stdout, end="")
    from celib.kernels.launch import block_size

    for n, c in SHAPES:
        passes = (1, 1) if block_size(c) >= c else (2, 1)
        moved = (passes[0] + passes[1]) * n * c * 2
        print(f"celib at bf16 ({n}, {c}): {passes[0]} read + {passes[1]} write per logit = {moved / 1e9:.2f} GB, "
              f"a floor of {moved / 3.35e12 * 1e3:.3f} ms at 3.35 TB/s (derived, not a measurement).")


def main() -> int:
    print("On paper: no time is measured here (benchmarks/gpu_check.py measures on a GPU).")
    if not kernels.available():
        print("triton is not installed, so the kernel's traffic and resources cannot be shown.")
        return 0
    traffic_table()
    resources()
    return 0


if __name__ == "__main__":
    sys.exit(main())
