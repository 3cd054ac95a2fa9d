"""Float32 error bounds for the fused cross-entropy kernel, against a float64 truth.

A float32 result is compared with the same computation in float64 on the same
(float32-representable) inputs, never with another float32 implementation at a
tolerance tuned on one machine: SIMD width, thread count and summation order
change the last bits, and a bound that follows from rounding holds on every CPU
and GPU.

The bound. Let u = 2**-24 (float32's unit roundoff). For one row of C logits z
(after soft-capping, if any), with target mass a_c >= 0 per class (the class
weight times the (smoothed) target probability; for an index target
(1 - alpha) w_t at the target plus alpha w_c / C everywhere), the kernel forms
m = max z, d = sum exp(z - m), lse = m + log d and

    loss = sum_c a_c (lse - z_c)  [+ z_loss lse^2],   grad_c = coef p_c - a_c,

with p_c = exp(z_c - lse) and coef = sum_c a_c [+ 2 z_loss lse]. Each
exponential is within 2u (relative) plus u |z_c - m| from the rounding of its
argument; the sum d is a tree over a block of B logits and a running sum over
ceil(C / B) blocks, so its relative error is at most (log2 B + C / B + ln C + 2) u
(the ln C: the argument errors average to u E_p[m - z] <= u ln C). Every other
intermediate is at most

    S = sum_c a_c (|z_c| + Z + |lse|) + z_loss (lse^2 + 2 |lse|),   Z = max_c |z_c|,

in magnitude and goes through a handful of further roundings. Hence, with
K = ceil(log2 B) + ceil(C / B) + ln C + 8,

    |loss - loss64| <= K u (S + sum_c a_c)
    |grad_c - grad64_c| <= K u (|coef| p_c (1 + |z_c| + Z + |lse|) + a_c + p_c sum_a).

A reduction adds a relative u per addition (N for a sum of N rows) and, for the
mean, the rounding of the float32 denominator (a sum of N weights) and of its
reciprocal. Soft-capping adds the error of tanh (a few u, relative) times
|z| / cap to each capped logit: K doubles. These bounds are loose (tens to
hundreds of times the errors seen), but they are derived, not tuned, and they
scale with C as the real error can.

Besides the bound, a result must be no worse than PyTorch's own float32 result
by more than :data:`TORCH_FACTOR` (plus a few u of slack for a PyTorch result
that happens to be exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import celib

U32 = 2.0**-24  # unit roundoff of float32 (round to nearest)
TORCH_FACTOR = 4.0


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(C,), (N, C) or (N, C, d...) -> (R, C) with one row per position."""
    if x.dim() == 1:
        return x.reshape(1, -1)
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _unrows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 1:
        return rows.reshape(like.shape)
    moved = like.movedim(1, -1).shape
    return rows.reshape(moved).movedim(-1, 1)


def target_mass(x: torch.Tensor, target: torch.Tensor, weight=None, ignore_index=-100, label_smoothing=0.0):
    """a_c per row, float64 (R, C): what multiplies (lse - z_c) in the loss; rows ignored are 0."""
    rows = _rows(x).double()
    c = rows.shape[1]
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    if target.is_floating_point():
        q = _rows(target).double()
        return w * ((1 - label_smoothing) * q + label_smoothing / c)
    t = target.reshape(-1)
    kept = t != ignore_index
    safe = torch.where(kept, t, torch.zeros_like(t))
    mass = (label_smoothing / c) * w.expand(rows.shape).clone()
    mass[torch.arange(len(t)), safe] += (1 - label_smoothing) * w[safe]
    return mass * kept[:, None]


@dataclass
class Truth:
    """The float64 result and the float32 error bounds for one call."""

    loss: torch.Tensor  # float64, the loss as the call returns it
    grad: torch.Tensor  # float64, d(sum(loss * upstream)) / d input
    loss_bound: torch.Tensor  # same shape as loss
    grad_bound: torch.Tensor  # same shape as grad


