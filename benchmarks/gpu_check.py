"""Check celib's kernel on a GPU against float64, then time it: one script, for the first GPU at hand.

Part 1, correctness, on the device, all of it before any timing: every kernel
path against a float64 truth computed on the same device (celib's torch
backend in float64): rows in one block and streamed rows; every option (class
weights, label smoothing, ignore_index, z-loss, soft-capping, probability
targets); bfloat16, float16 and float32 logits; masked (-inf) logits; a strided
input; upstream gradients of 1 and per row; int64 offsets at N * C > 2**31; and
the alternatives timed below (the same-program design, a 32768-logit block).
Half-precision gradients must be correctly rounded (within half a unit in the
last place of the truth, plus float32's own error); Triton's interpreter
truncates float32 -> bfloat16, so without a GPU a whole unit is allowed there.

Part 2, timing (GPU only): forward + backward of bf16 logits, index targets,
``loss.backward()``, with CUDA events, the median of ``--repeats`` runs after
warm-up, over several input buffers in rotation so that L2 does not serve a
repeat; GB/s counted as 1 read + 1 write of every logit (2 x 2 bytes). In
this order (see :func:`plan`), so that a run cut short keeps what matters most:

1. (8192, 128256): celib's split design for long rows against the same-program
   design (``celib.kernels.launch.Tuning.two_sweeps``) on persistent grids of
   up to five sizes (as many rows as fit in half the L2 cache, so that rows and
   gradient fit in it, even below one program per SM; the default, that but at
   least one program per SM; one, two and four programs per SM), and the peers (PyTorch eager, eager on a float32 upcast,
   ``torch.compile``, Liger-Kernel).
2. C = 16384, 32000, 32768: the one-block limit at 16384 and at 32768, each at
   two warp counts (``Tuning.max_block``, ``Tuning.num_warps``).
3. (32768, 8192) and (16384, 16384): celib as shipped and the peers.

Each row is saved as soon as it is measured (``gpu_check.md`` and
``gpu_check.json`` in ``--out``), with the versions, the device and its
clocks; the markdown ends with what the timings support. celib's launch
choices are provisional until this has run on a GPU.

Without a GPU the checks run at tiny sizes under Triton's interpreter, and the
timing plan runs each variant once, untimed, at N = 2 (``make test`` does both,
with the pinned Triton and the oldest supported one); no time is printed.

Versions: runs with torch >= 2.9 and triton >= 3.6 (the GPU machines carry
torch 2.11 and triton 3.6). On this project's GPU machines (Python 3.12,
nothing to install from outside), from the repository root:

1. here, once: ``bash benchmarks/gpu_wheels.sh`` (Liger-Kernel's wheel into
   the ignored ``.whl/``; nothing else gpu_check needs is missing there);
2. on the device, carrying ``.whl``, with a 600 s limit::

     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
     && PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
     python3 benchmarks/gpu_check.py --out $OUT

   (one line). Not yet run on a GPU; the estimate, from the plan: the checks
   take well under a minute, the timings about 5-7 minutes, most of it
   ``torch.compile``'s and Triton's compiles and the (8192, 128256) float64
   reference; ``--repeats 10`` shortens it.

Run: ``python benchmarks/gpu_check.py --out DIR [--repeats 30]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import celib
from celib import kernels

U32 = 2.0**-24


@dataclass
class Case:
    name: str
    n: int
    c: int
    dtype: torch.dtype = torch.bfloat16
    options: dict = field(default_factory=dict)
    reduction: str = "mean"
    max_block: int | None = None
    layout: str = "contiguous"  # or "strided": every other row of a wider buffer, columns strided
    masked: bool = False
    prob_target: bool = False
    tuning: dict = field(default_factory=dict)  # launch.tuned(**tuning): the choices gpu_check times


def cases(gpu: bool) -> list[Case]:
    """The paths checked; tiny sizes without a GPU (the interpreter runs each program in Python)."""
    one, long, streamed_block = (16384, 65536, None) if gpu else (100, 300, 64)
    n = 256 if gpu else 6
    every = dict(weight="w", label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tag = str(dtype).split(".")[-1]
        out.append(Case(f"one block, {tag}", n, one, dtype, max_block=streamed_block and 128))
        out.append(Case(f"streamed, {tag}", n, long, dtype, max_block=streamed_block))
    for name, opts in (("weights", dict(weight="w")), ("smoothing", dict(label_smoothing=0.1)),
                       ("ignore_index", dict(ignore_index=3)), ("z-loss", dict(z_loss=1e-4)),
                       ("soft-capping", dict(softcap=30.0)), ("every option", every)):
        out.append(Case(f"one block, {name}", n, one // 2, options=opts, max_block=streamed_block and 64))
        out.append(Case(f"streamed, {name}", n, long, options=opts, max_block=streamed_block))
    out.append(Case("probability targets, one block", n, one // 2, prob_target=True,
                    max_block=streamed_block and 64))
    out.append(Case("probability targets, streamed", n, long, prob_target=True, max_block=streamed_block))
    out.append(Case("reduction none, upstream per row", n, one, reduction="none", max_block=streamed_block and 128))
    out.append(Case("reduction none, streamed", n, long, reduction="none", max_block=streamed_block))
    out.append(Case("masked -inf logits", n, one, masked=True, max_block=streamed_block and 128))
    out.append(Case("masked -inf logits, streamed", n, long, masked=True, max_block=streamed_block))
    out.append(Case("strided input", n, one, layout="strided", max_block=streamed_block and 128))
    # the alternatives the timings compare, checked first: the same-program design, a 32768 block
    same = dict(two_sweeps=True, programs=None if gpu else 2)
    out.append(Case("same program, streamed", n, long, max_block=streamed_block, tuning=same))
    out.append(Case("same program, every option", n, long, options=every, max_block=streamed_block,
                    tuning=same))
    out.append(Case("same program, reduction none", n, long, reduction="none", max_block=streamed_block,
                    tuning=same))
    out.append(Case("one block at limit 32768, 32 warps", n, 32768 if gpu else 200,
                    tuning=dict(max_block=32768 if gpu else 256, num_warps=32 if gpu else None)))
    return out


def _inputs(case: Case, device: str):
    g = torch.Generator(device=device).manual_seed(case.n * 7 + case.c)
    buf = torch.randn(2 * case.n, case.c + 8, device=device, generator=g) * 4
    if case.layout == "strided":
        x = buf.to(case.dtype)[::2, 3:3 + case.c]  # row stride 2 (C + 8), an odd column offset
    else:
        x = buf[:case.n, :case.c].to(case.dtype).contiguous()
    if case.prob_target:
        t = torch.softmax(torch.randn(case.n, case.c, device=device, generator=g), 1).to(case.dtype)
    else:
        t = torch.randint(0, case.c, (case.n,), device=device, generator=g)
        if case.masked:
            t = torch.where(t % 7 == 5, t - 1, t)  # no target on a masked class (their loss is inf)
        t[::5] = case.options.get("ignore_index", -100)
    if case.masked:
        x[:, 5::7] = -math.inf  # scattered masked classes
        x[0, :] = -math.inf
        x[0, 1] = 0.0  # one finite logit, the target: loss 0
        x[1, :] = -math.inf  # nothing finite in a kept row: nan, as in PyTorch
        t[0], t[1] = 1, 2
    opts = dict(case.options)
    if opts.get("weight") == "w":
        opts["weight"] = torch.rand(case.c, device=device, generator=g) + 0.5
    return x, t, opts


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of each |t| in ``dtype`` (subnormals: the smallest spacing)."""
    finfo = torch.finfo(dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    e = torch.floor(torch.log2(t.abs().clamp(min=finfo.smallest_normal)))
    return torch.pow(2.0, e - mant)


def check(case: Case, device: str, interpreted: bool) -> dict:
    from celib.kernels import launch

    x, t, opts = _inputs(case, device)
    a = x.detach().clone().requires_grad_(True)
    tuning = dict(case.tuning) if case.max_block is None else {"max_block": case.max_block, **case.tuning}
    with launch.tuned(**tuning):
        loss = celib.cross_entropy(a, t, reduction=case.reduction, backend="triton", loss_dtype=torch.float32,
                                   **opts)
        up = (torch.rand(loss.shape, device=device, dtype=torch.float64) + 0.5) if case.reduction == "none" \
            else None
        (loss * up.float()).sum().backward() if up is not None else loss.backward()
    x64 = x.detach().double().requires_grad_(True)
    opts64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    t64 = t.double() if t.is_floating_point() else t
    exact = celib.cross_entropy(x64, t64, reduction=case.reduction, backend="torch", **opts64)
    (exact * up).sum().backward() if up is not None else exact.backward()
    ok, notes = True, []
    same_special = lambda u, v: bool(((torch.isnan(u) == torch.isnan(v)) &  # noqa: E731
                                      (torch.isinf(u) == torch.isinf(v))).all())
    for what, ours, truth in (("loss", loss.detach(), exact.detach()), ("gradient", a.grad, x64.grad)):
        if not same_special(ours.double(), truth):
            ok = False
            notes.append(f"{what}: nan/inf where the truth has none, or the reverse")
        finite = torch.isfinite(truth) & torch.isfinite(ours.double())
        err = (ours.double() - truth)[finite].abs()
        if what == "loss":
            scale = truth[finite].abs() + math.log(case.c) + 30  # logits of |z| up to ~30
            bound = 64 * U32 * scale * (math.log2(case.c) + 8)
        else:
            tr = truth[finite]
            f32 = 64 * U32 * (tr.abs() + 1e-30) * (math.log2(case.c) + 8) + 1e-12
            bound = f32 if case.dtype == torch.float32 else \
                (0.5 if not (interpreted and case.dtype == torch.bfloat16) else 1.0) * _ulp(tr, case.dtype) + f32
        worst = float((err / bound).max()) if err.numel() else 0.0
        ok &= worst <= 1.0
        notes.append(f"{what} {worst:.2f} of bound")
    return dict(case=case.name, n=case.n, c=case.c, dtype=str(case.dtype).split(".")[-1], ok=bool(ok),
                notes="; ".join(notes))


def check_int64_offsets(device: str) -> dict:
    """N * C > 2**31 logits (bf16, 4.3 GB): the last rows' loss and gradient against float64."""
    n, c = 16400, 131072
    assert n * c > 2**31
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, device=device, dtype=torch.bfloat16, generator=g)
    t = torch.randint(0, c, (n,), device=device, generator=g)
    x.requires_grad_(True)
    loss = celib.cross_entropy(x, t, reduction="none", backend="triton", loss_dtype=torch.float32)
    loss.sum().backward()
    tail = slice(n - 4, n)
    x64 = x.detach()[tail].double().requires_grad_(True)
    exact = F.cross_entropy(x64, t[tail], reduction="none")
    exact.sum().backward()
    loss_err = float((loss[tail].double() - exact).abs().max())
    grad_err = float((x.grad[tail].double() - x64.grad).abs().max())
    ok = loss_err <= 1e-4 * float(exact.abs().max()) + 1e-5 and grad_err <= 2.0**-8
    del x
    torch.cuda.empty_cache()
    return dict(case="int64 offsets, N*C = 2.1e9 > 2^31", n=n, c=c, dtype="bfloat16", ok=bool(ok),
                notes=f"last rows: loss error {loss_err:.2g}, gradient error {grad_err:.2g}")


