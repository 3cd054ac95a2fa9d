"""celib.cross_entropy under torch.compile(fullgraph=True): one graph, the same values and gradients."""

from __future__ import annotations

import pytest
import torch

import celib
from celib import kernels
from celib.kernels import launch
from tests import bounds

COMPILERS = ["eager", "aot_eager", "inductor"]


def _inductor_works() -> bool:
    try:
        torch.compile(lambda a: a * 2, backend="inductor", fullgraph=True)(torch.ones(2))
        return True
    except Exception:  # noqa: BLE001 - no C++ compiler, or another reason inductor cannot build here
        return False


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_matches_eager(compiler, backend, reduction):
    if backend == "triton" and not kernels.available():
        pytest.skip("triton is not installed")
    if compiler == "inductor" and not _inductor_works():
        pytest.skip("inductor cannot compile on this machine")
    torch.manual_seed(0)
    x = torch.randn(8, 300)
    t = torch.randint(0, 300, (8,))
    t[2] = -100
    w = torch.rand(300) + 0.5
    up = torch.rand(8) if reduction == "none" else torch.tensor(1.0)

    def loss_fn(logits, target):
        return celib.cross_entropy(logits, target, w, reduction=reduction, label_smoothing=0.1, backend=backend,
                                   z_loss=1e-3)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    a = x.clone().requires_grad_(True)
    loss = compiled(a, t)
    (loss * up).sum().backward()
    tr = bounds.truth(x, t, up if reduction == "none" else None, block=512, weight=w, reduction=reduction,
                      label_smoothing=0.1, z_loss=1e-3)
    bounds.assert_within(loss, tr.loss, tr.loss_bound, f"compiled loss ({compiler}, {backend})")
    bounds.assert_within(a.grad, tr.grad, tr.grad_bound, f"compiled gradient ({compiler}, {backend})")


def test_streamed_rows_under_compile():
    if not kernels.available():
        pytest.skip("triton is not installed")
    x, t = torch.randn(4, 1000), torch.randint(0, 1000, (4,))
    compiled = torch.compile(lambda a, b: celib.cross_entropy(a, b, backend="triton"), fullgraph=True,
                             backend="aot_eager")
    a = x.clone().requires_grad_(True)
    with launch.tuned(max_block=128):
        compiled(a, t).backward()
    tr = bounds.truth(x, t, block=128)
    bounds.assert_within(a.grad, tr.grad, tr.grad_bound, "compiled gradient, streamed rows")


def test_inplace_backward_refused_under_compile():
    if not kernels.available():
        pytest.skip("triton is not installed")
    compiled = torch.compile(lambda a, b: celib.cross_entropy(a, b, backend="triton", inplace_backward=True),
                             fullgraph=True,
                             backend="eager")
    with pytest.raises(Exception, match="inplace_backward"):
        compiled(torch.randn(3, 5, requires_grad=True), torch.tensor([0, 1, 2]))


def test_compiled_lse_is_detached_as_in_eager():
    """Under torch.compile the lse comes from the custom op, whose backward has no lse term: it is returned
    detached, as eagerly, instead of claiming a gradient that backward would drop."""
    if not kernels.available():
        pytest.skip("triton is not installed")
    x, t = torch.randn(4, 9), torch.tensor([0, 8, 3, 1])

    def f(a):
        loss, lse = celib.cross_entropy(a, t, backend="triton", return_lse=True)
        return loss, lse

    a = x.clone().requires_grad_(True)
    loss, lse = torch.compile(f, fullgraph=True, backend="aot_eager")(a)
    assert not lse.requires_grad
    torch.testing.assert_close(lse, torch.logsumexp(x, 1))
