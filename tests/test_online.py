"""The streaming (online) softmax model of the kernel agrees with celib.ref and PyTorch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import celib.online as online
import celib.ref as ref


@pytest.mark.parametrize("block_size", [1, 7, 64, 1000, 4096])
def test_streaming_logsumexp_and_cross_entropy(block_size):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 1000)) * 20
    z[0] = 5.0  # all equal: lse = 5 + log C
    z[1, -1] = 1e4  # the max arrives in the last block
    t = rng.integers(0, 1000, 6)
    lse, trace = online.streaming_logsumexp(z, block_size)
    np.testing.assert_allclose(lse, ref.logsumexp(z), rtol=1e-13)
    assert lse[0] == pytest.approx(5 + np.log(1000))
    assert trace.running_max.shape == (-(-1000 // block_size), 6)
    assert np.all(np.diff(trace.running_max, axis=0) >= 0)  # the running max never decreases
    loss, grad = online.streaming_cross_entropy(z, t, block_size)
    x = torch.tensor(z, requires_grad=True)
    expected = F.cross_entropy(x, torch.tensor(t), reduction="none")
    expected.sum().backward()
    np.testing.assert_allclose(loss, expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, x.grad.numpy(), atol=1e-14)


def test_blocks_of_minus_inf_before_the_first_finite_logit():
    """A row whose first blocks are all -inf (a mask at the start) gives the lse of its finite part, with no
    warning; a row of -inf only gives -inf, as PyTorch."""
    z = np.array([[-np.inf, -np.inf, 1.0, 2.0, -np.inf, 3.0],
                  [-np.inf] * 6])
    with np.errstate(all="raise"):
        lse, trace = online.streaming_logsumexp(z, 2)
    expected = torch.logsumexp(torch.tensor(z), 1).numpy()
    assert lse[1] == -np.inf and expected[1] == -np.inf
    np.testing.assert_allclose(lse[0], expected[0], rtol=1e-15)
    assert trace.running_sum[0].tolist() == [0.0, 0.0]  # nothing seen yet: s = 0, not nan
    loss, grad = online.streaming_cross_entropy(z[:1], [5], 2)
    x = torch.tensor(z[:1], requires_grad=True)
    F.cross_entropy(x, torch.tensor([5])).backward()
    np.testing.assert_allclose(loss, [expected[0] - 3.0], rtol=1e-15)
    np.testing.assert_allclose(grad, x.grad.numpy(), atol=1e-15)