def truth(x: torch.Tensor, target, upstream=None, *, block: int, weight=None, ignore_index=-100,
          reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None) -> Truth:
    """The float64 truth of ``celib.cross_entropy(x, target, ...)`` and its float32 error bounds.

    ``x`` holds the float32 (or half) inputs; they are converted exactly to float64.
    ``block`` is the kernel's block size for this C (see ``celib.kernels.launch.block_size``).
    """
    x64 = x.detach().double().requires_grad_(True)
    t64 = target.double() if target.is_floating_point() else target
    w64 = None if weight is None else weight.double()
    kwargs = dict(weight=w64, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                  softcap=softcap)
    loss = celib.cross_entropy(x64, t64, reduction=reduction, backend="torch", **kwargs)
    up = torch.ones_like(loss) if upstream is None else upstream.double()
    (grad,) = torch.autograd.grad((loss * up).sum(), x64) if loss.numel() else (torch.zeros_like(x64),)

    # Per-row quantities of the bound, in float64.
    z = _rows(x64.detach())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    n, c = z.shape
    a = target_mass(x, target, weight, ignore_index, label_smoothing)
    if target.is_floating_point():
        kept = torch.ones(n, dtype=torch.bool)
        den = float(n)
    else:
        t = target.reshape(-1)
        kept = t != ignore_index
        w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
        den = float((w[torch.where(kept, t, torch.zeros_like(t))] * kept).sum())
    lse = torch.logsumexp(z, 1)
    p = torch.exp(z - lse[:, None])
    big_z = z.abs().amax(1) if n else torch.zeros(0, dtype=torch.float64)
    sum_a = a.sum(1)
    k = math.ceil(math.log2(block)) + math.ceil(c / block) + math.log(c) + 8
    if softcap is not None:
        k *= 2
    zl = z_loss * (lse**2 + 2 * lse.abs()) * kept
    s = (a * (z.abs() + (big_z + lse.abs())[:, None])).sum(1) + zl  # magnitude of every intermediate
    row_loss_bound = k * U32 * (s + sum_a)
    coef = (sum_a + 2 * z_loss * lse * kept).abs()
    row_grad_bound = k * U32 * (coef[:, None] * p * (1 + z.abs() + (big_z + lse.abs())[:, None])
                                + a + p * sum_a[:, None])

    if reduction == "none":
        loss_bound = row_loss_bound.reshape(loss.shape)
        scale = up.reshape(-1).abs()
    else:
        total = row_loss_bound.sum() + n * U32 * s.sum()  # each row's error, plus N additions
        if reduction == "sum":
            loss_bound, scale = total, up.abs().expand(n)
        elif den:  # mean: the float32 denominator (N additions) and one division
            rel = (n + 4) * U32
            loss_bound = total / den + rel * loss.detach().abs()
            scale = (up.abs() / den * (1 + rel)).expand(n)
        else:  # every position ignored: nan loss, zero gradient
            loss_bound, scale = torch.tensor(0.0, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    grad_bound = _unrows(row_grad_bound * scale[:, None], x64) + 2 * U32 * grad.abs()
    return Truth(loss.detach(), grad, torch.as_tensor(loss_bound, dtype=torch.float64), grad_bound)


def upstream_like(loss: torch.Tensor, seed: int) -> torch.Tensor:
    """The upstream gradient tests use: uniform in [0, 1), float64, seeded, of the loss's shape."""
    return torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| (float64), with nan == nan and inf == inf counted as 0."""
    a, e = actual.detach().double(), expected.double()
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    diff = torch.where(same, torch.zeros_like(a), (a - e).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Every element within its bound of the float64 truth; nan and inf only where the truth has them."""
    a, e = actual.detach().double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    err = torch.where(same, torch.zeros_like(a), (a - e).abs())
    bad = ~(err <= bound)  # also catches nan errors
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0]) if a.dim() else ()
        raise AssertionError(f"{what}: |{a[i].item():.9g} - {e[i].item():.9g}| = {err[i].item():.3g} exceeds the "
                             f"float32 bound {bound.expand_as(err)[i].item():.3g} at {i} ({int(bad.sum())} elements)")
