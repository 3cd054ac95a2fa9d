"""celib's PyTorch losses against torch.nn.functional: values, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import celib
from celib import InputError, kernels
from tests.cases import CECase, cross_entropy_cases

CASES = cross_entropy_cases()


def _value_and_grad(fn, x: torch.Tensor, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    upstream = torch.rand_like(out) if out.dim() else torch.tensor(1.7, dtype=out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_cross_entropy_matches_torch(case: CECase):
    torch.manual_seed(0)
    theirs, g_theirs = _value_and_grad(F.cross_entropy, case.input, case.target, **case.kwargs)
    torch.manual_seed(0)
    ours, g_ours = _value_and_grad(celib.cross_entropy, case.input, case.target, backend="torch", **case.kwargs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_dtypes(dtype):
    x = torch.randn(8, 5, dtype=dtype)
    t = torch.randint(0, 5, (8,))
    out = celib.cross_entropy(x, t, label_smoothing=0.1)
    assert out.dtype == dtype
    torch.testing.assert_close(out, F.cross_entropy(x, t, label_smoothing=0.1), rtol=0, atol=0)


def test_auto_backend_on_cpu_is_torch():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert torch.equal(celib.cross_entropy(x, t, backend="auto"), F.cross_entropy(x, t))


def test_integer_targets_of_other_dtypes_are_accepted():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(celib.cross_entropy(x, t.to(dtype)), F.cross_entropy(x, t))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_gradcheck_float64(reduction, smoothing):
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (4, 3))
    t[0, 0] = -100
    w = torch.rand(5, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda z: celib.cross_entropy(z, t, w, reduction=reduction, label_smoothing=smoothing), (x,)
    )
    p = torch.softmax(torch.randn(4, 5, 3, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(lambda z: celib.cross_entropy(z, p, w, reduction=reduction), (x,))
    assert torch.autograd.gradcheck(lambda z: celib.focal_loss(z, t, w, gamma=2.0, reduction=reduction), (x,))


# ---------------------------------------------------------------------------- extras (reference semantics of the kernel)


def test_softcap_and_z_loss_follow_their_definitions():
    x = torch.randn(6, 9, dtype=torch.float64) * 5
    t = torch.tensor([0, 1, -100, 3, 4, 8])
    w = torch.rand(9, dtype=torch.float64) + 0.5
    capped = 3.0 * torch.tanh(x / 3.0)
    lse = torch.logsumexp(capped, 1)
    kept = (t != -100).double()
    per_row = F.cross_entropy(capped, t, w, reduction="none") + 1e-2 * lse**2 * kept
    w_t = w[t.clamp_min(0)] * kept
    expected = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / w_t.sum()}
    for reduction, value in expected.items():
        loss, got_lse = celib.cross_entropy(x, t, w, reduction=reduction, softcap=3.0, z_loss=1e-2, return_lse=True)
        torch.testing.assert_close(loss, value)
        assert got_lse.dtype == torch.float32
        torch.testing.assert_close(got_lse, lse.float())


def test_loss_dtype_upcasts_half_losses():
    x = torch.randn(4, 3).to(torch.bfloat16)
    t = torch.tensor([0, 1, 2, 0])
    assert celib.cross_entropy(x, t).dtype == torch.bfloat16
    assert celib.cross_entropy(x, t, loss_dtype=torch.float32).dtype == torch.float32


# ---------------------------------------------------------------------------- the other losses


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_nll_loss_matches_torch(reduction):
    logp = torch.log_softmax(torch.randn(6, 4, 3, dtype=torch.float64), 1)
    t = torch.randint(0, 4, (6, 3))
    t[1, 2] = -100
    w = torch.rand(4, dtype=torch.float64)
    ours, g1 = _value_and_grad(celib.nll_loss, logp, t, w, reduction=reduction)
    torch.manual_seed(0)
    theirs, g2 = _value_and_grad(F.nll_loss, logp, t, w, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_binary_losses_match_torch(reduction):
    z = torch.randn(5, 3, dtype=torch.float64) * 4
    y = (torch.rand(5, 3) > 0.5).double()
    w = torch.rand(3, dtype=torch.float64)
    pw = torch.rand(3, dtype=torch.float64) * 3
    torch.testing.assert_close(
        celib.binary_cross_entropy_with_logits(z, y, w, reduction=reduction, pos_weight=pw),
        F.binary_cross_entropy_with_logits(z, y, w, reduction=reduction, pos_weight=pw),
        rtol=0,
        atol=0,
    )
    p = torch.sigmoid(z)
    torch.testing.assert_close(
        celib.binary_cross_entropy(p, y, w, reduction=reduction), F.binary_cross_entropy(p, y, w, reduction=reduction), rtol=0, atol=0
    )


def test_binary_cross_entropy_clamps_log_like_torch():
    p = torch.tensor([0.0, 1.0, 1.0])
    y = torch.tensor([1.0, 0.0, 1.0])
    loss = celib.binary_cross_entropy(p, y, reduction="none")
    assert loss.tolist() == [100.0, 100.0, 0.0]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_matches_torch(reduction, log_target):
    logq = torch.log_softmax(torch.randn(4, 6, dtype=torch.float64), 1)
    p = torch.softmax(torch.randn(4, 6, dtype=torch.float64), 1)
    p[0, 0] = 0.0
    target = p.log() if log_target else p
    with pytest.warns(UserWarning) if reduction == "mean" else _nothing():
        ours = celib.kl_div(logq, target, reduction=reduction, log_target=log_target)
    with pytest.warns(UserWarning) if reduction == "mean" else _nothing():
        theirs = F.kl_div(logq, target, reduction=reduction, log_target=log_target)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_loss_formula(alpha, reduction):
    z = torch.randn(7, 3, dtype=torch.float64) * 3
    y = (torch.rand(7, 3) > 0.7).double()
    p = torch.sigmoid(z)
    ce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    p_t = p * y + (1 - p) * (1 - y)
    expected = ce * (1 - p_t) ** 2
    if alpha >= 0:
        expected = (alpha * y + (1 - alpha) * (1 - y)) * expected
    expected = {"none": expected, "mean": expected.mean(), "sum": expected.sum()}[reduction]
    torch.testing.assert_close(celib.sigmoid_focal_loss(z, y, alpha, 2.0, reduction), expected)
    assert celib.sigmoid_focal_loss(z, y).shape == z.shape  # default reduction is "none"


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_loss_with_gamma_zero_is_cross_entropy(reduction):
    x = torch.randn(6, 5, 2, dtype=torch.float64)
    t = torch.randint(0, 5, (6, 2))
    t[0] = 4
    t[2, 1] = -100
    w = torch.rand(5, dtype=torch.float64) + 0.2
    ours, g1 = _value_and_grad(celib.focal_loss, x, t, w, gamma=0.0, ignore_index=-100, reduction=reduction)
    torch.manual_seed(0)
    theirs, g2 = _value_and_grad(F.cross_entropy, x, t, w, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


def test_focal_loss_formula_and_finite_gradient_when_certain():
    x = torch.tensor([[50.0, 0.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1])
    loss = celib.focal_loss(x, t, gamma=0.5, reduction="none")
    p = torch.softmax(x.detach(), 1)
    expected = -(1 - p[[0, 1], t]) ** 0.5 * torch.log(p[[0, 1], t])
    torch.testing.assert_close(loss.detach(), expected)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_focal_loss_all_ignored_mean_is_nan():
    out = celib.focal_loss(torch.randn(3, 4), torch.full((3,), -100))
    assert torch.isnan(out)


def test_modules_match_functional():
    x, t = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, -100])
    w = torch.rand(4)
    assert torch.equal(celib.nn.CrossEntropyLoss(w, label_smoothing=0.1)(x, t), torch.nn.CrossEntropyLoss(w, label_smoothing=0.1)(x, t))
    y = (torch.rand(5, 4) > 0.5).float()
    assert torch.equal(celib.nn.BCEWithLogitsLoss(pos_weight=w)(x, y), torch.nn.BCEWithLogitsLoss(pos_weight=w)(x, y))
    assert torch.equal(celib.nn.FocalLoss(gamma=1.5, weight=w)(x, t), celib.focal_loss(x, t, w, gamma=1.5))
    assert "weight" in dict(celib.nn.CrossEntropyLoss(w).named_buffers())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 2.0])
def test_sigmoid_focal_loss_gradient_finite_at_large_logits(dtype, gamma):
    """gamma < 1 with p_t rounding to 1 (|z| = 40): the literal (1 - p_t) ** gamma has an infinite derivative
    there (nan gradient); celib's log form stays finite and matches the formula where that is finite."""
    z = torch.tensor([40.0, -40.0, 3.0, -2.0, 0.5], dtype=dtype, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0, 0.3, 0.0], dtype=dtype)
    loss = celib.sigmoid_focal_loss(z, t, gamma=gamma, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert z.grad[:2].abs().max() < 1e-15  # confident and right: (almost) no push
    z64 = z.detach()[2:].double().requires_grad_(True)
    p = torch.sigmoid(z64)
    t64 = t[2:].double()
    p_t = p * t64 + (1 - p) * (1 - t64)
    literal = F.binary_cross_entropy_with_logits(z64, t64, reduction="none") * (1 - p_t) ** gamma
    literal = ((0.25 * t64 + 0.75 * (1 - t64)) * literal).sum()
    literal.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    # the two confident elements add less than 1e-15 to the loss: the rest is the literal formula's
    torch.testing.assert_close(loss.detach().double(), literal.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(z.grad[2:].double(), z64.grad, rtol=tol, atol=tol)


# ------------------------------------------------------------------------ PyTorch's positional order


def _legacy_warning():
    return pytest.warns(UserWarning, match="size_average and reduce args will be deprecated")


def test_pytorch_positional_calls_mean_the_same():
    """Every drop-in takes PyTorch's arguments in PyTorch's positions, size_average/reduce included."""
    torch.manual_seed(0)
    x, t = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 2])
    w = torch.rand(5) + 0.5
    # input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
    args = (w, None, 2, None, "sum", 0.1)
    assert torch.equal(celib.cross_entropy(x, t, *args), F.cross_entropy(x, t, *args))
    assert torch.equal(celib.cross_entropy(x, t, None, None, -1), F.cross_entropy(x, t, None, None, -1))
    logp = F.log_softmax(x, 1)
    assert torch.equal(celib.nll_loss(logp, t, w, None, 2, None, "sum"), F.nll_loss(logp, t, w, None, 2, None, "sum"))
    p, y = torch.sigmoid(x), (torch.rand(6, 5) > 0.5).float()
    assert torch.equal(celib.binary_cross_entropy(p, y, w, None, None, "sum"),
                       F.binary_cross_entropy(p, y, w, None, None, "sum"))
    assert torch.equal(celib.binary_cross_entropy_with_logits(x, y, w, None, None, "sum", w),
                       F.binary_cross_entropy_with_logits(x, y, w, None, None, "sum", w))
    q = torch.softmax(torch.randn(6, 5), 1)
    assert torch.equal(celib.kl_div(logp, q, None, None, "batchmean", False),
                       F.kl_div(logp, q, None, None, "batchmean", False))
    ours = celib.nn.CrossEntropyLoss(w, None, 2, None, "sum", 0.1)(x, t)
    assert torch.equal(ours, torch.nn.CrossEntropyLoss(w, None, 2, None, "sum", 0.1)(x, t))
    assert torch.equal(celib.nn.BCEWithLogitsLoss(w, None, None, "sum", w)(x, y),
                       torch.nn.BCEWithLogitsLoss(w, None, None, "sum", w)(x, y))


