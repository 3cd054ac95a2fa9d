#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on this project's GPU machines beyond what they carry
# (Python 3.12, torch 2.11, triton 3.6, numpy; no network there): Liger-Kernel, pure Python, whose own
# requirements (torch, triton) are already there. Into .whl/ (ignored by git), to carry with the run;
# the command is in gpu_check.py's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER_KERNEL=0.8.5
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "liger-kernel==$LIGER_KERNEL"
ls .whl
