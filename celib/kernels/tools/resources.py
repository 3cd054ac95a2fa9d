"""Compile the kernels for real GPUs as a launch would, without one, and read their resources.

A development instrument, not runtime code: it calls Triton internals
(``create_function_from_signature``, ``JITFunction._pack_args``) and the
``ptxas``/``cuobjdump`` bundled with Triton, and is tested with the pinned
Triton and the oldest supported one (3.6; 3.5 lacks ``ptxas-blackwell``).

A launch does not compile a kernel with generic arguments: Triton's JIT
*specialises* it to the arguments it is given. An integer argument equal to 1
(a unit stride, ``n_inner`` of a 2-D input) becomes a compile-time constant,
and pointers and integers divisible by 16 are marked so, which lets the
compiler fold index arithmetic and emit 128-bit loads. A generic compile
reports about twice the registers and spills that do not happen.

So this module builds each launch with the launcher's own code
(:func:`celib.kernels.launch.plan_forward` / :func:`~celib.kernels.launch.plan_backward`
on small CPU tensors of the right dtype, contiguous and 16-aligned, or strided),
passes its arguments through Triton's own binder for a CUDA target (the
function a launch calls to specialise), compiles the result for the target
with Triton's compiler, and reads:

- registers per thread and spilled bytes, from the ``ptxas -v`` bundled with
  Triton;
- resident warps per SM that the registers allow (64K registers per SM,
  allocated in units of 8 per thread; at most 64 warps);
- SASS instructions per logit, a *static* count of the cubin disassembled by
  the bundled ``cuobjdump``: for a kernel without a loop over the row, every
  instruction of the kernel (NOPs and the trailing self-branch excluded) divided
  by the logits each thread holds (block / (32 x warps)); for a streamed kernel,
  the instructions of its loop over the row divided by the logits one iteration
  handles per thread (with two sweeps, the persistent loop over rows, which holds
  both sweeps' loops: the cost per logit of both). It is the work one thread issues per value, not a
  measured time: predicated-off code counts, stalls do not;
- special-function-unit instructions (``MUFU``: exponentials, reciprocals, ...)
  per logit, counted over the same instructions (:func:`special_budget`).

An H100 SXM issues about 4 x 32 thread-instructions per cycle per SM, 132 SMs at
about 1.98 GHz: 3.3e13 per second, or about 10 per byte of its 3.35 TB/s. A
kernel that moves b bytes per logit and issues more than 10 b instructions per
logit is issue-bound before it is memory-bound (:func:`budget`).

Run ``python -m celib.kernels.tools.resources`` for the table. It needs Triton in
compiled mode, so it sets ``TRITON_INTERPRET=0`` before Triton is imported
(run it in a fresh process, not after ``import celib`` on a machine without a GPU).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

__all__ = ["ARCHS", "BYTES_PER_LOGIT", "Config", "FEATURE_SETS", "HEADER", "Resources", "budget",
           "compile_config", "configurations", "plan", "row", "sass_instructions", "special_budget", "table"]

#: (compute capability, ptxas -arch) of the GPUs checked: A100, H100, B200.
ARCHS = {80: "sm_80", 90: "sm_90a", 100: "sm_100a"}
#: Registers per SM (64K 32-bit registers on all three) and the most threads an SM may hold.
REGISTERS_PER_SM, MAX_THREADS_PER_SM = 65536, 2048
#: H100 SXM: thread-instructions issued per second (4 schedulers x 32 lanes x 132 SMs x 1.98 GHz) and
#: HBM3 bandwidth in bytes per second.
H100_ISSUE_PER_S, H100_BYTES_PER_S = 4 * 32 * 132 * 1.98e9, 3.35e12
#: H100 SXM: special-function operations (MUFU: exp2, reciprocal, ...) per second, 16 per clock per SM.
H100_SFU_PER_S = 16 * 132 * 1.98e9

#: Bytes per logit each kernel moves, bf16, at upstream 1. The one-block forward reads the row and writes the
#: gradient (its backward exits at once); a streamed row runs two kernels one after the other, a forward that
#: reads the row and a backward that reads it again and writes the gradient. Kernels that run one after the
#: other do not share their time, so each is held to its own bytes' budget.
BYTES_PER_LOGIT = {"one-block": 4, "streamed forward": 2, "streamed backward": 4}


def budget(kernel: str) -> float:
    """Instructions per logit an H100 can issue in the time its memory moves that kernel's bytes
    (40 for one block; 20 for the streamed forward, 40 for its backward)."""
    return BYTES_PER_LOGIT[kernel] * H100_ISSUE_PER_S / H100_BYTES_PER_S


def special_budget(kernel: str) -> float:
    """Special-function operations per logit an H100 can do in the time its memory moves that kernel's
    bytes (5 for one block; 2.5 for the streamed forward, 5 for its backward)."""
    return BYTES_PER_LOGIT[kernel] * H100_SFU_PER_S / H100_BYTES_PER_S


@dataclass(frozen=True)
class Resources:
    """One compiled launch: what ptxas and the SASS say about it."""

    kernel: str  # "forward (one block)", "forward (streamed)", "forward (two sweeps)", "backward (one block)",
    # or "backward"
    arch: str
    dtype: str
    block: int
    num_warps: int
    features: str
    layout: str  # "contiguous" or "strided"
    registers: int
    spill_stores: int
    spill_loads: int
    instructions: int  # per thread: the whole kernel, or its loop over the row
    per_thread: int  # logits each thread handles per pass (block / (32 x warps))
    early_exit: int  # instructions up to the kernel's first EXIT (backward of one block: upstream 1)
    special: int  # special-function (MUFU: exp2, reciprocal, ...) instructions, counted as ``instructions``
    exit_special: int  # special-function instructions up to the first EXIT

    @property
    def warps_per_sm(self) -> int:
        """Resident warps per SM allowed by registers (ptxas allocates in units of 8 per thread)."""
        per_thread = -(-self.registers // 8) * 8
        by_registers = REGISTERS_PER_SM // (per_thread * 32)
        return min(by_registers, MAX_THREADS_PER_SM // 32) // self.num_warps * self.num_warps

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def per_logit(self) -> float:
        return self.instructions / self.per_thread

    @property
    def special_per_logit(self) -> float:
        """Special-function-unit instructions per logit (MUFU.EX2, MUFU.RCP, ...), counted as ``per_logit``."""
        return self.special / self.per_thread

    @property
    def exit_per_logit(self) -> float:
        """Per logit, the path to the first EXIT: all a one-block backward runs at upstream 1."""
        return self.early_exit / self.per_thread


@dataclass(frozen=True)
class Config:
    """A launch celib can make: which kernel, the row length, dtype, options and layout."""

    kernel: str  # "forward" or "backward"
    num_classes: int
    dtype: str = "bfloat16"
    features: tuple[str, ...] = ()  # of "prob", "weight", "smoothing", "z_loss", "softcap"
    layout: str = "contiguous"
    max_block: int | None = None
    skip_unit: bool = False  # backward of one-block rows (the forward kernel wrote the gradient)
    two_sweeps: bool = False  # the same-program design for streamed rows (launch.Tuning.two_sweeps)


def _tensors(config: Config):
    """Small CPU tensors shaped as a launch of ``config`` sees them: (N, C, 1) logits and their targets."""
    import torch

    dtype = getattr(torch, config.dtype)
    n, c = 64, config.num_classes
    if config.layout == "contiguous":
        logits = torch.zeros(n, c, dtype=dtype)
    else:  # the class dimension not unit-stride: a transposed (C, N) buffer
        logits = torch.zeros(c, n, dtype=dtype).t()
    x = logits.view(n, c, 1) if logits.is_contiguous() else logits.unsqueeze(2)
    if "prob" in config.features:
        target = torch.zeros(n, c, 1, dtype=dtype)
    else:
        target = torch.zeros(n, dtype=torch.int64)
    weight = torch.ones(c) if "weight" in config.features else None
    return x, target, weight


def plan(config: Config):
    """The :class:`celib.kernels.launch.Launch` the launcher makes for ``config``."""
    import torch

    from celib._options import LossOptions
    from celib.kernels import launch

    x, target, weight = _tensors(config)
    options = LossOptions(weight, label_smoothing=0.1 if "smoothing" in config.features else 0.0,
                          z_loss=1e-4 if "z_loss" in config.features else 0.0,
                          softcap=30.0 if "softcap" in config.features else None)
    scale = torch.ones(())
    max_block = config.max_block  # None: the launcher's limit (launch.tuning())
    if config.kernel == "forward":
        with launch.tuned(two_sweeps=config.two_sweeps, programs=132):
            planned, _ = launch.plan_forward(x, target, options, scale, True, max_block=max_block)
    else:
        stats = torch.zeros(3, x.shape[0])
        upstream = torch.ones(())
        planned, _ = launch.plan_backward(x, target, options, stats, scale, upstream, max_block=max_block, skip_unit_upstream=config.skip_unit)
    return planned


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _specialise(fn, planned, target):
    """(signature, constexprs, attrs) exactly as ``fn[grid](*args)`` would compile them for ``target``."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**planned.args, **planned.constexprs, num_warps=planned.num_warps)
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(num_warps=planned.num_warps), bound,
                                                    specialization, options)
    return signature, constexprs, attrs


