"""The portability gate: re-run nbval on the floating-point paths another machine would take.

A reader's CPU differs from ours: AVX2 instead of AVX-512, ARM, another thread
count, other BLAS kernels. Each changes the last bits of float32 results (even
of ``torch.randn``), so a stored output that depends on them fails there. This
script re-runs every notebook under variants that change those paths here:

- ``scalar``: PyTorch's scalar kernels (``ATEN_CPU_CAPABILITY=default``), MKL in
  its compatible code path, OpenBLAS's oldest x86 kernels, NumPy without its
  AVX2/AVX-512 loops;
- ``one-thread``: one OpenMP/BLAS thread (other reduction splits);
- ``avx2`` (only where the CPU has AVX-512): PyTorch, MKL, OpenBLAS and NumPy on
  their AVX2 paths, with 3 threads.

The variants run in parallel (``-j``); each one's full nbval log is kept under
``_build/portability/``. Any output difference fails the gate and nbval names
the notebook and cell. Usage: ``python tests/portability.py [-j 2] [nbval args]``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOGS = ROOT / "_build" / "portability"

NUMPY_SIMD = "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"  # unknown names are ignored by NumPy


def variants() -> dict[str, dict[str, str]]:
    """The environment changes to test on this machine."""
    import torch

    found = {
        "scalar": {
            "ATEN_CPU_CAPABILITY": "default",
            "MKL_CBWR": "COMPATIBLE",
            "OPENBLAS_CORETYPE": "Prescott",
            "NPY_DISABLE_CPU_FEATURES": NUMPY_SIMD,
        },
        "one-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    }
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        found["avx2"] = {
            "ATEN_CPU_CAPABILITY": "avx2",
            "MKL_CBWR": "AVX2",
            "OPENBLAS_CORETYPE": "Haswell",
            "NPY_DISABLE_CPU_FEATURES": NUMPY_SIMD.replace("X86_V3 ", ""),
            "OMP_NUM_THREADS": "3",
        }
    return found


def run(name: str, env_changes: dict[str, str], nbval_args: list[str]) -> tuple[str, int, float, str]:
    env = {**os.environ, **env_changes}
    cmd = [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "--nbval-sanitize-with",
           ".nbval-sanitize.cfg", "-q", "--color=no", "-p", "no:cacheprovider", *nbval_args]
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log = out.stdout + out.stderr
    (LOGS / f"{name}.log").write_text(log)
    return name, out.returncode, time.monotonic() - start, log


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=2, help="variants run at once (default 2)")
    args, nbval_args = parser.parse_known_args()
    nbval_args = nbval_args or ["chapters", "using_celib.ipynb"]
    LOGS.mkdir(parents=True, exist_ok=True)
    todo = variants()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda item: run(item[0], item[1], nbval_args), todo.items()))
    failed = 0
    for name, code, seconds, log in results:
        summary = [line for line in log.splitlines() if line.startswith(("FAILED", "ERROR"))]
        last = log.strip().splitlines()[-1] if log.strip() else "(no output)"
        settings = " ".join(f"{k}={v!r}" if " " in v else f"{k}={v}" for k, v in todo[name].items())
        print(f"portability [{name}] {settings}\n  {last} ({seconds:.0f} s)")
        for line in summary:
            print(f"  {line}")
        if code != 0:
            failed += 1
            print(f"  full log: {LOGS / (name + '.log')}")
    print(f"portability gate: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
