"""celib.linear_cross_entropy under torch.compile: one graph, the chunk loop one opaque op (not unrolled),
the same values and gradients as eager, compiled autograd, and the memory of eager."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import celib
from celib import kernels
from tests.test_kernels_torch_compile import _inductor_works

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(n=40, h=8, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g)
    b = torch.randn(v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = -100
    return x, w, b, t


def _loss_and_grads(fn, x, w, b):
    x, w, b = (v.clone().requires_grad_(True) for v in (x, w, b))
    loss = fn(x, w, b)
    (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
    return loss.detach(), x.grad, w.grad, b.grad


BACKENDS = ["torch"] + (["triton"] if kernels.available() else [])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fullgraph_matches_eager(compiler, backend, reduction):
    if compiler == "inductor" and not _inductor_works():
        pytest.fail("inductor cannot compile on this machine (a C++ compiler is needed)")
    x, w, b, t = _inputs()
    weight = torch.rand(50) + 0.5

    def f(x, w, b):
        return celib.linear_cross_entropy(x, w, t, linear_bias=b, weight=weight, reduction=reduction,
                                          label_smoothing=0.1, chunk_size=16, backend=backend, check_inputs=False)

    eager = _loss_and_grads(f, x, w, b)
    compiled = _loss_and_grads(torch.compile(f, backend=compiler, fullgraph=True), x, w, b)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_the_chunk_loop_is_one_op_whatever_the_number_of_chunks():
    x, w, b, t = _inputs(n=64)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return gm.forward

    for chunk in (2, 32):  # 32 chunks and 2 chunks: the same graph
        torch._dynamo.reset()
        f = torch.compile(lambda x, w: celib.linear_cross_entropy(x, w, t, chunk_size=chunk, check_inputs=False),
                          backend=capture, fullgraph=True)
        f(x.requires_grad_(True), w.requires_grad_(True))
    assert len(graphs) == 2 and graphs[0] == graphs[1]
    ops = graphs[0]
    assert sum("linear_cross_entropy_rows" in op for op in ops) == 1
    assert not any("mm" in op.split(".")[-1] for op in ops), ops  # no matrix product traced out of the loop


def test_all_ignored_mean_is_nan_with_zero_gradient_compiled():
    x, w, b, t = _inputs()
    t[:] = -100
    f = torch.compile(lambda x, w: celib.linear_cross_entropy(x, w, t, check_inputs=False), backend="aot_eager",
                      fullgraph=True)
    xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = f(xa, wa)
    loss.backward()
    assert torch.isnan(loss) and torch.equal(xa.grad, torch.zeros_like(x)) and torch.equal(wa.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_autograd(backend):
    x, w, b, t = _inputs()

    def step(x, w):
        return celib.linear_cross_entropy(x, w, t, chunk_size=16, check_inputs=False, backend=backend)

    eager = _loss_and_grads(lambda x, w, b: step(x, w), x, w, b)[:3]
    xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = torch.compile(step, backend="aot_eager")(xa, wa)
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        (loss * 0.5).backward()
    torch.testing.assert_close(loss.detach(), eager[0])
    torch.testing.assert_close(xa.grad, eager[1], rtol=1e-5, atol=1e-6)  # eager's upstream: linspace(0.5, 1.5, 1)


MEMORY = """
import sys, torch, celib
sys.path.insert(0, {bench!r})
from bench_linear_ce import rss_mb
torch.manual_seed(0)
n, h, v = 1024, 64, 32000
x = torch.randn(n, h, requires_grad=True); w = torch.randn(v, h, requires_grad=True)
t = torch.randint(0, v, (n,))
f = lambda x, w: celib.linear_cross_entropy(x, w, t, check_inputs=False)
if {compiled}:
    f = torch.compile(f, backend="inductor", fullgraph=True)
    f(x, w).backward()  # compile, and warm up
x.grad = w.grad = None
before = rss_mb()
open("/proc/self/clear_refs", "w").write("5")
f(x, w).backward()
print(rss_mb("VmHWM") - before)
"""


def test_inductor_keeps_the_memory_of_eager():
    """Peak RSS growth of one forward + backward, fresh processes: compiled within 1.2x of eager (the
    logits of this shape, 131 MB of float32, would double it if the compiler materialised them)."""
    if not _inductor_works():
        pytest.fail("inductor cannot compile on this machine (a C++ compiler is needed)")
    peaks = {}
    for compiled in (False, True):
        code = MEMORY.format(bench=str(ROOT / "benchmarks"), compiled=compiled)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, TRITON_INTERPRET="1"))
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[compiled] = float(out.stdout.split()[-1])
    print(peaks)
    assert peaks[True] <= 1.2 * peaks[False] + 16, peaks  # + 16 MB: the resident set's own granularity
    assert peaks[False] < 131, peaks  # eager itself holds less than one copy of the logits


def test_fullgraph_where_dynamo_has_no_rule_for_autocast_availability(monkeypatch):
    """torch 2.9's Dynamo has no rule for ``torch._C._is_autocast_available`` (2.13 has one); celib must
    compile with ``fullgraph=True`` there too. Simulated here by removing the rule from this torch."""
    import torch._dynamo.trace_rules as rules

    table = rules.get_torch_obj_rule_map()
    assert torch._C._is_autocast_available in table  # else this torch is not the one simulated
    monkeypatch.delitem(table, torch._C._is_autocast_available)
    torch.manual_seed(0)
    x, w = torch.randn(12, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (12,))
    torch._dynamo.reset()
    try:
        for enabled in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                fn = torch.compile(celib.linear_cross_entropy, backend="eager", fullgraph=True)
                got = fn(x, w, t, backend="torch")
                expected = celib.linear_cross_entropy(x, w, t, backend="torch")
            assert got.dtype == expected.dtype and torch.allclose(got, expected, rtol=1e-6, atol=0)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("frozen", ["head", "hidden"])
def test_fullgraph_with_a_frozen_head_or_frozen_hidden_states(frozen):
    """A frozen output layer without a bias (LoRA's usual case), or frozen hidden states: two gradients
    are missing, and the backward op must return distinct empty tensors (a custom op's outputs may not
    alias each other, which torch.library checks)."""
    x, w, _, t = _inputs()
    x.requires_grad_(frozen == "head")
    w.requires_grad_(frozen == "hidden")

    def fn(a, b):
        return celib.linear_cross_entropy(a, b, t, chunk_size=16)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    trainable = x if frozen == "head" else w
    (g_compiled,) = torch.autograd.grad(compiled(x, w), trainable)
    (g_eager,) = torch.autograd.grad(fn(x, w), trainable)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6)