@pytest.mark.parametrize("size_average,reduce", [(False, None), (None, False), (True, True), (False, True)])
def test_deprecated_size_average_and_reduce_map_as_in_pytorch(size_average, reduce):
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with _legacy_warning():
        theirs = F.cross_entropy(x, t, None, size_average, -100, reduce)
    with _legacy_warning():
        ours = celib.cross_entropy(x, t, None, size_average, -100, reduce)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    with _legacy_warning():
        module = celib.nn.CrossEntropyLoss(None, size_average, -100, reduce)
    with _legacy_warning():
        assert torch.equal(module(x, t), torch.nn.CrossEntropyLoss(None, size_average, -100, reduce)(x, t))


def test_celibs_old_positional_order_is_a_clear_error():
    """cross_entropy(x, t, w, -100) meant ignore_index=-100 in celib before it took PyTorch's order; now the
    fourth place is size_average, and an int there is refused, naming the argument and the fix."""
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(InputError, match=r"size_average=-100: .*by keyword, e.g. ignore_index="):
        celib.cross_entropy(x, t, None, -100)
    with pytest.raises(InputError, match=r"reduce='sum'"):
        celib.cross_entropy(x, t, None, None, -100, "sum")


def test_focal_loss_takes_weight_third_and_gamma_by_keyword():
    torch.manual_seed(1)
    x, t, w = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, -100]), torch.rand(4) + 0.5
    assert torch.equal(celib.focal_loss(x, t, w), celib.focal_loss(x, t, weight=w, gamma=2.0))
    torch.testing.assert_close(celib.focal_loss(x, t, w, gamma=0.0), celib.cross_entropy(x, t, w))
    with pytest.raises(InputError, match=r"gamma is keyword-only: focal_loss\(input, target, gamma=2.0\)"):
        celib.focal_loss(x, t, 2.0)
    with pytest.raises(TypeError):
        celib.focal_loss(x, t, w, 2.0)  # keyword-only, as documented
    assert torch.equal(celib.nn.FocalLoss(w, gamma=1.5)(x, t), celib.focal_loss(x, t, w, gamma=1.5))
    y = (torch.rand(6, 4) > 0.5).float()
    with pytest.raises(InputError, match=r"alpha must be a number.*torchvision's"):
        celib.sigmoid_focal_loss(x, y, w)
    with pytest.raises(InputError, match=r"gamma must be a number"):
        celib.sigmoid_focal_loss(x, y, 0.25, torch.tensor(2.0))


