"""Every layout of the upstream gradient, both backends and linear cross-entropy; PyTorch's own OpInfo
samples; negative class weights; unchecked wrong targets; one rounding in half precision.

The everyday ``loss = cross_entropy(..., reduction="none"); loss.sum().backward()`` hands backward an
expanded, stride-0 upstream gradient; ``loss.backward(g[::2])`` a strided one. The kernels must read
each as it is laid out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import celib
from celib import kernels
from celib.kernels import launch
from celib.kernels.launch import block_size
from tests import bounds
from tests.cases import fused

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


def _layouts(shape: tuple[int, ...], seed: int) -> dict[str, object]:
    """Ways a backward call hands the per-position upstream gradient of a loss of ``shape``: as a
    callable of the loss that runs the backward, and the float64 upstream it amounts to."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand((2,) + shape, generator=g, dtype=torch.float64) + 0.25
    strided = values.movedim(0, -1)[..., 0]  # every other element of a buffer: stride 2 in the last dim
    layouts = {
        "sum() (expanded, stride 0)": (lambda loss: loss.sum().backward(), torch.ones(shape, dtype=torch.float64)),
        "mean() (expanded scalar)": (lambda loss: loss.mean().backward(),
                                     torch.full(shape, 1 / max(1, torch.Size(shape).numel()), dtype=torch.float64)),
        "strided": (lambda loss: loss.backward(strided.to(loss.dtype)), strided),
        "contiguous": (lambda loss: loss.backward(values[0].to(loss.dtype)), values[0]),
        "weighted sum (mul backward)": (lambda loss: (loss * values[1].to(loss.dtype)).sum().backward(), values[1]),
    }
    if len(shape) >= 3:  # a non-contiguous K-dim upstream: the transpose of a contiguous buffer
        buf = torch.rand(shape[:1] + shape[1:][::-1], generator=g, dtype=torch.float64) + 0.25
        t = buf.transpose(1, 2)
        assert not t.is_contiguous()
        layouts["K-dim transposed"] = (lambda loss: loss.backward(t.to(loss.dtype)), t)
    return layouts


CASES = [
    ("one block", dict()),
    ("streamed", dict(max_block=16)),
    ("one block, options", dict(weight="w", label_smoothing=0.1, z_loss=1e-3)),
    ("streamed, options", dict(max_block=16, weight="w", label_smoothing=0.1, softcap=5.0)),
    ("in place", dict(inplace_backward=True)),
    # the same-program design for streamed rows (launch.Tuning.two_sweeps), on a persistent grid of 2
    ("same program", dict(max_block=16, two_sweeps=True)),
    ("same program, options", dict(max_block=16, two_sweeps=True, weight="w", label_smoothing=0.1, softcap=5.0)),
    ("same program, in place", dict(max_block=16, two_sweeps=True, inplace_backward=True)),
]


# the torch backend has nothing to stream or overwrite: the kernel-only options run on the kernel only
BACKEND_CASES = [("triton", c) for c in CASES] + [
    ("torch", c) for c in CASES if not {"max_block", "inplace_backward", "two_sweeps"} & set(c[1])]


