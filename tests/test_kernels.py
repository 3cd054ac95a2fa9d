"""The Triton kernel against PyTorch, under Triton's interpreter on the CPU.

These tests run wherever triton is installed (it is, on Linux CI); they are
skipped, with that reason, only where it is not.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import celib
from celib import _backend, kernels
from celib.kernels import launch, tools
from celib._options import LossOptions
from celib.kernels.launch import MAX_BLOCK, block_size
from tests import bounds
from tests.cases import fused

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


def both(x: torch.Tensor, target, upstream: torch.Tensor | None = None, **kwargs):
    """(kernel loss, kernel grad, torch loss, torch grad) for the same call."""
    a = x.detach().clone().requires_grad_(True)
    b = x.detach().clone().requires_grad_(True)
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "max_block"}
    la = fused(a, target, **kwargs)
    lb = celib.cross_entropy(b, target, backend="torch", **torch_kwargs)
    up = upstream if upstream is not None else torch.ones_like(la)
    (la * up).sum().backward()
    (lb * up).sum().backward()
    return la.detach(), a.grad, lb.detach(), b.grad


def check(x: torch.Tensor, target, upstream: torch.Tensor | None = None, **kwargs):
    """Kernel and PyTorch in float32, both against the float64 truth (see tests/bounds.py).

    The kernel's loss and gradient must lie within the float32 error bound of the truth, element by
    element, and be no worse than PyTorch's float32 result by more than ``bounds.TORCH_FACTOR`` (plus
    8 u of the largest value, for a PyTorch result that happens to be exact). Returns (loss, grad).
    """
    max_block = kwargs.get("max_block")
    num_classes = x.shape[0] if x.dim() == 1 else x.shape[1]
    block = block_size(num_classes, max_block or MAX_BLOCK)
    la, ga, lb, gb = both(x, target, upstream, **kwargs)
    truth_kwargs = {k: v for k, v in kwargs.items() if k != "max_block"}
    tr = bounds.truth(x, target, upstream, block=block, **truth_kwargs)
    bounds.assert_within(la, tr.loss, tr.loss_bound, "kernel loss")
    bounds.assert_within(ga, tr.grad, tr.grad_bound, "kernel gradient")
    for what, ours, theirs, exact in (("loss", la, lb, tr.loss), ("gradient", ga, gb, tr.grad)):
        finite = exact[torch.isfinite(exact)]
        slack = 8 * bounds.U32 * (float(finite.abs().max()) if finite.numel() else 0.0)
        err, torch_err = bounds.max_error(ours, exact), bounds.max_error(theirs, exact)
        assert err <= bounds.TORCH_FACTOR * torch_err + slack, (
            f"kernel {what} error {err:.3g} vs PyTorch's {torch_err:.3g} (float64 truth)")
    return la, ga


# ---------------------------------------------------------------------------------------------- float32 grid

GRID = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.2, weight="w"),
    dict(label_smoothing=0.2, weight="w", ignore_index=3),
    dict(weight="w", reduction="sum"),
    dict(weight="w", reduction="none", label_smoothing=0.3),
]


@pytest.mark.parametrize("kwargs", GRID, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("num_classes,max_block", [(1, None), (7, None), (100, 32), (1000, 128)])
def test_index_targets_match_torch(kwargs, num_classes, max_block):
    torch.manual_seed(num_classes)
    x = torch.randn(20, num_classes) * 3
    t = torch.randint(0, num_classes, (20,))
    ignore = kwargs.get("ignore_index", -100)
    t[torch.rand(20) < 0.3] = ignore  # 30% ignored
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(num_classes) + 0.1
    up = torch.randn(20) if kw.get("reduction") == "none" else None
    check(x, t, up, max_block=max_block, **kw)


@pytest.mark.parametrize("kwargs", [dict(), dict(label_smoothing=0.2, weight="w"), dict(reduction="none"), dict(reduction="sum")])
@pytest.mark.parametrize("max_block", [None, 16])
def test_probability_targets_match_torch(kwargs, max_block):
    torch.manual_seed(1)
    x = torch.randn(9, 50) * 2
    q = torch.softmax(torch.randn(9, 50) * 3, 1)
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(50) + 0.1
    up = torch.randn(9) if kw.get("reduction") == "none" else None
    check(x, q, up, max_block=max_block, **kw)


@pytest.mark.parametrize("num_classes", [3, 1000, 4097, 131072])
def test_class_counts_up_to_131072(num_classes):
    torch.manual_seed(0)
    x = torch.randn(2, num_classes) * 4
    t = torch.tensor([0, num_classes - 1])
    check(x, t, reduction="none")


def test_k_dimensional_input_and_one_dimensional_input():
    torch.manual_seed(2)
    x = torch.randn(3, 6, 4, 5)
    t = torch.randint(0, 6, (3, 4, 5))
    t[0, 1] = -100
    for reduction in ("none", "mean", "sum"):
        loss, _ = check(x, t, reduction=reduction, label_smoothing=0.1)
        assert loss.shape == ((3, 4, 5) if reduction == "none" else ())
    q = torch.softmax(torch.randn(3, 6, 4, 5), 1)
    check(x, q, reduction="none")
    v = torch.randn(11)
    loss, grad = check(v, torch.tensor(4), reduction="none")
    assert loss.shape == () and grad.shape == (11,)


def test_strided_sliced_inputs_and_int32_targets():
    torch.manual_seed(3)
    big = torch.randn(40, 300)
    x = big[::3, 7:250]  # row stride 900, non-contiguous
    assert not x.is_contiguous()
    t = torch.randint(0, 243, (x.shape[0],))
    check(x, t.int(), max_block=64)
    col = torch.randn(300, 40).t()[:, :200]  # column stride != 1
    check(col, torch.randint(0, 200, (40,)), reduction="none")


def test_edge_cases_all_ignored_empty_and_equal_logits():
    x = torch.randn(5, 9)
    ignored = torch.full((5,), -100)
    loss, grad = check(x, ignored)
    assert torch.isnan(loss) and torch.equal(grad, torch.zeros_like(x))  # nan mean, zero gradient: as PyTorch
    for reduction in ("mean", "sum", "none"):
        loss, _ = check(torch.randn(0, 9), torch.zeros(0, dtype=torch.long), reduction=reduction)
        assert loss.shape == ((0,) if reduction == "none" else ())
    equal = torch.full((4, 1000), 3.0)
    loss, _ = check(equal, torch.tensor([0, 5, 999, 10]), reduction="none", max_block=256)
    # log 1000 = 6.9078: a sum of 1000 ones is exact in float32, so only log's rounding remains
    assert (loss.double() - math.log(1000)).abs().max() <= 4 * bounds.U32 * math.log(1000)


def test_extreme_logits():
    x = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, -1e4], [1e4, 1e4, -1e4, 0.0]])
    t = torch.tensor([1, 2, 0])
    loss, _ = check(x, t, reduction="none")
    assert torch.isfinite(loss).all()


def test_extras_match_the_torch_path():
    torch.manual_seed(4)
    x = torch.randn(12, 70) * 8
    t = torch.randint(0, 70, (12,))
    t[3] = -100
    w = torch.rand(70) + 0.5
    for reduction in ("none", "mean", "sum"):
        kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
        up = torch.randn(12) if reduction == "none" else None
        check(x, t, up, max_block=16, **kw)
    loss, lse = fused(x, t, softcap=5.0, return_lse=True)
    assert lse.dtype == torch.float32
    exact = torch.logsumexp(5.0 * torch.tanh(x.double() / 5.0), 1)
    # lse = m + log d: |lse| <= 5 + log 70, d to (log2 128 + 1 + log 70 + 8) u, tanh to a few u of |z| <= 5
    bounds.assert_within(lse, exact, 2 * (7 + 1 + math.log(70) + 8) * bounds.U32 * (exact.abs() + 5 + 1), "lse")


def test_loss_reused_and_scaled_after_the_call():
    x = torch.randn(6, 30)
    t = torch.randint(0, 30, (6,))
    a = x.clone().requires_grad_(True)
    la = fused(a, t)
    (3.0 * la + la**2).backward()
    # truth: d(3 l + l^2) = (3 + 2 l) dl; the kernel's dl is within the bound, and l (in the upstream
    # 3 + 2 l) is off by at most the loss bound, which moves the gradient by 2 |loss bound| |dl|
    tr = bounds.truth(x, t, block=32)
    upstream = 3 + 2 * tr.loss
    bound = upstream.abs() * tr.grad_bound + 2 * tr.loss_bound * tr.grad.abs() + 4 * bounds.U32 * (upstream * tr.grad).abs()
    bounds.assert_within(a.grad, upstream * tr.grad, bound, "gradient of 3 l + l^2")


def test_inplace_backward_writes_the_gradient_over_the_logits():
    x = torch.randn(5, 40)
    t = torch.randint(0, 40, (5,))
    tr = bounds.truth(x, t, block=64)
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf, as the output of a model's last layer
    storage = logits.data_ptr()
    loss = fused(logits, t, inplace_backward=True)
    bounds.assert_within(loss, tr.loss, tr.loss_bound, "loss")
    bounds.assert_within(logits, tr.grad, tr.grad_bound, "gradient in the logits' storage")
    loss.backward()
    bounds.assert_within(leaf.grad, tr.grad, tr.grad_bound, "gradient")
    assert logits.data_ptr() == storage



@pytest.mark.parametrize("producer", [torch.exp, torch.sigmoid, torch.tanh])
def test_inplace_backward_under_an_op_that_saved_the_logits_raises(producer):
    """exp, sigmoid, tanh save their output for backward; once the kernel wrote the gradient there, their
    backward must raise autograd's in-place error, not read the gradient as their output."""
    z = torch.randn(3, 8, requires_grad=True)
    loss = fused(producer(z), torch.tensor([1, 5, 2]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("max_block", [MAX_BLOCK, 8])  # a row in one block, and a streamed one
def test_double_backward_raises_instead_of_dropping_the_second_order_term(max_block):
    x = torch.randn(4, 20, requires_grad=True)
    loss = fused(x, torch.tensor([1, 5, 2, 0]), max_block=max_block)
    with pytest.raises(celib.InputError, match="create_graph=True.*backend='torch'"):
        torch.autograd.grad(loss, x, create_graph=True)
    (g,) = torch.autograd.grad(fused(x, torch.tensor([1, 5, 2, 0]), max_block=max_block), x)  # a plain one
    (expected,) = torch.autograd.grad(F.cross_entropy(x, torch.tensor([1, 5, 2, 0])), x)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)

def test_without_gradients_the_forward_writes_no_gradient(monkeypatch):
    """Under torch.no_grad (evaluation) the forward computes no gradient, so inplace_backward leaves the
    logits as they are; the loss is the same."""
    from celib.kernels import launch

    asked = []
    forward = launch.forward
    monkeypatch.setattr(launch, "forward", lambda *a, **k: asked.append(a[4]) or forward(*a, **k))
    logits = torch.randn(5, 40, requires_grad=True)
    t = torch.randint(0, 40, (5,))
    before = logits.detach().clone()
    with torch.no_grad():
        quiet = fused(logits, t, inplace_backward=True)
    assert asked == [False] and torch.equal(logits.detach(), before)
    loud = fused(logits, t)
    assert asked == [False, True] and torch.equal(quiet, loud.detach())


# ---------------------------------------------------------------------------------------------- half precision


def _errors(dtype, x, t):
    """|error| of the kernel and of PyTorch in ``dtype``, both against a float64 reference."""
    ref = x.double().requires_grad_(True)
    F.cross_entropy(ref, t, reduction="sum").backward()
    ref_loss = F.cross_entropy(x.double(), t, reduction="none")
    h = x.to(dtype)
    la, ga, lb, gb = both(h, t, reduction="none")
    err = lambda a, r: (a.double() - r).abs().max().item()  # noqa: E731
    return err(la, ref_loss), err(lb, ref_loss), err(ga, ref.grad), err(gb, ref.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_worse_than_torch(dtype):
    torch.manual_seed(5)
    x = (torch.randn(16, 3000) * 3).to(dtype).float()  # values exactly representable in dtype
    t = torch.randint(0, 3000, (16,))
    kernel_loss, torch_loss, kernel_grad, torch_grad = _errors(dtype, x, t)
    # The loss is summed in float32 and rounded once, so it may differ from PyTorch's by rounding.
    assert kernel_loss <= torch_loss + (1e-3 if dtype == torch.float16 else 1e-2)
    # Gradients lie in [-1, 1]. Triton's interpreter truncates float32 -> bfloat16 (a GPU rounds to
    # nearest), so under it a bf16 gradient may be off by one unit in the last place (2**-8 near 1)
    # where PyTorch is off by half of one; float16 casts round to nearest in both.
    allowance = 2.0**-8 if dtype == torch.bfloat16 else 1e-6
    assert kernel_grad <= torch_grad + allowance


def test_confident_row_keeps_its_bfloat16_gradient():
    x = torch.zeros(1, 64)
    x[0, 3] = 10.0  # true logit = max + 10
    t = torch.tensor([3])
    a = x.to(torch.bfloat16).requires_grad_(True)
    fused(a, t, reduction="sum").backward()
    exact = torch.softmax(x.double(), 1)[0, 3] - 1  # about -2.9e-3
    assert a.grad[0, 3].item() != 0.0
    assert abs(a.grad[0, 3].double() - exact) / abs(exact) < 1e-2


def test_loss_dtype():
    x = torch.randn(4, 10).to(torch.bfloat16)
    t = torch.randint(0, 10, (4,))
    assert fused(x, t).dtype == torch.bfloat16
    assert fused(x, t, loss_dtype=torch.float32).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- validation, bounds


def test_invalid_targets_raise_or_stay_in_bounds():
    x = torch.randn(3, 5)
    with pytest.raises(celib.InputError, match="class index 7"):
        fused(x, torch.tensor([0, 7, 1]))
    with pytest.raises(celib.InputError, match="float64"):
        fused(x.double(), torch.tensor([0, 1, 1]))
    with pytest.raises(celib.InputError, match="power of two"):
        with launch.tuned(max_block=48):
            pass
    # Unchecked wrong targets: no read or write outside the row (the meter sees none), and nan for those
    # rows, never a finite wrong number. The one in-range target's logit is one scalar load (15 + 1).
    report = tools.traffic(x, torch.tensor([0, 7, -5]), check_inputs=False)
    assert report.logits_read == 15 + 1 and report.grad_written == 15


def test_backend_dispatch():
    x, t = torch.randn(4, 6), torch.randint(0, 6, (4,))
    tr = bounds.truth(x, t, block=8)
    bounds.assert_within(celib.cross_entropy(x, t, backend="triton"), tr.loss, tr.loss_bound, "loss")
    assert not _backend.use_kernel("auto", x)  # CPU tensors: "auto" never picks the interpreter
    module = celib.nn.CrossEntropyLoss(label_smoothing=0.1, backend="triton")
    tr = bounds.truth(x, t, block=8, label_smoothing=0.1)
    bounds.assert_within(module(x, t), tr.loss, tr.loss_bound, "module loss")


# ------------------------------------------------- the same-program design for streamed rows (provisional)

SAME_PROGRAM = [
    dict(),
    dict(reduction="none"),
    dict(label_smoothing=0.2, weight="w", ignore_index=3, reduction="sum"),
    dict(weight="w", z_loss=1e-3, softcap=5.0),
]


@pytest.mark.parametrize("kwargs", SAME_PROGRAM, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("programs", [1, 3, None])
def test_same_program_design_matches_torch(kwargs, programs):
    """launch.Tuning.two_sweeps: the forward program sweeps a streamed row twice and writes its gradient,
    on a persistent grid of ``programs`` (None: one per row on a CPU) that must still cover every row."""
    torch.manual_seed(7)
    x = torch.randn(11, 100) * 3
    t = torch.randint(0, 100, (11,))
    t[[2, 9]] = kwargs.get("ignore_index", -100)
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(100) + 0.1
    up = torch.randn(11) if kw.get("reduction") == "none" else None
    with launch.tuned(two_sweeps=True, programs=programs):
        check(x, t, up, max_block=16, **kw)
        q = torch.softmax(torch.randn(11, 100) * 3, 1)
        kw.pop("ignore_index", None)  # not for probability targets (as in PyTorch)
        check(x, q, up, max_block=16, **kw)


def test_same_program_design_on_masked_logits():
    x, t = _masked_logits()
    with launch.tuned(two_sweeps=True, programs=2):
        loss, grad = _check_masked(x, t, max_block=16, label_smoothing=0.1)
    assert torch.isfinite(grad[:7]).all()


def test_streamed_rows_with_heavy_options_hold_16_values_per_thread():
    # one block up to MAX_BLOCK_HEAVY; a longer row streams in STREAM_BLOCK_HEAVY blocks at 8 warps
    x, t = torch.randn(2, 8000), torch.tensor([0, 7999])
    opts = LossOptions(softcap=30.0)
    one, _ = launch.plan_forward(launch.as_rows(x), t, opts, torch.ones(()), True)
    assert one.constexprs["BLOCK"] == launch.MAX_BLOCK_HEAVY == 8192 and one.constexprs["SINGLE_BLOCK"]
    x, t = torch.randn(2, 9000), torch.tensor([0, 8999])
    fwd, out = launch.plan_forward(launch.as_rows(x), t, opts, torch.ones(()), True)
    assert fwd.constexprs["BLOCK"] == launch.STREAM_BLOCK_HEAVY == 4096 and not fwd.constexprs["SINGLE_BLOCK"]
    assert fwd.num_warps == 8
    bwd, _ = launch.plan_backward(launch.as_rows(x), t, opts, out.stats, torch.ones(()), torch.ones(()))
    assert bwd.constexprs["BLOCK"] == 4096 and bwd.num_warps == 8
    plain, _ = launch.plan_forward(launch.as_rows(x), t, LossOptions(), torch.ones(()), True)
    assert plain.constexprs["BLOCK"] == 16384 and plain.num_warps == 16  # one block, index targets


def test_tuned_launch_choices_are_restored_and_checked():
    before = launch.tuning()
    with launch.tuned(max_block=32768, num_warps=8) as choice:
        assert launch.tuning() == choice and choice.max_block == 32768
        assert launch.block_size(32000) == 32768
        assert launch.block_size(32000, probability_target=True) == launch.STREAM_BLOCK_HEAVY
    assert launch.tuning() == before and launch.block_size(32000) == MAX_BLOCK
    with pytest.raises(celib.InputError, match="power of two"):
        with launch.tuned(max_block=3000):
            pass


def test_second_backward_recomputes_the_gradient():
    """retain_graph: the first backward scaled the one-block gradient in place; the second recomputes it."""
    x = torch.randn(6, 50)
    t = torch.randint(0, 50, (6,))
    tr = bounds.truth(x, t, block=64)
    a = x.clone().requires_grad_(True)
    loss = fused(a, t)
    (g1,) = torch.autograd.grad(2.0 * loss, a, retain_graph=True)
    (g2,) = torch.autograd.grad(3.0 * loss, a)
    bounds.assert_within(g1, 2 * tr.grad, 2 * tr.grad_bound, "first backward")
    bounds.assert_within(g2, 3 * tr.grad, 3 * tr.grad_bound, "second backward")


# ---------------------------------------------------------------------------------------------- 64-bit offsets


def test_row_offsets_are_64_bit():
    """row_offset must not wrap when row * stride >= 2**31, even with 32-bit arguments."""
    from celib.kernels._mode import interpreted

    assert interpreted() or torch.cuda.is_available()  # sets Triton's mode before triton is imported here
    from tests.kernel_probe import offset_probe as probe

    out = torch.zeros(2, dtype=torch.int64, device="cpu" if interpreted() else "cuda")
    probe[(2,)](out, 32766, 1, 128256, 0)
    assert out.tolist() == [32766 * 128256, 32767 * 128256]  # 4.2e9: past 2**31 - 1
    assert 32766 * 128256 > 2**31 - 1
    probe[(1,)](out, 70000, 7, 40000 * 7, 40000)
    assert out[0].item() == (70000 // 7) * 280000 + (70000 % 7) * 40000


# ---------------------------------------------------------------------------------------------- the bound itself


def test_float32_bound_is_tight_enough_to_catch_a_real_mistake():
    """The bound accepts a correct float32 result and rejects results that are slightly wrong."""
    torch.manual_seed(6)
    x = torch.randn(16, 500) * 3
    t = torch.randint(0, 500, (16,))
    tr = bounds.truth(x, t, block=512, label_smoothing=0.1)
    loss = celib.cross_entropy(x, t, label_smoothing=0.1)
    bounds.assert_within(loss, tr.loss, tr.loss_bound, "PyTorch's float32 loss")
    assert float(tr.loss_bound) < 1e-5 * float(tr.loss)  # about 100 u: loose, but not vacuous
    wrong = celib.cross_entropy(x, t, label_smoothing=0.101)  # a smoothing off by 1e-3 moves the loss by 4e-4
    with pytest.raises(AssertionError, match="exceeds the float32 bound"):
        bounds.assert_within(wrong, tr.loss, tr.loss_bound, "loss with the wrong smoothing")
    g = tr.grad.clone()
    g[3, 7] *= 1 + 1e-4  # one gradient element off by 1e-4, relative
    with pytest.raises(AssertionError, match=r"at \(3, 7\)"):
        bounds.assert_within(g, tr.grad, tr.grad_bound, "gradient")


# ---------------------------------------------------------------------------------------------- masked logits


def _masked_logits():
    """8 rows of C = 64 logits (4 blocks of 16) with -inf: scattered, whole first / middle / last blocks,
    all but one logit, the target's own logit, and a row that is entirely -inf."""
    torch.manual_seed(8)
    x = torch.randn(8, 64) * 3
    x[0, torch.rand(64) < 0.3] = -math.inf
    x[1, :16] = -math.inf  # first block
    x[2, 16:32] = -math.inf  # a middle block
    x[3, 48:] = -math.inf  # last block
    x[4, 1:] = -math.inf  # one finite logit
    x[5, 10] = -math.inf  # the target's logit (see targets)
    x[6, :48] = -math.inf  # the first three blocks
    x[7] = -math.inf  # nothing finite: nan, as in PyTorch
    t = torch.tensor([5, 20, 40, 50, 0, 10, 60, 3])
    t[0] = int((x[0] > -math.inf).nonzero()[0])
    return x, t


def _check_masked(x, target, **kwargs):
    """Finite wherever PyTorch is finite, the same infinity where PyTorch's is infinite, nan only where
    PyTorch's is nan; finite values within 1e-5 (1 + |exact|) of the float64 value, about 100 float32
    rounding units."""
    up = torch.rand(x.shape[0]) + 0.5
    la, ga, lb, gb = both(x, target, up, reduction="none", **kwargs)
    x64 = x.double().requires_grad_(True)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items() if k != "max_block"}
    t64 = target.double() if target.is_floating_point() else target
    l64 = celib.cross_entropy(x64, t64, reduction="none", backend="torch", **kw64)
    (l64 * up.double()).sum().backward()
    for what, ours, theirs, exact in (("loss", la, lb, l64.detach()), ("gradient", ga, gb, x64.grad)):
        finite = torch.isfinite(theirs)
        assert torch.isfinite(ours[finite]).all(), f"{what}: not finite where PyTorch is: {ours[finite]}"
        inf = torch.isinf(theirs)
        assert torch.equal(ours[inf], theirs[inf]), f"{what}: PyTorch gives {theirs[inf]}, celib {ours[inf]}"
        assert not (torch.isnan(ours) & ~torch.isnan(theirs)).any(), f"{what}: nan where PyTorch has none"
        both_finite = finite & torch.isfinite(exact)
        err = (ours.double() - exact)[both_finite].abs()
        assert (err <= 1e-5 * (1 + exact[both_finite].abs())).all(), f"{what}: error {err.max():.3g}"
    return la, ga


MASKED = [
    dict(),
    dict(max_block=16),
    dict(max_block=16, weight="w"),
    dict(max_block=16, label_smoothing=0.1),
    dict(max_block=16, label_smoothing=0.1, weight="w"),
    dict(max_block=16, z_loss=1e-3),
    dict(max_block=16, softcap=4.0),
    dict(label_smoothing=0.2, weight="w", z_loss=1e-3, softcap=4.0),
    dict(max_block=16, ignore_index=3),
]


@pytest.mark.parametrize("kwargs", MASKED, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_masked_logits_index_targets_as_pytorch(kwargs):
    x, t = _masked_logits()
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(64) + 0.1
        kw["weight"][[7, 33]] = 0.0  # zero-weight classes: 0 * inf must not make a nan of its own
    loss, grad = _check_masked(x, t, **kw)
    assert torch.isfinite(grad[:7]).all()  # every row with a finite logit has a finite gradient
    if "softcap" not in kw and "ignore_index" not in kw:
        assert torch.isinf(loss[5]) and torch.isnan(loss[7])  # -inf target logit: inf; all -inf: nan


@pytest.mark.parametrize("max_block", [None, 2])
def test_a_row_of_only_minus_inf_is_nan_whatever_its_target_factor(max_block):
    """nan, as PyTorch gives, also where the target's own factor is 0 and only the class mass sees the row:
    probability targets, smoothing 1, a zero class weight (the kernel once returned +inf there)."""
    x = torch.tensor([[0.5, 1.0, -2.0], [-math.inf] * 3])
    t = torch.tensor([0, 1])
    cases = [(torch.tensor([[0.2, 0.3, 0.5]] * 2), {}), (t, dict(label_smoothing=1.0)),
             (t, dict(weight=torch.tensor([1.0, 0.0, 1.0]), label_smoothing=0.1))]
    for target, opts in cases:
        ours = fused(x, target, reduction="none", max_block=max_block, **opts)
        theirs = F.cross_entropy(x, target, reduction="none", **opts)
        assert torch.isnan(theirs[1]) and torch.isnan(ours[1]), (opts, ours)
        assert torch.allclose(ours[0], theirs[0], rtol=1e-6)


@pytest.mark.parametrize("max_block", [None, 16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_logits_probability_targets(max_block, smoothing):
    x, _ = _masked_logits()
    x = x[:7]
    q = torch.softmax(torch.randn(7, 64), 1)
    q[torch.isinf(x)] = 0.0  # no mass on masked classes: finite loss (PyTorch computes 0 * inf = nan)
    q = q / q.sum(1, keepdim=True)
    loss, grad = _check_masked(x, q, max_block=max_block, label_smoothing=smoothing)
    assert torch.isfinite(grad).all()
    assert torch.isfinite(loss).all() if not smoothing else torch.isinf(loss).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_index_targets_that_are_views_with_a_stride(reduction):
    """A column of a label table, every other label, or an expanded label: the target is a view whose
    elements are not one apart (the kernel read them as if they were: a wrong loss, no error)."""
    torch.manual_seed(4)
    x = torch.randn(6, 11)
    table = torch.randint(0, 11, (6, 3))
    for target in (table[:, 1], torch.randint(0, 11, (12,))[::2], torch.tensor(7).expand(6)):
        assert target.stride(0) != 1
        check(x, target, reduction=reduction)
        check(x, target, reduction=reduction, max_block=4)  # streamed rows


def test_inplace_backward_refuses_overlapping_logits():
    # an expand()-ed row: writing the gradient over it would feed rows each other's gradients
    row = torch.randn(1, 5, requires_grad=True)
    with pytest.raises(celib.InputError, match="share memory"):
        fused((row * 1.0).expand(4, 5), torch.tensor([0, 1, 2, 3]), inplace_backward=True)


def test_class_strides_past_int32_offsets_are_refused():
    # the kernels form offsets within a row in 32 bits: a transposed (C, N) buffer with (C - 1) * N >= 2**31
    def plan(stride):
        x = torch.empty_strided((2, 131072, 1), (1, stride, 1), device="meta", dtype=torch.bfloat16)
        t = torch.zeros(2, dtype=torch.long, device="meta")
        return launch.plan_forward(x, t, LossOptions(), torch.ones((), device="meta"), True)

    assert plan(16383)[0].kernel == "forward_kernel"  # (C - 1) * 16383 < 2**31
    with pytest.raises(celib.InputError, match="2\\*\\*31"):
        plan(16385)