def test_cross_entropy_module_has_every_option_of_the_function():
    import inspect

    options = set(inspect.signature(celib.cross_entropy).parameters) - {"input", "target"}
    assert options == set(inspect.signature(celib.nn.CrossEntropyLoss).parameters)
    x, t = torch.randn(4, 3).to(torch.bfloat16), torch.tensor([0, 1, 2, 1])
    loss, lse = celib.nn.CrossEntropyLoss(loss_dtype=torch.float32, return_lse=True)(x, t)
    assert loss.dtype == torch.float32 and torch.equal(loss, celib.cross_entropy(x, t, loss_dtype=torch.float32))
    assert lse.shape == (4,)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if kernels.available() else []))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_loss_dtype_computes_in_float32_on_every_backend(backend, dtype):
    torch.manual_seed(0)
    x = (torch.randn(8, 1000) * 4).to(dtype)
    t = torch.randint(0, 1000, (8,))
    exact = F.cross_entropy(x.double(), t)
    loss = celib.cross_entropy(x, t, backend=backend, loss_dtype=torch.float32)
    assert loss.dtype == torch.float32
    assert abs(loss.double() - exact) < 1e-6 * abs(exact)  # float32 accuracy, not the half dtype's
    a = x.clone().requires_grad_(True)
    celib.cross_entropy(a, t, backend=backend, loss_dtype=torch.float32).backward()
    assert a.grad.dtype == dtype


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if kernels.available() else []))
def test_return_lse_is_detached_on_every_backend(backend):
    """No gradient flows through the returned lse, whatever the backend (use z_loss for a loss on it)."""
    x = torch.randn(4, 7, requires_grad=True)
    t = torch.tensor([0, 3, 6, 1])
    loss, lse = celib.cross_entropy(x, t, backend=backend, return_lse=True)
    assert not lse.requires_grad and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(x.detach(), 1))


