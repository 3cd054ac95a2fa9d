"""Every launch configuration, compiled as a launch specialises it, fits real GPUs (no GPU needed).

Triton compiles the kernels ahead of time for sm_80 (A100), sm_90a (H100) and sm_100a (B200) on this
CPU-only machine, with the specialisation Triton's JIT applies to the launcher's own arguments; the
ptxas bundled with Triton reports registers and spills, and its cuobjdump the SASS that is counted.
Runs in a fresh process, because the tests' own process runs Triton in interpreter mode.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from celib import kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: The issue budget, plain case (index targets, no options, bf16, upstream 1, sm_90a), in SASS instructions
#: per logit, per kernel (kernels that run one after the other do not share their time): an H100 issues
#: ~10 per byte, so the one-block forward (1 R + 1 W of bf16, its backward exiting) affords ~40, the streamed
#: forward (1 R) ~20 and the streamed backward (1 R + 1 W) ~40 before it is issue-bound rather than
#: memory-bound. The limits below keep a quarter of each in hand.
ONE_BLOCK_BUDGET, STREAMED_FORWARD_BUDGET, STREAMED_BACKWARD_BUDGET = 30.0, 15.0, 30.0


def _script(code: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def table() -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "celib.kernels.tools.resources"], cwd=ROOT,
                         env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)  # the table, for the log
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    header = [c.strip() for c in rows[0]]
    return [dict(zip(header, (c.strip() for c in r))) for r in rows[1:]]


pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


def test_every_launch_compiles_without_spilling_on_a100_h100_b200(table):
    assert {r["GPU"] for r in table} == {"sm_80", "sm_90a", "sm_100a"}
    assert len(table) >= 3 * 17
    spilling = [r for r in table if int(r["spill bytes"]) != 0]
    assert not spilling, f"configurations that spill: {spilling}"
    for r in table:
        assert int(r["registers/thread"]) <= 65536 // (32 * int(r["warps"]))
        assert int(r["warps/SM"]) >= int(r["warps"])  # at least one program fits on an SM


def test_the_largest_one_block_row_is_the_launchers_limit(table):
    from celib.kernels.launch import MAX_BLOCK

    one_block = [r for r in table if r["kernel"] == "forward (one block)" and r["features"] == "index"]
    assert max(int(r["block"]) for r in one_block) == MAX_BLOCK == 16384


def test_plain_case_within_the_instruction_budget_on_h100(table):
    def plain(kernel, block):
        (r,) = [r for r in table if r["kernel"] == kernel and r["GPU"] == "sm_90a" and r["features"] == "index"
                and r["dtype"] == "bfloat16" and r["layout"] == "contiguous" and int(r["block"]) == block]
        return r

    from celib.kernels.launch import MAX_BLOCK

    for block in (2048, 4096, 8192, MAX_BLOCK):
        forward = float(plain("forward (one block)", block)["instructions/logit"])
        at_one = float(plain("backward (one block)", block)["to first EXIT/logit"])  # upstream 1: exits
        assert forward + at_one <= ONE_BLOCK_BUDGET, (block, forward, at_one)
    forward = float(plain("forward (streamed)", MAX_BLOCK)["instructions/logit"])
    backward = float(plain("backward", MAX_BLOCK)["instructions/logit"])
    assert forward <= STREAMED_FORWARD_BUDGET and backward <= STREAMED_BACKWARD_BUDGET, (forward, backward)


def test_options_cost_only_when_on(table):
    """A compile-time flag per option: each option adds instructions; with all off the plain count."""
    h100 = {(r["kernel"], r["features"]): float(r["instructions/logit"]) for r in table
            if r["GPU"] == "sm_90a" and r["dtype"] == "bfloat16" and r["layout"] == "contiguous"
            and r["block"] in ("4096", "8192", "16384")}
    plain = h100["forward (streamed)", "index"]
    for option in ("smoothing", "softcap", "prob"):
        assert h100["forward (streamed)", option] > plain + 1, option


def test_special_function_work_against_each_kernels_budget_on_h100(table):
    """Exponentials and reciprocals per logit, as chapter 5 counts them, kernel by kernel: one per pass plain,
    three with soft-capping (its tanh is an exponential and a reciprocal). The plain kernels are far within
    their budgets; the soft-capped streamed forward, one read of 2 bytes per logit, is over its 2.5."""
    from celib.kernels.tools.resources import special_budget

    h100 = {(r["kernel"], r["features"], r["block"]): float(r["special/logit"]) for r in table
            if r["GPU"] == "sm_90a" and r["dtype"] == "bfloat16" and r["layout"] == "contiguous"}
    assert special_budget("one-block") == pytest.approx(5.0, abs=0.02)
    assert special_budget("streamed forward") == pytest.approx(2.5, abs=0.01)
    assert special_budget("streamed backward") == pytest.approx(5.0, abs=0.02)
    assert 0.9 < h100["forward (one block)", "index", "16384"] < 1.2
    assert 0.9 < h100["forward (streamed)", "index", "16384"] < 1.2 < special_budget("streamed forward") / 2
    assert 0.9 < h100["backward", "index", "16384"] < 1.2 < special_budget("streamed backward") / 4
    capped_forward, capped_backward = h100["forward (streamed)", "softcap", "4096"], h100["backward", "softcap", "4096"]
    assert special_budget("streamed forward") < capped_forward < 3.4
    assert 2.8 < capped_backward < special_budget("streamed backward")


def test_one_block_backward_at_upstream_one_exits_before_any_special_function():
    code = ("from celib.kernels.tools.resources import Config, compile_config; "
            "r = compile_config(Config('backward', 16384, skip_unit=True), 90); "
            "print(r.exit_special, r.special)")
    exit_special, special = map(int, _script(code).split()[-2:])
    assert exit_special == 0 and special > 0


def test_instruction_counter_on_a_known_listing():
    from celib.kernels.tools.resources import sass_instructions

    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.NE.AND P0, PT, R1, RZ, PT ;
        /*0020*/              @!P0 EXIT ;
        /*0030*/                   FADD R2, R2, R3 ;
        /*0040*/                   NOP ;
        /*0050*/                   FMUL R2, R2, R3 ;
        /*0060*/               @P0 BRA 0x30 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
    """
    assert sass_instructions(sass) == (7, 3, 3)  # NOP and padding out; loop 0x30..0x60; exit at the third


