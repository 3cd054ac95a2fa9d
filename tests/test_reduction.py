"""celib/_reduction.py, and its one convention on every path: nothing kept gives a nan mean and zero gradients."""

from __future__ import annotations

import pytest
import torch

import celib
from celib import _reduction, kernels
from celib._options import LossOptions
from tests.cases import fused


def test_kept_weight_denominator_and_reduce():
    t = torch.tensor([0, 2, -100, 1, 7])  # 7: out of range, as an unchecked call may pass
    w = torch.tensor([0.5, -1.0, 2.0])  # negative weights are allowed, as in PyTorch
    kept = _reduction.kept_weight(t, w, -100, torch.float64)
    assert kept.tolist() == [0.5, 2.0, 0.0, -1.0, 2.0]  # 7 reads the clamped class 2, never out of bounds
    assert _reduction.kept_weight(t, None, -100, torch.float32).tolist() == [1, 1, 0, 1, 1]
    rows = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    assert _reduction.reduce(rows, "none") is rows
    assert _reduction.reduce(rows, "sum").item() == 6.0
    assert _reduction.reduce(rows, "mean", torch.tensor(4.0)).item() == 1.5
    assert _reduction.grad_scale(torch.tensor(4.0)).item() == 0.25
    assert _reduction.grad_scale(torch.tensor(0.0)).item() == 0.0
    inf = _reduction.reduce(rows, "mean", torch.tensor(0.0))  # the sum / 0, as PyTorch
    inf.backward()
    assert inf.item() == float("inf") and torch.equal(rows.grad, torch.zeros(3))  # with a zero gradient
    nothing = torch.zeros(3, requires_grad=True)  # nothing kept: every row 0
    nan = _reduction.reduce(nothing, "mean", torch.tensor(0.0))
    nan.backward()
    assert torch.isnan(nan) and torch.equal(nothing.grad, torch.zeros(3))


def test_mean_scale_counts_kept_weight_or_positions():
    t = torch.tensor([0, 2, -100, 1])
    options = LossOptions(torch.tensor([0.5, -1.0, 2.0]))
    den, scale = _reduction.mean_scale(t, options, torch.float64)
    assert den.item() == 1.5 and scale.item() == 1 / 1.5
    probabilities = torch.rand(3, 4, 5)  # (N, C, S): 15 positions
    den, scale = _reduction.mean_scale(probabilities, LossOptions(), torch.float32)
    assert den.item() == 15.0 and scale.item() == torch.tensor(1 / 15).item()
    assert _reduction.mean_scale(t, LossOptions(reduction="sum"), torch.float32) == (None, 1.0)


def _kernel_paths():
    paths = {
        "cross_entropy, torch": lambda x, t: celib.cross_entropy(x, t, backend="torch"),
        "cross_entropy, torch, z-loss": lambda x, t: celib.cross_entropy(x, t, backend="torch", z_loss=1e-3),
        "focal_loss": lambda x, t: celib.focal_loss(x, t, torch.rand(x.shape[1]) + 0.5),
        "nll_loss": lambda x, t: celib.nll_loss(torch.log_softmax(x, 1), t),
        "linear_cross_entropy, torch": lambda x, t: celib.linear_cross_entropy(
            x, torch.eye(x.shape[1]), t, chunk_size=2, backend="torch"),
    }
    if kernels.available():
        paths.update({
            "cross_entropy, kernel, one block": lambda x, t: fused(x, t),
            "cross_entropy, kernel, streamed": lambda x, t: fused(x, t, max_block=4),
            "cross_entropy, kernel, class weights": lambda x, t: fused(x, t, weight=torch.rand(x.shape[1])),
            "linear_cross_entropy, kernel": lambda x, t: celib.linear_cross_entropy(
                x, torch.eye(x.shape[1]), t, chunk_size=2, backend="triton"),
        })
    return paths


@pytest.mark.parametrize("path", list(_kernel_paths()))
@pytest.mark.parametrize("rows", [5, 0], ids=["all ignored", "empty batch"])
def test_nothing_kept_gives_a_nan_mean_and_zero_gradients_on_every_path(path, rows):
    x = torch.randn(rows, 10, requires_grad=True)
    t = torch.full((rows,), -100)
    loss = _kernel_paths()[path](x, t)
    loss.backward()
    assert torch.isnan(loss), path
    assert torch.equal(x.grad, torch.zeros_like(x)), path
    theirs = torch.nn.functional.cross_entropy(x.detach(), t)  # PyTorch's convention
    assert torch.isnan(theirs)


def _weighted_paths():
    paths = {
        "cross_entropy, torch": lambda x, t, w: celib.cross_entropy(x, t, w, backend="torch"),
        "linear_cross_entropy, torch": lambda x, t, w: celib.linear_cross_entropy(
            x, torch.eye(3), t, weight=w, chunk_size=1, backend="torch"),
    }
    if kernels.available():
        paths.update({
            "cross_entropy, kernel": lambda x, t, w: fused(x, t, weight=w),
            "linear_cross_entropy, kernel": lambda x, t, w: celib.linear_cross_entropy(
                x, torch.eye(3), t, weight=w, chunk_size=1, backend="triton"),
        })
    return paths


@pytest.mark.parametrize("path", list(_weighted_paths()))
def test_class_weights_summing_to_zero_give_pytorchs_mean(path):
    """The kept targets' weights sum to 0: the mean is PyTorch's, the sum / 0 (here -inf), on every path."""
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    t, w = torch.tensor([0, 1]), torch.tensor([1.0, -1.0, 0.5])
    theirs = torch.nn.functional.cross_entropy(x.detach(), t, w)
    ours = _weighted_paths()[path](x, t, w)
    assert theirs.item() == float("-inf") and torch.equal(ours.detach(), theirs), path


def test_half_precision_means_are_formed_in_float32():
    """A float16 count or sum overflows at 65 504: the mean is formed in float32 and returned in half."""
    assert _reduction.accumulator(torch.float16) == torch.float32
    assert _reduction.accumulator(torch.bfloat16) == torch.float32
    assert _reduction.accumulator(torch.float64) == torch.float64
    rows = torch.full((70_000,), 2.0, dtype=torch.float16)
    count = torch.tensor(70_000.0)
    mean = _reduction.reduce(rows, "mean", count)
    assert mean.dtype == torch.float16 and mean.item() == 2.0  # a float16 sum would be inf, the mean nan


def test_half_precision_focal_means_beyond_65504_elements():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70_000, generator=gen)
    y = (torch.rand(70_000, generator=gen) < 0.3).float()
    exact = celib.sigmoid_focal_loss(x.double(), y.double(), reduction="mean")
    half = celib.sigmoid_focal_loss(x.half(), y.half(), reduction="mean")
    assert half.dtype == torch.float16
    assert abs(half.item() - exact.item()) < 2e-3 * exact.item()  # was 0.0 (a float16 count of inf)
    logits, target = torch.randn(70_000, 4, generator=gen), torch.randint(0, 4, (70_000,), generator=gen)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0])
    for gamma in (0.0, 2.0):
        exact = celib.focal_loss(logits.double(), target, weight.double(), gamma=gamma)
        half = celib.focal_loss(logits.half(), target, weight, gamma=gamma)
        assert half.dtype == torch.float16
        assert abs(half.item() - exact.item()) < 2e-3 * exact.item()  # was nan (a float16 weight sum of inf)