# ----------------------------------------------------------------------------------------------- timing


@dataclass
class Variant:
    """One thing timed: an implementation, and the launch choices (``launch.tuned``) it runs under."""

    question: str  # the decision it informs: "long rows", "one-block limit", "peers"
    impl: str
    fn: object
    tuning: dict = field(default_factory=dict)


def _celib(x, t):
    return celib.cross_entropy(x, t, backend="triton", check_inputs=False)


def peers(gpu: bool) -> list[Variant]:
    """PyTorch eager, eager on a float32 upcast, torch.compile, Liger-Kernel where importable (GPU only
    for the last two: under the interpreter they would time nothing of a GPU)."""
    out = [Variant("peers", "eager", F.cross_entropy),
           Variant("peers", "eager_fp32", lambda x, t: F.cross_entropy(x.float(), t))]
    if gpu:
        out.append(Variant("peers", "compile", torch.compile(F.cross_entropy)))
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            out.append(Variant("peers", "liger", LigerCrossEntropyLoss()))
        except Exception as err:  # noqa: BLE001 - not installed, or it fails to import: said in the table
            out.append(Variant("peers", f"liger (not importable: {type(err).__name__})", None))
    return out


def plan(gpu: bool) -> list[tuple[int, int, list[Variant]]]:
    """(N, C, variants) in the order they run: the shape that matters most first.

    1. (8192, 128256), long rows: the split design (streamed forward, backward re-reads) against the
       same-program design (two sweeps in the forward program) on persistent grids of several sizes,
       and the peers.
    2. C = 16384, 32000, 32768: the one-block limit at 16384 (longer rows streamed) and at 32768 (one
       block), each at two warp counts.
    3. The other shapes, celib as shipped and the peers.
    Without a GPU the same plan runs at N = 2 under the interpreter (no time is measured).
    """
    n = 8192 if gpu else 2
    if gpu:
        props = torch.cuda.get_device_properties(0)
        sms, l2_rows = props.multi_processor_count, props.L2_cache_size // 2 // (128256 * 2)
    else:
        sms, l2_rows = 2, 3
    long_rows = [Variant("long rows", "celib, split", _celib, dict(two_sweeps=False))]
    # the rows (and their gradient) that fit in L2, even below one program per SM; the default; 1, 2, 4 per SM
    for programs in sorted({max(1, l2_rows), max(sms, l2_rows), sms, 2 * sms, 4 * sms}):  # distinct sizes
        long_rows.append(Variant("long rows", f"celib, same program, grid {programs}", _celib,
                                 dict(two_sweeps=True, programs=programs)))
    out = [(n, 128256, long_rows + peers(gpu))]
    for c in (16384, 32000, 32768):
        limit = []
        for max_block, warps in ((16384, 8), (16384, 16), (32768, 16), (32768, 32)):
            limit.append(Variant("one-block limit", f"celib, limit {max_block}, {warps} warps", _celib,
                                 dict(max_block=max_block, num_warps=warps)))
        out.append((n, c, limit + (peers(gpu) if c == 32000 else [])))
    for shape in ((32768, 8192), (16384, 16384)) if gpu else ((4, 8192),):
        out.append((*shape, [Variant("peers", "celib", _celib)] + peers(gpu)))
    return out


