"""celib.ref (NumPy, float64) against PyTorch, on the same grid as celib's losses."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import celib
import celib.ref as ref
from tests.cases import CECase, cross_entropy_cases

CASES = cross_entropy_cases()


def _np(kwargs: dict) -> dict:
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_cross_entropy_and_gradient_match_torch(case: CECase):
    x = case.input.clone().requires_grad_(True)
    loss = F.cross_entropy(x, case.target, **case.kwargs)
    loss.sum().backward()
    ours = ref.cross_entropy(case.input.numpy(), case.target.numpy(), **_np(case.kwargs))
    grad = ref.cross_entropy_grad(case.input.numpy(), case.target.numpy(), **_np(case.kwargs))
    assert np.shape(ours) == tuple(loss.shape)
    np.testing.assert_allclose(ours, loss.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_nll_and_binary_losses(reduction):
    logp = torch.log_softmax(torch.randn(5, 4, 2, dtype=torch.float64), 1)
    t = torch.randint(0, 4, (5, 2))
    t[0, 1] = -100
    w = torch.rand(4, dtype=torch.float64)
    np.testing.assert_allclose(
        ref.nll_loss(logp.numpy(), t.numpy(), w.numpy(), reduction=reduction),
        F.nll_loss(logp, t, w, reduction=reduction).numpy(),
        rtol=1e-12,
    )
    z = torch.randn(6, 3, dtype=torch.float64) * 5
    y = (torch.rand(6, 3) > 0.5).double()
    bw, pw = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) * 3
    np.testing.assert_allclose(
        ref.binary_cross_entropy_with_logits(z.numpy(), y.numpy(), bw.numpy(), reduction, pw.numpy()),
        F.binary_cross_entropy_with_logits(z, y, bw, reduction=reduction, pos_weight=pw).numpy(),
        rtol=1e-12,
    )
    p = torch.sigmoid(z)
    p[0, 0], p[1, 1] = 0.0, 1.0
    np.testing.assert_allclose(
        ref.binary_cross_entropy(p.numpy(), y.numpy(), bw.numpy(), reduction),
        F.binary_cross_entropy(p, y, bw, reduction=reduction).numpy(),
        rtol=1e-12,
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div(reduction, log_target):
    logq = torch.log_softmax(torch.randn(3, 5, dtype=torch.float64), 1)
    p = torch.softmax(torch.randn(3, 5, dtype=torch.float64), 1)
    if not log_target:
        p[1, 2] = 0.0
    target = p.log() if log_target else p
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = F.kl_div(logq, target, reduction=reduction, log_target=log_target).numpy()
    np.testing.assert_allclose(ref.kl_div(logq.numpy(), target.numpy(), reduction, log_target), expected, rtol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_losses_match_celib(gamma, reduction):
    import celib

    x = torch.randn(6, 4, dtype=torch.float64) * 2
    t = torch.tensor([0, 1, 2, 3, -100, 1])
    w = torch.rand(4, dtype=torch.float64) + 0.1
    np.testing.assert_allclose(
        ref.focal_loss(x.numpy(), t.numpy(), w.numpy(), gamma=gamma, reduction=reduction),
        celib.focal_loss(x, t, w, gamma=gamma, reduction=reduction).numpy(),
        rtol=1e-12,
    )
    y = (torch.rand(6, 4) > 0.6).double()
    np.testing.assert_allclose(
        ref.sigmoid_focal_loss(x.numpy(), y.numpy(), 0.25, gamma, reduction),
        celib.sigmoid_focal_loss(x, y, 0.25, gamma, reduction).numpy(),
        rtol=1e-12,
    )


def test_stable_building_blocks_at_extreme_logits():
    z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e5, 1e5, 1e5]])
    tz = torch.tensor(z)
    np.testing.assert_allclose(ref.logsumexp(z), torch.logsumexp(tz, 1).numpy(), rtol=1e-15)
    np.testing.assert_allclose(ref.log_softmax(z), F.log_softmax(tz, 1).numpy(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(ref.softmax(z), torch.softmax(tz, 1).numpy(), rtol=1e-15)
    x = np.array([-1e4, -40.0, 0.0, 40.0, 1e4])
    np.testing.assert_allclose(ref.sigmoid(x), torch.sigmoid(torch.tensor(x)).numpy(), rtol=1e-15)
    np.testing.assert_allclose(ref.log_sigmoid(x), F.logsigmoid(torch.tensor(x)).numpy(), rtol=1e-15)
    assert np.all(np.isfinite(ref.log_sigmoid(x)))
    assert ref.logsumexp(np.array([-np.inf, -np.inf])) == -np.inf


def test_information_quantities():
    p = np.array([0.5, 0.25, 0.25, 0.0])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    assert ref.entropy(p, base=2) == pytest.approx(1.5)
    assert ref.entropy(p) == pytest.approx(1.5 * np.log(2))
    assert ref.cross_entropy_dist(p, q, base=2) == pytest.approx(2.0)
    assert ref.kl_divergence(p, q, base=2) == pytest.approx(0.5)
    assert ref.kl_divergence(q, p) == np.inf
    assert ref.entropy(np.eye(3)).tolist() == [0.0, 0.0, 0.0]


def test_ref_imports_no_framework_and_has_no_python_loops():
    source = inspect.getsource(ref)
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"numpy", "__future__"}, imported
    loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While, ast.comprehension))]
    assert loops == []


@pytest.mark.parametrize("kwargs", [dict(), dict(label_smoothing=0.1), dict(weight=[1.0, 2.0, 0.5])])
def test_an_ignored_row_with_a_minus_inf_logit_adds_0(kwargs):
    """The placeholder class of an ignored row (0) may have a -inf logit: 0, not 0 * inf = nan, and no
    floating-point warning."""
    z = np.array([[-np.inf, 0.0, 0.0], [0.0, 1.0, 2.0], [0.5, -np.inf, 1.0]])
    t = np.array([-100, 1, 2])
    torch_kwargs = {k: torch.tensor(v, dtype=torch.float64) if k == "weight" else v for k, v in kwargs.items()}
    with np.errstate(all="raise"):
        got = ref.cross_entropy(z, t, **kwargs)
        got_nll = ref.nll_loss(ref.log_softmax(z), t, weight=kwargs.get("weight"))
        got_focal = ref.focal_loss(z, t, weight=kwargs.get("weight"), gamma=2.0)
    zt, tt = torch.tensor(z), torch.tensor(t)
    assert got == pytest.approx(F.cross_entropy(zt, tt, **torch_kwargs).item(), rel=1e-12)
    w = torch_kwargs.get("weight")
    assert got_nll == pytest.approx(F.nll_loss(torch.log_softmax(zt, 1), tt, weight=w).item(), rel=1e-12)
    assert got_focal == pytest.approx(celib.focal_loss(zt, tt, w, gamma=2.0).item(), rel=1e-12)


def test_a_mean_over_cancelling_weights_has_a_zero_gradient():
    """Weights summing to 0 over the kept targets: the mean is +-inf and its gradient 0 (celib's kernels'
    convention), not the sum's gradient."""
    x = np.random.default_rng(0).normal(size=(2, 3))
    t, w = np.array([0, 1]), np.array([1.0, -1.0, 1.0])
    assert np.isinf(ref.cross_entropy(x, t, w))
    assert np.array_equal(ref.cross_entropy_grad(x, t, w), np.zeros((2, 3)))
    assert np.abs(ref.cross_entropy_grad(x, t, w, reduction="sum")).sum() > 0


def test_kl_div_batchmean_of_a_0_dim_input_is_one_example():
    got = ref.kl_div(np.array(-1.0), np.array(0.5), "batchmean")
    want = torch.nn.functional.kl_div(torch.tensor(-1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64),
                                      reduction="batchmean").item()
    assert abs(got - want) < 1e-15


def test_log_softmax_forms_the_differences_first():
    """z - logsumexp(z) would round the LSE at 1030 (spacing 2.3e-13) and return 0 for this loss."""
    z = np.array([[1030.0, 1000.0]])
    exact = np.log1p(np.exp(-30.0))  # 9.36e-14
    assert abs(ref.cross_entropy(z, np.array([0])) / exact - 1) < 2e-3  # the log(1 + s) rounding
    assert abs(-ref.log_softmax(z)[0, 0] / exact - 1) < 2e-3
