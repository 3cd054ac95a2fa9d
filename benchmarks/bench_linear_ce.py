"""Linear layer + cross-entropy, forward and backward: time and peak memory of four implementations.

- naive: ``F.cross_entropy(input @ W.T, target)``, the (N, V) logits and their gradient in memory;
- torch reference: ``F.linear_cross_entropy(..., options=None)`` (the same computation);
- torch chunked: ``F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions())``;
- celib: ``celib.linear_cross_entropy`` (chunks, gradient formed in forward).

Time: the median of ``--repeats`` runs, the implementations interleaved in one process so that
machine load affects them alike. Memory, on the CPU: the growth of the peak resident set size
(``VmHWM`` in ``/proc/self/status``, reset before the call) of a process of its own (forked from a fresh
interpreter that has only imported torch and celib) that builds the inputs, then runs one forward + backward of
one implementation. That counts everything the call allocates (temporaries included), not only
what PyTorch's allocator reports. On a CUDA GPU: CUDA-event times and ``max_memory_allocated``.

Usage: ``python benchmarks/bench_linear_ce.py [--shapes 4096x512x32000,2048x512x128256] [--repeats 5]``.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import celib  # noqa: E402

IMPLEMENTATIONS = ("naive", "torch reference", "torch chunked", "celib")


def make_inputs(n: int, h: int, v: int, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(n, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    return x, w, t


def run_once(name: str, x, w, t) -> float:
    """One forward + backward; returns the loss."""
    if name == "naive":
        loss = F.cross_entropy(x @ w.t(), t)
    elif name == "torch reference":
        loss = F.linear_cross_entropy(x, w, t)
    elif name == "torch chunked":
        loss = F.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions())
    else:
        loss = celib.linear_cross_entropy(x, w, t)
    loss.backward()
    value = float(loss.detach())
    x.grad = w.grad = None
    return value


def rss_mb(key: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak since the last reset (VmHWM), in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_in_this_process(name: str, n: int, h: int, v: int, dtype: str = "float32") -> float:
    """Peak RSS growth (MB) of one fwd+bwd of ``name``: VmHWM after the call minus VmRSS before it,
    with the peak reset just before (``/proc/self/clear_refs``; ru_maxrss would carry the parent's
    peak across exec)."""
    x, w, t = make_inputs(n, h, v, dtype=getattr(torch, dtype))
    run_once(name, *make_inputs(64, h, 256, dtype=getattr(torch, dtype)))  # warm up: imports, threads, allocator
    before = rss_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run_once(name, x, w, t)
    return rss_mb("VmHWM") - before


# Run by peak_memory_mb in a fresh interpreter: import torch and celib once (no computation yet), then fork a
# child per measurement, ``parallel`` at a time. A child starts from that state, as a fresh process would,
# without paying the imports (about 1.6 s each); forking before any computation is safe (no thread pools yet).
_FORK_SERVER = r"""
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import bench_linear_ce as b
jobs, parallel = json.loads(sys.argv[2]), int(sys.argv[3])
results, running = [None] * len(jobs), {}

def reap():
    pid, status = os.wait()
    i, r = running.pop(pid)
    text = os.read(r, 64).decode()
    os.close(r)
    if status != 0 or not text:
        raise RuntimeError(f"measurement {jobs[i]} failed (exit status {status})")
    results[i] = float(text)

for i, job in enumerate(jobs):
    if len(running) == parallel:
        reap()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.write(w, repr(b.measure_in_this_process(*job)).encode())
            os._exit(0)
        except BaseException:
            traceback.print_exc()  # to the parent's stderr, which peak_memory_mb raises with
            os._exit(1)
    os.close(w)
    running[pid] = (i, r)
while running:
    reap()
print(json.dumps(results))
"""


def peak_memory_mb(jobs: list[tuple], parallel: int = 1) -> list[float]:
    """Peak RSS growth (MB) of one fwd+bwd per job ``(name, n, h, v[, dtype])``, each in its own process
    (CPU, Linux): children forked, ``parallel`` at a time, from a fresh interpreter that has only imported
    torch and celib."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _FORK_SERVER, here, json.dumps([list(j) for j in jobs]),
                          str(parallel)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"peak-memory measurement failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_table(shapes, repeats: int, dtype: str = "float32") -> list[dict]:
    rows = []
    for n, h, v in shapes:
        x, w, t = make_inputs(n, h, v, dtype=getattr(torch, dtype))
        times = {name: [] for name in IMPLEMENTATIONS}
        losses = {}
        for name in IMPLEMENTATIONS:  # warm-up
            losses[name] = run_once(name, x, w, t)
        for _ in range(repeats):
            for name in IMPLEMENTATIONS:  # interleaved
                start = time.perf_counter()
                run_once(name, x, w, t)
                times[name].append(time.perf_counter() - start)
        for name in IMPLEMENTATIONS:
            rows.append(dict(shape=(n, h, v), name=name, seconds=statistics.median(times[name]),
                             peak_mb=peak_memory_mb([(name, n, h, v, dtype)])[0], loss=losses[name]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x512x32000,2048x512x128256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if torch.cuda.is_available():
        print("A CUDA GPU is present, but this script measures the CPU only so far; GPU timings: none.")
    print(f"CPU: torch {torch.__version__}, {torch.get_num_threads()} threads; {args.dtype}; forward + backward; "
          f"median of {args.repeats} interleaved runs; peak memory = peak RSS growth in a fresh process.\n")
    rows = cpu_table(shapes, args.repeats, args.dtype)
    print("| N x H x V | implementation | time (ms) | vs naive | peak extra memory (MB) | vs naive |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if b["shape"] == r["shape"] and b["name"] == "naive")
        print(f"| {'x'.join(map(str, r['shape']))} | {r['name']} | {r['seconds'] * 1e3:.1f} | "
              f"{r['seconds'] / base['seconds']:.2f} | {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