def sass_instructions(sass: str, *, opcode: str | None = None) -> tuple[int, int, int]:
    """(instructions of the whole kernel, of its longest loop, up to its first EXIT) in cuobjdump's SASS.

    NOPs and the self-branch after EXIT (padding) are not counted. A loop is a branch to an earlier
    address; its body is every instruction from the target to the branch. ``opcode``: count just the
    instructions whose opcode starts with it (e.g. ``"MUFU"``, the special-function unit's), in the
    same three regions.
    """
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    code = [(int(addr, 16), text.strip()) for addr, text in lines]
    code = [(a, t) for a, t in code if not t.startswith("NOP")]
    jumps = [(a, re.search(r"\bBRA\b.*0x([0-9a-f]+)\s*$", t)) for a, t in code]
    jumps = [(a, int(j.group(1), 16)) for a, j in jumps if j]
    while code and jumps and jumps[-1] == (code[-1][0], code[-1][0]):  # padding: a branch to itself
        code.pop()
        jumps.pop()
    exits = [i for i, (_, t) in enumerate(code) if re.search(r"\bEXIT\b", t)]
    to_exit = code[:exits[0] + 1] if exits else code
    body: list[tuple[int, str]] = []
    for addr, start in jumps:
        if start < addr:
            span = [(a, t) for a, t in code if start <= a <= addr]
            body = span if len(span) > len(body) else body
    if opcode is not None:  # drop a predicate (@P0, @!UP1) before comparing
        code, body, to_exit = ([(a, t) for a, t in part if re.sub(r"^@!?U?P\w+\s+", "", t).startswith(opcode)]
                               for part in (code, body, to_exit))
    return len(code), len(body), len(to_exit)


