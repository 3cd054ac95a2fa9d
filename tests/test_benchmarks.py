"""The benchmark scripts run here; the GPU one says plainly that it measured nothing without a GPU."""

import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the no-GPU path")
def test_gpu_benchmark_without_a_gpu_reports_traffic_not_times():
    out = run("benchmarks/bench_cross_entropy.py")
    assert out.startswith("No CUDA GPU here: no timings are measured or printed.")
    # end to end, forward + backward: one block at the floor, streamed rows 2 reads + 1 write for any upstream
    assert "| 8 | 1000 | 1024 | 1.0 | 8000 | 8000 | 1.00 | 1.00 |" in out
    assert "| 8 | 1000 | 256 | 1.0 | 16000 | 8000 | 2.00 | 1.00 |" in out
    assert "| 8 | 1000 | 256 | 0.5 | 16000 | 8000 | 2.00 | 1.00 |" in out
    assert "Forward only (evaluation, no gradient): 1.00 reads and 0.00 writes per logit." in out
    assert "a floor of 2.101 ms at 3 TB/s (arithmetic, not a measurement)" in out
    config = [line for line in out.splitlines() if line.startswith("| 128256 |")]
    assert [line.split("|")[2].strip() for line in config] == ["forward (streamed)", "backward"]
    assert all(line.split("|")[6].strip() == "0" for line in config)  # no spills


def test_cpu_benchmark_prints_its_table():
    out = run("benchmarks/bench_cpu.py", "--n", "64", "--c", "1000", "--ref-n", "32", "--repeats", "3")
    lines = [line for line in out.splitlines() if line.startswith("| celib") or line.startswith("| same")]
    assert len(lines) == 3
    for line in lines:
        ratio = float(line.rstrip(" |").split("|")[-1])
        assert ratio > 0


def test_linear_cross_entropy_benchmark_prints_its_table():
    out = run("benchmarks/bench_linear_ce.py", "--shapes", "256x32x2000", "--repeats", "1")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 256x32x2000")]
    assert [r[2].strip() for r in rows] == ["naive", "torch reference", "torch chunked", "celib"]
    for r in rows:
        assert float(r[3]) > 0 and float(r[5]) >= 0  # seconds, peak MB