def time_one(fn, buffers, target, warmup: int, repeats: int, gpu: bool) -> tuple[float | None, float | None]:
    """(median ms, peak GB above the inputs) of forward + backward, rotating over ``buffers``; without a
    GPU the step runs once, untimed: (None, None)."""

    def step(i):
        x = buffers[i % len(buffers)].detach().requires_grad_(True)
        fn(x, target).backward()

    if not gpu:
        step(0)
        return None, None
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 1e9


def timings(report: "Report", repeats: int, warmup: int, gpu: bool) -> None:
    """Time every variant of :func:`plan`, saving the report after each row (a timeout keeps what ran)."""
    from celib.kernels import launch

    device = "cuda" if gpu else "cpu"
    for n, c, variants in plan(gpu):
        g = torch.Generator(device=device).manual_seed(0)
        k = (4 if n * c * 2 * 4 < 12e9 else 2) if gpu else 1
        buffers = [torch.randn(n, c, device=device, dtype=torch.bfloat16, generator=g) for _ in range(k)]
        target = torch.randint(0, c, (n,), device=device, generator=g)
        floor_bytes = 2 * n * c * 2  # 1 read + 1 write of every bf16 logit
        for v in variants:
            row = dict(question=v.question, n=n, c=c, impl=v.impl)
            if v.fn is None:
                row["error"] = "not run"
            else:
                try:
                    with launch.tuned(**v.tuning):
                        if v.fn is _celib:  # what the launch choices make of this row, and its accuracy
                            row["block"] = launch.block_size(c)
                            with torch.no_grad():
                                loss = float(v.fn(buffers[0], target))
                            exact = float(F.cross_entropy(buffers[0].double(), target))
                            row["loss_rel_error"] = abs(loss - exact) / abs(exact)
                        ms, peak = time_one(v.fn, buffers, target, warmup, repeats, gpu)
                except Exception as err:  # noqa: BLE001 - report, do not hide: a variant that fails is a row
                    row["error"] = f"{type(err).__name__}: {err}"[:200]
                else:
                    row.update(median_ms=ms, peak_gb=peak,
                               gb_s=None if ms is None else floor_bytes / (ms * 1e-3) / 1e9)
            report.timings.append(row)
            report.save()
        del buffers
        if gpu:
            torch.cuda.empty_cache()


