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


def test_on_paper_benchmark_reports_traffic_resources_and_syncs():
    out = run("benchmarks/bench_cross_entropy.py")
    assert out.startswith("On paper: no time is measured here")
    # end to end, forward + backward: one block at the floor (plus one target logit per row), one block at
    # an upstream of 0.5 recomputed (2 + 2), streamed rows 2 reads + 1 write for any upstream
    assert "| 8 | 1000 | 1024 | 1.0 | 8008 | 8000 | 1.00 | 1.00 |" in out
    assert "| 8 | 1000 | 1024 | 0.5 | 16008 | 16000 | 2.00 | 2.00 |" in out
    assert "| 8 | 1000 | 256 | 0.5 | 16008 | 8000 | 2.00 | 1.00 |" in out
    assert "| 2 | 16384 | 16384 | 1.0 | 32770 | 32768 | 1.00 | 1.00 |" in out  # 16384 is one block now
    assert "Forward only (evaluation, no gradient): 1.00 reads and 0.00 writes per logit." in out
    assert "1 with check_inputs=True (the target range check), 0 with check_inputs=False." in out
    assert "a floor of 1.882 ms at 3.35 TB/s (derived, not a measurement)" in out
    config = [line.split("|") for line in out.splitlines() if line.startswith("| 128256 |")]
    assert [r[2].strip() for r in config] == ["forward (streamed)", "backward"]
    assert all(r[6].strip() == "0" for r in config)  # no spills
    # each kernel against its own budget on sm_90a: 20 instructions per logit forward, 40 backward
    (forward, f_budget), (backward, b_budget) = (r[8].rstrip(") ").split(" (budget ") for r in config)
    assert (f_budget, b_budget) == ("20", "40")
    assert float(forward) <= 15 and float(backward) <= 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the no-GPU mode")
def test_gpu_check_runs_its_checks_and_its_timing_plan_under_the_interpreter(tmp_path):
    out = run("benchmarks/gpu_check.py", "--out", str(tmp_path))
    assert "No GPU here: no time was measured, and none is printed." in out
    assert out.rstrip().endswith("30 passed, 0 failed")
    import json

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(r["ok"] for r in report["checks"])
    names = {r["case"] for r in report["checks"]}
    assert {"streamed, every option", "masked -inf logits", "strided input", "one block, float16",
            "same program, every option", "one block at limit 32768, 32 warps"} <= names
    assert (tmp_path / "gpu_check.md").read_text().startswith("# celib GPU check: no GPU")
    # the timing plan ran every variant once, untimed: the long-row designs first, then the limit sweep
    rows = report["timings"]
    assert rows[0]["c"] == 128256 and rows[0]["impl"] == "celib, split"
    assert all(r.get("median_ms", 0) is None and "error" not in r for r in rows), rows
    limit = {(r["c"], r["impl"]): r["block"] for r in rows if r["question"] == "one-block limit"}
    assert len(limit) == 12
    assert limit[32000, "celib, limit 16384, 16 warps"] == 16384  # streamed in two blocks
    assert limit[32000, "celib, limit 32768, 32 warps"] == 32768  # one block
    same = [r for r in rows if "same program" in r["impl"]]
    assert [r["impl"][-6:] for r in same] == ["grid 2", "grid 3", "grid 4", "grid 8"]  # distinct grids
    assert all(r["block"] == 16384 for r in same)
    for r in rows:
        if "loss_rel_error" in r:  # each celib variant computed the loss (bf16 result)
            assert r["loss_rel_error"] < 2.0**-8, r


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the no-GPU mode")
def test_gpu_check_saves_after_every_measured_row(tmp_path):
    """A run cut short by a time limit keeps every row measured before it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    saved = []

    class Counting(gpu_check.Report):
        def save(self):
            super().save()
            saved.append(len(self.timings))

    report = Counting(str(tmp_path), dict(gpu=False, device="test", torch="", triton="", numpy="", python="",
                                           clocks="", tuning=""))
    gpu_check.timings(report, repeats=1, warmup=0, gpu=False)
    planned = sum(len(variants) for _, _, variants in gpu_check.plan(False))
    assert saved == list(range(1, planned + 1))
    import json

    assert len(json.loads((tmp_path / "gpu_check.json").read_text())["timings"]) == planned


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


def test_hf_memory_benchmark_runs_each_variant_in_its_own_process():
    out = run("benchmarks/hf_memory.py", "--vocab", "512", "--hidden", "32", "--batch", "2", "--seq", "16")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| stock") or line.startswith("| celib")]
    assert [r[1].strip() for r in rows] == ["stock", "celib", "celib fused_linear"]
    losses = {float(r[2]) for r in rows}
    assert len(losses) == 1  # the same loss, to the 5 decimals printed (memory is measured, not asserted)
    assert "each in a fresh process" in out and "The (B, T, V) logits alone: 0 MiB" in out


def test_hf_equality_table_has_every_model_dtype_and_route():
    out = run("benchmarks/hf_equality.py")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "model" not in line]
    assert len(rows) == 3 * 3 * 3
    for kind, dtype, route, loss_err, grad_err in (map(str.strip, r) for r in rows):
        if dtype == "float64" and route.startswith("celib"):
            assert float(loss_err) < 1e-12 and float(grad_err) < 1e-12, (kind, route)


def test_hf_trainer_accumulation_routes():
    out = run("benchmarks/hf_trainer_accumulation.py")
    rows = {r[1].strip(): r for r in (line.split("|") for line in out.splitlines() if line.startswith("| "))}
    assert rows["stock"][2] == rows["apply_celib"][2] == rows["apply_celib fused_linear=True"][2]
    assert float(rows["apply_celib"][3]) < 1e-4 and float(rows["apply_celib fused_linear=True"][3]) < 1e-4


def test_gpu_check_states_what_its_timings_support():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [dict(question="long rows", c=128256, impl="celib, split", median_ms=2.0),
            dict(question="long rows", c=128256, impl="celib, same program, grid 132", median_ms=1.5),
            dict(question="long rows", c=128256, impl="celib, same program, grid 264", median_ms=1.8),
            dict(question="one-block limit", c=32000, impl="celib, limit 16384, 16 warps", median_ms=0.9),
            dict(question="one-block limit", c=32000, impl="celib, limit 32768, 16 warps", median_ms=0.7),
            dict(question="one-block limit", c=32000, impl="celib, limit 32768, 32 warps", median_ms=0.8)]
    found = gpu_check.decisions(rows)
    assert found[0] == ("Long rows (C = 128256): split 2.000 ms, best same-program (celib, same program, "
                        "grid 132) 1.500 ms: supports the same program design.")
    assert found[1] == ("One-block limit at C = 32000: limit 16384: 0.900 ms (16 warps), limit 32768: 0.700 ms "
                        "(16 warps); fastest: celib, limit 32768, 16 warps.")
    assert gpu_check.decisions([dict(r, median_ms=None) for r in rows]) == []  # no times, no decision