@pytest.mark.parametrize("backend,case", BACKEND_CASES, ids=lambda v: v if isinstance(v, str) else v[0])
@pytest.mark.parametrize("shape", [(6,), (3, 4, 2)], ids=["(N,)", "(N, d1, d2)"])
def test_every_upstream_layout_gives_the_right_gradient(backend, case, shape):
    name, kwargs = case
    torch.manual_seed(len(shape))
    c = 50
    x = torch.randn(shape[0], c, *shape[1:]) * 3
    t = torch.randint(0, c, shape)
    t.view(-1)[1] = -100
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(c) + 0.1
    max_block = kw.pop("max_block", None)
    two_sweeps = kw.pop("two_sweeps", False)
    truth_kw = {k: v for k, v in kw.items() if k != "inplace_backward"}
    block = block_size(c, max_block or 2**20, softcap="softcap" in kw)
    for layout, (run_backward, upstream) in _layouts(shape, seed=3).items():
        leaf = x.clone().requires_grad_(True)
        logits = leaf * 1.0  # a non-leaf, as a model's output (in place overwrites it)
        with launch.tuned(two_sweeps=two_sweeps, programs=2):
            if backend == "triton":
                loss = fused(logits, t, reduction="none", max_block=max_block, **kw)
            else:
                loss = celib.cross_entropy(logits, t, reduction="none", backend=backend, **kw)
            run_backward(loss)
        tr = bounds.truth(x, t, upstream, block=block, reduction="none", **truth_kw)
        bounds.assert_within(leaf.grad, tr.grad, tr.grad_bound, f"{name}, {layout}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("chunk", [3, 64])
def test_linear_cross_entropy_every_upstream_layout(backend, chunk):
    g = torch.Generator().manual_seed(0)
    n, h, v = 10, 5, 40
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    t[2] = -100
    for layout, (run_backward, upstream) in _layouts((n,), seed=5).items():
        xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = celib.linear_cross_entropy(xa, wa, t, reduction="none", chunk_size=chunk, backend=backend)
        run_backward(loss)
        x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
        ref = F.cross_entropy(x64 @ w64.t(), t, reduction="none")
        (ref * upstream).sum().backward()
        for what, ours, exact in (("dX", xa.grad, x64.grad), ("dW", wa.grad, w64.grad)):
            err = (ours.double() - exact).abs().max().item()
            # float32 products of length h and v and a softmax of v: a few hundred u of the largest value
            assert err <= 512 * bounds.U32 * max(1.0, exact.abs().max().item()), f"{layout}: {what} off by {err:.3g}"


def test_compiled_path_reads_an_expanded_upstream():
    x = torch.randn(6, 30)
    t = torch.randint(0, 30, (6,))

    def f(x):
        return celib.cross_entropy(x, t, reduction="none", backend="triton", check_inputs=False).sum()

    a = x.clone().requires_grad_(True)
    torch.compile(f, backend="aot_eager", fullgraph=True)(a).backward()
    tr = bounds.truth(x, t, torch.ones(6, dtype=torch.float64), block=32, reduction="none")
    bounds.assert_within(a.grad, tr.grad, tr.grad_bound, "compiled, sum() of reduction='none'")


# ------------------------------------------------------------------------------------- PyTorch's conformance


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_negative_class_weights_as_pytorch(backend, reduction):
    torch.manual_seed(0)
    x = torch.randn(7, 5) * 3
    t = torch.tensor([0, 1, 2, 3, 4, 0, -100])
    w = torch.tensor([-1.5, 2.0, 0.5, -0.25, 1.0])
    for kw in (dict(), dict(label_smoothing=0.2)):
        a = x.clone().requires_grad_(True)
        loss = celib.cross_entropy(a, t, w, reduction=reduction, backend=backend, **kw)
        x64 = x.double().requires_grad_(True)
        exact = F.cross_entropy(x64, t, w.double(), reduction=reduction, **kw)
        up = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
        (loss * up.float()).sum().backward()
        (exact * up).sum().backward()
        assert (loss.double() - exact).abs().max() <= 1e-5 * (1 + exact.abs().max()), (loss, exact)
        assert (a.grad.double() - x64.grad).abs().max() <= 1e-5 * (1 + x64.grad.abs().max())
        if reduction == "none":
            assert (loss[:5] < 0).any()  # the negative weights' rows really are negative


def _opinfo_samples():
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == "nn.functional.cross_entropy"]
    return list(op.sample_inputs("cpu", torch.float64, requires_grad=True))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_every_opinfo_sample_of_cross_entropy(backend):
    """PyTorch's own samples for ``nn.functional.cross_entropy``: values and gradients, float64 truth.

    The kernel computes in float32 (its inputs are the samples rounded to float32); the torch backend
    in float64 itself.
    """
    samples = _opinfo_samples()
    assert len(samples) >= 20
    for i, sample in enumerate(samples):
        x64, target, kw = sample.input, sample.args[0], dict(sample.kwargs)
        if backend == "triton":
            x = x64.detach().float().requires_grad_(True)
            t = target.detach().float() if target.is_floating_point() else target  # the kernel: no target grad
            kw = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            tol = 1e-5
        else:
            x, t, tol = x64.detach().clone().requires_grad_(True), target, 1e-12
        ref_x = x.detach().double().requires_grad_(True)
        ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        ref_t = t.double() if t.is_floating_point() else t
        ours = celib.cross_entropy(x, t, backend=backend, **kw)
        exact = F.cross_entropy(ref_x, ref_t, **ref_kw)
        what = f"sample {i}: input {tuple(x.shape)}, target {t.dtype} {tuple(t.shape)}, {kw}"
        torch.testing.assert_close(ours.double(), exact, rtol=tol, atol=tol, equal_nan=True, msg=what)
        if exact.numel() and exact.requires_grad:
            up = torch.linspace(-1, 2, exact.numel(), dtype=torch.float64).reshape(exact.shape)
            (ours * up.to(ours.dtype)).sum().backward()
            (exact * up).sum().backward()
            torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=tol, atol=tol, equal_nan=True, msg=what)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_with_float32_weights_accepted_by_both_backends(backend, dtype):
    x = (torch.randn(4, 10) * 2).to(dtype)
    t = torch.randint(0, 10, (4,))
    w = torch.rand(10) + 0.5
    loss = celib.cross_entropy(x, t, w, backend=backend)
    exact = F.cross_entropy(x.double(), t, w.double())
    # the torch backend computes in the logits' dtype (weights rounded to it), the kernel in float32
    tol = 1e-6 if backend == "triton" else (2e-2 if dtype == torch.bfloat16 else 4e-3)
    assert loss.dtype == dtype and abs(loss.double() - exact) <= tol * (1 + abs(exact)) + 2 * 2.0**-8 * abs(exact)