def compile_config(config: Config, capability: int) -> Resources:
    """Compile ``config`` for ``capability`` with a launch's specialisation and read its resources."""
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from celib.kernels import kernel as k

    planned = plan(config)
    fn = getattr(k, planned.kernel)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("Triton is in interpreter mode: run this in a fresh process with TRITON_INTERPRET=0.")
    target = GPUTarget("cuda", capability, 32)
    signature, constexprs, attrs = _specialise(fn, planned, target)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=dict(num_warps=planned.num_warps))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([_tool("ptxas-blackwell"), f"-arch={ARCHS[capability]}", "-v", ptx, "-o", cubin],
                             capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    report = out.stdout + out.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    block = planned.constexprs["BLOCK"]
    single = block >= config.num_classes
    total, loop, early_exit = sass_instructions(sass)
    special_total, special_loop, exit_special = sass_instructions(sass, opcode="MUFU")
    per_thread = max(1, block // (32 * planned.num_warps))
    if config.kernel == "forward":
        kind = "forward (one block)" if single else "forward (two sweeps)" if config.two_sweeps else "forward (streamed)"
    else:
        kind = "backward (one block)" if config.skip_unit else "backward"
    whole = config.kernel == "forward" and single
    instructions, special = (total, special_total) if whole else (loop, special_loop)
    return Resources(kind, ARCHS[capability], config.dtype, block, planned.num_warps,
                     "+".join(config.features) or "index", config.layout, registers, int(spills.group(1)),
                     int(spills.group(2)), instructions, per_thread, early_exit, special, exit_special)


#: Every option, one at a time, then all together (the most live values).
FEATURE_SETS = [(), ("smoothing",), ("weight",), ("z_loss",), ("softcap",), ("prob",),
                ("prob", "weight", "smoothing", "z_loss", "softcap")]


def _limit(features: tuple[str, ...]) -> int:
    from celib.kernels.launch import max_block_for

    return max_block_for("prob" in features, "softcap" in features)


def configurations() -> list[tuple[Config, int]]:
    """The launches checked. On every arch, in bfloat16 with index targets: the one-block forward and
    backward at each warps tier up to :data:`~celib.kernels.launch.MAX_BLOCK`, the streamed pair, float32
    and a strided layout at the largest one-block row, and every option on at once, with probability
    targets and with index targets (one block at its limit, and streamed). On sm_90a, each option alone:
    one block at its limit, and the streamed pair."""
    from celib.kernels.launch import MAX_BLOCK

    out = []
    every = FEATURE_SETS[-1]
    for capability in ARCHS:
        for c in sorted({2048, 4096, 8192, MAX_BLOCK}):
            out.append((Config("forward", c), capability))
            out.append((Config("backward", c, skip_unit=True), capability))
        out.append((Config("forward", 2 * MAX_BLOCK), capability))
        out.append((Config("backward", 2 * MAX_BLOCK), capability))
        out.append((Config("forward", MAX_BLOCK, "float32"), capability))
        out.append((Config("forward", MAX_BLOCK, layout="strided"), capability))
        out.append((Config("forward", _limit(every), features=every), capability))
        out.append((Config("forward", 2 * MAX_BLOCK, features=every), capability))
        out.append((Config("backward", 2 * MAX_BLOCK, features=every), capability))
        every_index = every[1:]  # the same options with index targets
        out.append((Config("forward", _limit(every_index), features=every_index), capability))
        out.append((Config("forward", 2 * MAX_BLOCK, features=every_index), capability))
        out.append((Config("backward", 2 * MAX_BLOCK, features=every_index), capability))
        # the same-program design (provisional, see launch.Tuning): both sweeps of a row per logit
        for features in ((), ("softcap",), every):
            out.append((Config("forward", 2 * MAX_BLOCK, features=features, two_sweeps=True), capability))
    for features in FEATURE_SETS[1:-1]:
        out.append((Config("forward", _limit(features), features=features), 90))
        out.append((Config("forward", 2 * MAX_BLOCK, features=features), 90))
        out.append((Config("backward", 2 * MAX_BLOCK, features=features), 90))
    return out


def _compile(args) -> Resources:
    config, capability = args
    return compile_config(config, capability)


def table(jobs: int = 2) -> list[Resources]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile, configurations()))


HEADER = ("| kernel | GPU | dtype | block | warps | features | layout | registers/thread | spill bytes | "
          "warps/SM | instructions/logit | to first EXIT/logit | special/logit |")


def row(r: Resources) -> str:
    return (f"| {r.kernel} | {r.arch} | {r.dtype} | {r.block} | {r.num_warps} | {r.features} | {r.layout} | "
            f"{r.registers} | {r.spills} | {r.warps_per_sm} | {r.per_logit:.1f} | {r.exit_per_logit:.1f} | "
            f"{r.special_per_logit:.1f} |")


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    print(HEADER)
    print("|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in table():
        print(row(r))
