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