# ------------------------------------------------------------------------------------- unchecked wrong targets


@pytest.mark.parametrize("max_block", [None, 16])
@pytest.mark.parametrize("kwargs", [dict(), dict(weight="w", label_smoothing=0.1)], ids=["plain", "options"])
def test_unchecked_out_of_range_targets_give_nan_never_a_finite_wrong_loss(max_block, kwargs):
    x = torch.randn(5, 40)
    t = torch.tensor([3, 40, -7, 2**33 + 1, -100])  # in range, one past, negative, wraps to 1 in 32 bits
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(40) + 0.5
    a = x.clone().requires_grad_(True)
    loss = fused(a, t, reduction="none", check_inputs=False, max_block=max_block, **kw)
    loss.sum().backward()
    assert torch.isfinite(loss[0]) and loss[4] == 0
    assert torch.isnan(loss[1:4]).all(), loss
    assert torch.isnan(a.grad[1:4]).all() and torch.isfinite(a.grad[[0, 4]]).all()
    assert torch.equal(a.grad[4], torch.zeros(40))
    mean = fused(x, t, check_inputs=False, max_block=max_block, **kw)
    assert torch.isnan(mean)


# ------------------------------------------------------------------------------------- one rounding


@pytest.mark.parametrize("c,max_block", [(300, None), (300, 64)], ids=["one block", "streamed"])
def test_half_precision_gradient_rounded_once_at_any_upstream(c, max_block):
    """float16 logits, upstream 0.375 per row: the gradient equals the float32 kernel's gradient of the
    same values rounded to float16 once (float16 casts round to nearest under the interpreter too)."""
    torch.manual_seed(9)
    x = (torch.randn(16, c) * 4).half()
    t = torch.randint(0, c, (16,))
    up = torch.full((16,), 0.375)  # exact in float16 too (the float16 loss casts its upstream)
    grads = []
    for dtype in (torch.float16, torch.float32):
        a = x.detach().to(dtype).clone().requires_grad_(True)
        fused(a, t, reduction="none", max_block=max_block).backward(up)
        grads.append(a.grad)
    assert torch.equal(grads[0], grads[1].half())