def decisions(times: list[dict]) -> list[str]:
    """What the timings support, question by question (nothing without times)."""
    timed = [r for r in times if r.get("median_ms")]
    if not timed:
        return []
    out = []

    def best(rows):
        return min(rows, key=lambda r: r["median_ms"])

    long_rows = [r for r in timed if r["question"] == "long rows"]
    if long_rows:
        split = [r for r in long_rows if r["impl"] == "celib, split"]
        same = [r for r in long_rows if "same program" in r["impl"]]
        if split and same:
            b = best(same)
            verdict = "same program" if b["median_ms"] < split[0]["median_ms"] else "split"
            out.append(f"Long rows (C = {split[0]['c']}): split {split[0]['median_ms']:.3f} ms, best same-program "
                       f"({b['impl']}) {b['median_ms']:.3f} ms: supports the {verdict} design.")
    for c in sorted({r["c"] for r in timed if r["question"] == "one-block limit"}):
        rows = [r for r in timed if r["question"] == "one-block limit" and r["c"] == c]
        by_limit = {}
        for r in rows:
            limit = int(r["impl"].split("limit ")[1].split(",")[0])
            if limit not in by_limit or r["median_ms"] < by_limit[limit]["median_ms"]:
                by_limit[limit] = r
        parts = ", ".join(f"limit {k}: {v['median_ms']:.3f} ms ({v['impl'].split(', ')[-1]})"
                          for k, v in sorted(by_limit.items()))
        out.append(f"One-block limit at C = {c}: {parts}; fastest: {best(rows)['impl']}.")
    return out