def test_special_function_counter_on_a_known_listing():
    """``opcode="MUFU"`` counts the special-function instructions, predicated ones included, per region."""
    from celib.kernels.tools.resources import sass_instructions

    sass = """
        /*0000*/                   MUFU.RCP R4, R5 ;
        /*0010*/                   ISETP.NE.AND P0, PT, R1, RZ, PT ;
        /*0020*/              @!P0 EXIT ;
        /*0030*/                   MUFU.EX2 R2, R2 ;
        /*0040*/               @P1 MUFU.EX2 R3, R3 ;
        /*0050*/                   FMUL R2, R2, R3 ;
        /*0060*/               @P0 BRA 0x30 ;
        /*0070*/                   EXIT ;
    """
    assert sass_instructions(sass) == (8, 4, 3)
    assert sass_instructions(sass, opcode="MUFU") == (3, 2, 1)


def test_unit_class_stride_specialisation_saves_instructions():
    """A contiguous row's class stride is the constant 1 in a launch: fewer instructions per logit than
    the same kernel on a strided row (64-bit address arithmetic per element)."""
    code = ("from celib.kernels.tools.resources import Config, compile_config; "
            "r = compile_config(Config('forward', 8192, layout='strided'), 90); "
            "s = compile_config(Config('forward', 8192), 90); "
            "print(r.registers, r.per_logit, s.registers, s.per_logit)")
    strided_regs, strided_ins, regs, ins = map(float, _script(code).split()[-4:])
    assert ins < strided_ins  # unit stride as a constant: 32-bit offsets, vector loads
