"""Every launch configuration compiles for real GPUs without spilling registers (no GPU needed).

Triton compiles the kernels ahead of time for sm_80 (A100), sm_90a (H100) and sm_100a (B200) on this
CPU-only machine, and the ptxas bundled with Triton reports registers and spills. Runs in a fresh
process, because the tests' own process runs Triton in interpreter mode.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from celib import kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
def test_no_configuration_spills_on_a100_h100_b200():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "celib.kernels.compile"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = [c.strip() for c in rows[0]], [[c.strip() for c in r] for r in rows[1:]]
    print(out.stdout)  # registers per thread and warps per SM, for the log
    assert {r[header.index("GPU")] for r in rows} == {"sm_80", "sm_90a", "sm_100a"}
    assert len(rows) == 3 * (3 * 3 + 3 + 2)
    spilling = [r for r in rows if int(r[header.index("spill bytes")]) != 0]
    assert not spilling, f"configurations that spill: {spilling}"
    for r in rows:
        assert int(r[header.index("registers/thread")]) <= 65536 // (32 * int(r[header.index("warps")]))
        assert int(r[header.index("warps/SM")]) >= int(r[header.index("warps")])  # at least one program fits
