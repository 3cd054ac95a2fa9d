"""Compile the kernels for real GPUs ahead of time, without one, and read their resource use.

Triton's own compiler lowers a kernel to PTX for any ``GPUTarget`` on a machine
with no GPU, and the ``ptxas`` bundled with Triton assembles it and reports
registers per thread and spilled bytes. That is how the launch configurations
of :mod:`celib.kernels.launch` are checked: every configuration the launcher
can choose must fit the register file without spilling.

Run ``python -m celib.kernels.compile`` for the table. It needs Triton in
compiled mode, so it sets ``TRITON_INTERPRET=0`` before Triton is imported
(run it in a fresh process, not after ``import celib`` on a machine without a GPU).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

#: (compute capability, ptxas -arch) of the GPUs checked: A100, H100, B200.
ARCHS = {80: "sm_80", 90: "sm_90a", 100: "sm_100a"}
#: Registers per SM (64K 32-bit registers on all three) and the most threads an SM may hold.
REGISTERS_PER_SM, MAX_THREADS_PER_SM = 65536, 2048


@dataclass(frozen=True)
class Resources:
    kernel: str
    arch: str
    dtype: str
    block: int
    num_warps: int
    features: str
    registers: int
    spill_stores: int
    spill_loads: int

    @property
    def warps_per_sm(self) -> int:
        """Resident warps per SM allowed by registers (ptxas allocates in units of 8 per thread)."""
        per_thread = -(-self.registers // 8) * 8
        by_registers = REGISTERS_PER_SM // (per_thread * 32)
        return min(by_registers, MAX_THREADS_PER_SM // 32) // self.num_warps * self.num_warps


def _signature(fn, pointer_dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = {"logits_ptr": pointer_dtype, "grad_ptr": pointer_dtype, "target_ptr": "*i64"}.get(name, "*fp32")
        elif name in ("smoothing", "z_loss", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name.startswith("stride") else "i32"
    return sig


def compile_kernel(kernel: str, capability: int, dtype: str, block: int, *, prob_target=False, has_weight=False,
                   has_softcap=False, single_block=True, warps: int | None = None) -> Resources:
    """Compile one configuration for ``capability`` and read ptxas's report."""
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from celib.kernels import kernel as k
    from celib.kernels.launch import num_warps

    fn = getattr(k, kernel)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("Triton is in interpreter mode: run this in a fresh process with TRITON_INTERPRET=0.")
    features = dict(PROB_TARGET=prob_target, HAS_WEIGHT=has_weight, HAS_SOFTCAP=has_softcap)
    if kernel == "forward_kernel":
        constexprs = dict(features, COMPUTE_GRAD=single_block, BLOCK=block, SINGLE_BLOCK=single_block)
    elif kernel == "backward_kernel":
        constexprs = dict(features, BLOCK=block)
    else:
        constexprs = dict(BLOCK=block)
    pointer = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}[dtype]
    warps = warps or num_warps(block)
    compiled = triton.compile(ASTSource(fn, _signature(fn, pointer, constexprs), constexprs),
                              target=GPUTarget("cuda", capability, 32), options=dict(num_warps=warps))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, f"-arch={ARCHS[capability]}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    report = out.stdout + out.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    names = [n for n, on in (("prob", prob_target), ("weight", has_weight), ("softcap", has_softcap)) if on]
    kind = kernel.replace("_kernel", "") + ("" if kernel != "forward_kernel" else
                                            (" (one block)" if single_block else " (streamed)"))
    return Resources(kind, ARCHS[capability], dtype, block, warps, "+".join(names) or "index", registers,
                     int(spills.group(1)), int(spills.group(2)))


def configurations(max_block: int | None = None) -> list[tuple]:
    """The configurations checked, on every arch: each kernel at the largest block of each warps tier
    (2048: 4 warps, 4096: 8, 8192: 16, all 16 values per thread) in bfloat16, with index targets only
    and with every feature on (probability targets, weights, soft-capping: the most live values);
    the largest block again in float32; the streamed forward and the scale kernel at the largest block."""
    from celib.kernels.launch import MAX_BLOCK

    top = max_block or MAX_BLOCK
    heavy = dict(prob_target=True, has_weight=True, has_softcap=True)
    out = []
    for capability in ARCHS:
        for dtype, blocks in (("bfloat16", sorted({b for b in (2048, 4096, top) if b <= top})), ("float32", [top])):
            for block in blocks:
                out.append(("forward_kernel", capability, dtype, block, dict(single_block=True)))
                out.append(("forward_kernel", capability, dtype, block, dict(heavy, single_block=True)))
                out.append(("backward_kernel", capability, dtype, block, heavy))
        out.append(("forward_kernel", capability, "bfloat16", top, dict(heavy, single_block=False)))
        out.append(("scale_kernel", capability, "bfloat16", top, {}))
    return out


def _compile(args) -> Resources:
    kernel, capability, dtype, block, kwargs = args
    return compile_kernel(kernel, capability, dtype, block, **kwargs)


def table(jobs: int = 2) -> list[Resources]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile, configurations()))


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    print("| kernel | GPU | dtype | block | warps | features | registers/thread | spill bytes | warps/SM |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|")
    for r in table():
        print(f"| {r.kernel} | {r.arch} | {r.dtype} | {r.block} | {r.num_warps} | {r.features} | {r.registers} | "
              f"{r.spill_stores + r.spill_loads} | {r.warps_per_sm} |")