@dataclass
class Report:
    """Everything measured so far, written to ``out`` (markdown and JSON) whenever it grows."""

    out: str
    info: dict
    checks: list = field(default_factory=list)
    timings: list = field(default_factory=list)

    def markdown(self) -> str:
        info = self.info
        lines = [f"# celib GPU check: {info['device']}", "",
                 f"torch {info['torch']}, triton {info['triton']}, numpy {info['numpy']}, Python {info['python']}; "
                 f"clocks: {info['clocks']}; celib's launch choices: {info['tuning']}", "",
                 "## Correctness against float64 (on the device)", "",
                 "| case | N | C | dtype | result | detail |", "|---|---:|---:|---|---|---|"]
        for r in self.checks:
            lines.append(f"| {r['case']} | {r['n']} | {r['c']} | {r['dtype']} | {'pass' if r['ok'] else 'FAIL'} | "
                         f"{r['notes']} |")
        lines += ["", "## Forward + backward, bf16, index targets, upstream 1 (measured)", ""]
        if not self.info["gpu"]:
            lines.append("No GPU here: no time was measured, and none is printed. The timing plan ran once per "
                         "variant, untimed, at N = 2 under Triton's interpreter.")
        lines += ["", "| question | N | C | implementation | block | median ms | GB/s (1R+1W of bf16) | peak GB |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]
        for r in self.timings:
            head = f"| {r['question']} | {r['n']} | {r['c']} | {r['impl']} | {r.get('block', '')} |"
            if "error" in r:
                lines.append(f"{head} failed: {r['error']} | | |")
            elif r["median_ms"] is None:
                lines.append(f"{head} not timed | | |")
            else:
                lines.append(f"{head} {r['median_ms']:.3f} | {r['gb_s']:.0f} | {r['peak_gb']:.2f} |")
        found = decisions(self.timings)
        if found:
            lines += ["", "## What the timings support", ""] + [f"- {d}" for d in found]
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:
            f.write(self.markdown())
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(dict(info=self.info, checks=self.checks, timings=self.timings), f, indent=2)


def _clocks() -> str:
    """SM and memory clocks from nvidia-smi, if it answers."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "not readable"
    except (OSError, subprocess.SubprocessError):
        return "not readable"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    start = time.time()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if not kernels.available():
        print("triton is not installed: nothing to check.")
        return 1
    from celib.kernels._mode import interpreted
    from celib.kernels.launch import tuning

    import numpy
    import triton

    info = dict(device=torch.cuda.get_device_name() if gpu else f"no GPU ({platform.machine()} CPU, "
                "Triton's interpreter, tiny sizes)", gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                numpy=numpy.__version__, python=platform.python_version(),
                clocks=_clocks() if gpu else "no GPU", tuning=str(tuning()), interpreted=interpreted())
    print(f"{info['device']}: torch {info['torch']}, triton {info['triton']}, numpy {info['numpy']}, "
          f"Python {info['python']}, clocks {info['clocks']}", flush=True)
    report = Report(args.out, info)
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    for case in cases(gpu):  # correctness first, all of it, before any timing
        report.checks.append(check(case, device, interpreted()))
        report.save()
    if gpu:
        report.checks.append(check_int64_offsets(device))
    else:
        report.checks.append(dict(case="int64 offsets, N*C > 2^31", n=0, c=0, dtype="bfloat16", ok=True,
                                  notes="not run without a GPU (needs 4.3 GB of logits); row_offset is "
                                        "tested on the CPU by tests/test_kernels.py"))
    report.save()
    failed = [r["case"] for r in report.checks if not r["ok"]]
    print(f"correctness: {len(report.checks) - len(failed)} passed, {len(failed)} failed", flush=True)
    timings(report, args.repeats, args.warmup, gpu)
    info["seconds"] = round(time.time() - start, 1)
    report.save()
    print(report.markdown())
    print(f"{len(report.checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