def test_a_probability_target_that_requires_grad_gets_its_gradient_or_a_clear_error():
    """The kernel gives a probability target no gradient: "auto" then runs PyTorch, "triton" refuses."""
    x = torch.randn(3, 5)
    q = torch.softmax(torch.randn(3, 5), 1).requires_grad_(True)
    celib.cross_entropy(x, q, backend="auto").backward()
    expected = -torch.log_softmax(x, 1) / 3
    assert torch.allclose(q.grad, expected, atol=1e-6)
    if kernels.available():
        with pytest.raises(celib.InputError, match="no gradient to a probability target"):
            celib.cross_entropy(x, q, backend="triton")
        assert celib.cross_entropy(x, q.detach(), backend="triton").requires_grad is False


def test_softcap_and_z_loss_must_be_finite():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for kwargs in (dict(softcap=float("inf")), dict(z_loss=float("inf")), dict(z_loss=float("nan"))):
        with pytest.raises(celib.InputError, match="finite"):
            celib.cross_entropy(x, t, **kwargs)


def test_focal_loss_ignored_row_with_a_masked_class_0_has_zero_gradient():
    """An ignored row reads the placeholder class 0; a -inf logit there must not make its gradient nan."""
    x = torch.tensor([[-float("inf"), 1.0, 2.0], [0.5, 1.0, -1.0]], requires_grad=True)
    t = torch.tensor([-100, 1])
    celib.focal_loss(x, t, gamma=2.0).backward()
    assert torch.equal(x.grad[0], torch.zeros(3))
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if kernels.available() else []))
@pytest.mark.parametrize("with_weight", [False, True])
def test_autocast_gives_pytorchs_float32_loss_on_every_backend(backend, with_weight):
    """Under autocast, half logits give a float32 loss with float32 class weights, as autocast's
    cross_entropy does (the kernel used to return the input's bfloat16, and the torch path rounded the
    weights to bfloat16)."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(8, 5)
    x = torch.randn(16, 8, generator=g)
    t = torch.randint(0, 5, (16,), generator=g)
    w = torch.rand(5, generator=g) if with_weight else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        ours = celib.cross_entropy(logits, t, w, backend=backend)
        theirs = F.cross_entropy(logits, t, w)
    assert logits.dtype == torch.bfloat16
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    outside = celib.cross_entropy(logits, t, w, backend=backend)  # no autocast: the input's dtype
    assert outside.dtype == torch.bfloat16


def test_auto_backend_needs_a_supported_triton(monkeypatch):
    """"auto" picks the kernel only with a triton celib supports; an older one means PyTorch."""
    from celib import _backend, _versions

    x = torch.randn(2, 3)
    cuda_like = type("T", (), {"is_cuda": True, "dtype": torch.float32})()
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(_versions, "triton_supported", lambda: False)
    assert _backend.use_kernel("auto", cuda_like) is False
    monkeypatch.setattr(_versions, "triton_supported", lambda: True)
    assert _backend.use_kernel("auto", cuda_like) is True
    assert _backend.use_kernel("auto", x) is False  # a CPU tensor: never the interpreter


def test_triton_supported_reads_the_installed_version(monkeypatch):
    import importlib.metadata

    from celib import _versions

    for version, expected in (("3.5.1", False), ("3.6.0", True), ("3.9.0", True)):
        _versions.triton_supported.cache_clear()
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=version: v)
        assert _versions.triton_supported() is expected
    _versions.triton_supported.cache_clear()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert _versions.triton_supported() is False
    _versions.triton_supported.cache_clear()


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if kernels.available() else []))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_of_an_ignored_row_of_minus_inf_logits_is_0(backend, reduction):
    """An ignored row whose logits are all -inf (its lse is -inf) adds nothing: on the torch backend
    z_loss * lse**2 * 0 was inf * 0 = nan; the kernel masks the row."""
    x = torch.tensor([[-torch.inf] * 3, [0.5, 2.0, -1.0]])
    t = torch.tensor([-100, 1])
    loss = celib.cross_entropy(x, t, z_loss=0.1, reduction=reduction, backend=backend)
    lse = torch.logsumexp(x[1], 0)
    row = F.cross_entropy(x[1:], t[1:], reduction="sum") + 0.1 * lse**2
    expected = torch.stack([torch.tensor(0.0), row]) if reduction == "none" else row
    torch.testing.assert_close(loss, expected)


def test_an_unknown_backend_is_refused_with_a_probability_target_that_requires_grad():
    x = torch.randn(3, 4)
    probs = torch.softmax(torch.randn(3, 4), 1).requires_grad_()
    with pytest.raises(InputError, match="backend='bogus'"):
        celib.cross_entropy(x, probs, backend="bogus")


def test_nll_loss_takes_a_weight_of_another_dtype_as_cross_entropy_does():
    logp = torch.log_softmax(torch.randn(5, 4), 1)
    t = torch.tensor([0, 3, 1, -100, 2])
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    loss = celib.nll_loss(logp, t, w)  # F.nll_loss: RuntimeError (expected scalar type Float but found Double)
    assert loss.dtype == torch.float32
    assert loss.item() == F.nll_loss(logp, t, w.float()).item()


def test_sigmoid_focal_loss_refuses_targets_outside_0_1():
    x = torch.randn(4)
    for bad in (torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([0.0, 1.5, 1.0, 0.0])):
        with pytest.raises(InputError, match=r"targets must hold probabilities in \[0, 1\].*\(targets \+ 1\) / 2"):
            celib.sigmoid_focal_loss(x, bad)  # was a silent nan (log of a negative label)
    soft = torch.tensor([0.0, 0.3, 1.0, 0.7])
    assert torch.isfinite(celib.sigmoid_focal_loss(x, soft)).all()


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if kernels.available() else []))
def test_probability_targets_give_pytorchs_promoted_dtype_and_float32_accuracy(backend):
    torch.manual_seed(0)
    x = torch.randn(64, 50)
    q = torch.softmax(torch.randn(64, 50, dtype=torch.float64) * 2, 1)
    for xd, qd in ((torch.float32, torch.float64), (torch.float16, torch.float32),
                   (torch.bfloat16, torch.float16), (torch.bfloat16, torch.float64)):
        a, b = x.to(xd), q.to(qd)
        loss = celib.cross_entropy(a, b, backend=backend)
        assert loss.dtype == torch.promote_types(xd, qd)  # as F.cross_entropy
        if backend == "torch":
            assert torch.equal(loss, F.cross_entropy(a, b))
        else:  # the kernel computes in float32; a float64 target is not rounded to the logits' dtype
            exact = F.cross_entropy(a.double(), b.double()).item()
            assert abs(loss.item() - exact) < 1e-6 * exact
