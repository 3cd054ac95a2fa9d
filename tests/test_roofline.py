"""The on-paper meter of benchmarks/linear_ce_roofline.py against FLOPs and bytes computed by hand."""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import linear_ce_roofline as roofline  # noqa: E402

N, H, V = 8, 4, 16  # bf16: 2 bytes an element


def _mm(report):
    return [op for op in report.ops if op.name in ("aten.mm", "aten.addmm")]


def test_unfused_products_counted_by_hand():
    r = roofline.run("unfused", N, H, V)
    mms = _mm(r)
    # x @ W.T, then dX = G W and dW = G.T X: three products of 2 N H V FLOP each
    assert [op.flops for op in mms] == [2 * N * H * V] * 3
    # forward: read x (N H) and W (V H), write the logits (N V); backward: read G (N V) and W or x, write
    # dX (N H) or dW (V H); 2 bytes each
    expected = sorted([2 * (N * H + V * H + N * V), 2 * (N * V + V * H + N * H), 2 * (N * V + N * H + V * H)])
    assert sorted(op.bytes for op in mms) == expected
    # a product of 1e3 FLOP and 448 bytes is memory-bound: its time is its bytes at 3.35 TB/s
    op = mms[0]
    assert op.seconds == max(op.flops / roofline.FLOPS[torch.bfloat16], op.bytes / roofline.BYTES_PER_S)
    # peak extra memory: at least the logits, their log-softmax and their gradient, N V bf16 each
    assert r.peak_bytes >= 3 * 2 * N * V


def test_celib_makes_the_same_products_and_the_kernel_is_modelled_by_its_traffic():
    r = roofline.run("celib", N, H, V, rows=4)
    assert r.flops == roofline.run("unfused", N, H, V).flops == 3 * 2 * N * H * V  # no recomputation
    kernel = [op for op in r.ops if op.name == "celib fused kernel (modelled)"]
    assert [op.bytes for op in kernel] == [(1 + 1) * 4 * V * 2] * 2  # two chunks of 4 rows, 1 R + 1 W, bf16
    # the half-precision weight gradient accumulates in float32 by addmm(out_dtype=float32): per chunk and
    # block, 2 n Vb H FLOP at the bf16 rate, reading and writing the float32 block
    dw = [op for op in _mm(r) if op.name == "aten.addmm"]
    assert sum(op.flops for op in dw) == 2 * N * H * V
    assert all(op.bytes >= 2 * 4 * (V // 8) * H for op in dw)


def test_the_targets_at_language_model_shapes():
    """The issue's targets on paper (H100 constants): time within 1.10x of the unfused path, peak extra
    memory at most half of it at the two LLM shapes and below it at the small one."""
    for (n, h, v), memory in zip(roofline.SHAPES, (0.5, 0.5, 1.0)):
        base, ours = roofline.run("unfused", n, h, v), roofline.run("celib", n, h, v)
        assert ours.seconds <= 1.10 * base.seconds, (n, h, v)
        assert ours.peak_bytes <= memory * base.peak_bytes, (n, h, v)
