"""Check celib's kernel on a GPU against float64, then time it: one script, for the first GPU at hand.

Part 1, correctness, on the device: every kernel path against a float64 truth
computed on the same device (celib's torch backend in float64): rows in one
block and streamed rows; every option (class weights, label smoothing,
ignore_index, z-loss, soft-capping, probability targets); bfloat16, float16
and float32 logits; masked (-inf) logits; a strided input; upstream gradients
of 1 and per row; and int64 offsets at N * C > 2**31. Half-precision gradients
must be correctly rounded (within half a unit in the last place of the truth,
plus float32's own error); Triton's interpreter truncates float32 -> bfloat16,
so without a GPU a whole unit is allowed for bfloat16.

Part 2, timing (GPU only): forward + backward of bf16 logits, index targets,
``loss.backward()``, for celib, PyTorch eager, eager on a float32 upcast,
``torch.compile`` of eager, and Liger-Kernel's loss when it is importable.
CUDA events, the median of ``--repeats`` runs after warm-up, over several
input buffers in rotation so that L2 does not serve a repeat; achieved GB/s
against celib's floor of 1 read + 1 write of every logit (2 x 2 bytes).

Without a GPU the correctness part runs at tiny sizes under Triton's
interpreter (``tests/test_benchmarks.py`` runs it, so it cannot rot), and no
time is measured or printed.

Needs torch >= 2.9 and triton >= 3.4 (a GPU machine may have older versions
than the pins). Writes ``gpu_check.md`` and ``gpu_check.json`` into ``--out``.

Run: ``python benchmarks/gpu_check.py --out DIR [--repeats 30]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
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
    x, t, opts = _inputs(case, device)
    a = x.detach().clone().requires_grad_(True)
    loss = kernels.triton_cross_entropy(a, t, reduction=case.reduction, max_block=case.max_block,
                                        loss_dtype=torch.float32, **opts)
    up = (torch.rand(loss.shape, device=device, dtype=torch.float64) + 0.5) if case.reduction == "none" else None
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
    loss = kernels.triton_cross_entropy(x, t, reduction="none", loss_dtype=torch.float32)
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

SHAPES = [(32768, 8192), (16384, 16384), (8192, 32000), (8192, 128256)]


def candidates() -> dict:
    found = {
        "celib": lambda x, t: celib.cross_entropy(x, t, backend="triton", check_inputs=False),
        "eager": F.cross_entropy,
        "eager_fp32": lambda x, t: F.cross_entropy(x.float(), t),
        "compile": torch.compile(F.cross_entropy),
    }
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        found["liger"] = LigerCrossEntropyLoss()
    except Exception:  # noqa: BLE001 - not installed, or it fails to import on this machine
        pass
    return found


def time_one(fn, buffers, target, warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms, peak GB above the inputs) of forward + backward, rotating over ``buffers``."""

    def step(i):
        x = buffers[i % len(buffers)].detach().requires_grad_(True)
        fn(x, target).backward()

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


def timings(repeats: int, warmup: int) -> list[dict]:
    rows = []
    for n, c in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        k = 4 if n * c * 2 * 4 < 12e9 else 2
        buffers = [torch.randn(n, c, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(k)]
        target = torch.randint(0, c, (n,), device="cuda", generator=g)
        floor_bytes = 2 * n * c * 2
        for name, fn in candidates().items():
            try:
                ms, peak = time_one(fn, buffers, target, warmup, repeats)
            except Exception as err:  # noqa: BLE001 - report, do not hide: a candidate that fails is a row
                rows.append(dict(n=n, c=c, impl=name, error=f"{type(err).__name__}: {err}"[:200]))
                continue
            rows.append(dict(n=n, c=c, impl=name, median_ms=ms, gb_s=floor_bytes / (ms * 1e-3) / 1e9,
                             floor_ms_at_3_35_tb_s=floor_bytes / 3.35e12 * 1e3, peak_gb=peak))
        del buffers
        torch.cuda.empty_cache()
    return rows


def markdown(info: dict, checks: list[dict], times: list[dict]) -> str:
    lines = [f"# celib GPU check: {info['device']}", "",
             f"torch {info['torch']}, triton {info['triton']}, celib block limit {info['max_block']}", "",
             "## Correctness against float64 (on the device)", "",
             "| case | N | C | dtype | result | detail |", "|---|---:|---:|---|---|---|"]
    for r in checks:
        lines.append(f"| {r['case']} | {r['n']} | {r['c']} | {r['dtype']} | {'pass' if r['ok'] else 'FAIL'} | "
                     f"{r['notes']} |")
    lines += ["", "## Forward + backward, bf16, index targets, upstream 1 (measured)", ""]
    if not times:
        lines.append(info["timing_note"])
    else:
        lines += ["| N | C | implementation | median ms | GB/s vs 1R+1W floor | floor ms at 3.35 TB/s | peak GB |",
                  "|---:|---:|---|---:|---:|---:|---:|"]
        for r in times:
            if "error" in r:
                lines.append(f"| {r['n']} | {r['c']} | {r['impl']} | failed: {r['error']} | | | |")
            else:
                lines.append(f"| {r['n']} | {r['c']} | {r['impl']} | {r['median_ms']:.3f} | {r['gb_s']:.0f} | "
                             f"{r['floor_ms_at_3_35_tb_s']:.3f} | {r['peak_gb']:.2f} |")
    return "\n".join(lines) + "\n"


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
    from celib.kernels.launch import MAX_BLOCK, interpreted

    import triton

    info = dict(device=torch.cuda.get_device_name() if gpu else f"no GPU ({platform.machine()} CPU, "
                "Triton's interpreter, tiny sizes)", torch=torch.__version__, triton=triton.__version__,
                max_block=MAX_BLOCK, interpreted=interpreted())
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    checks = [check(case, device, interpreted()) for case in cases(gpu)]
    if gpu:
        checks.append(check_int64_offsets(device))
    else:
        checks.append(dict(case="int64 offsets, N*C > 2^31", n=0, c=0, dtype="bfloat16", ok=True,
                           notes="not run without a GPU (needs 4.3 GB of logits); row_offset is "
                                 "tested on the CPU by tests/test_kernels.py"))
    times = timings(args.repeats, args.warmup) if gpu else []
    info["timing_note"] = ("No GPU here: no time was measured, and none is printed." if not gpu else "")
    info["seconds"] = round(time.time() - start, 1)
    text = markdown(info, checks, times)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(dict(info=info, checks=checks, timings=times), f, indent=2)
    print(text)
    failed = [r["case"] for r in checks if not r["ok"]]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
