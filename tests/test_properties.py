"""Properties that hold for every input, checked with hypothesis."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import celib
import celib.ref as ref

finite = st.floats(-30, 30, allow_nan=False, allow_infinity=False)
extreme = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)


@st.composite
def logits_and_targets(draw, elements=finite):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(2, 6))
    z = draw(arrays(np.float64, (n, c), elements=elements))
    t = draw(arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    return z, t


@st.composite
def distributions(draw, size=None):
    c = size or draw(st.integers(2, 6))
    w = draw(arrays(np.float64, (c,), elements=st.floats(0.0, 1.0)))
    w[draw(st.integers(0, c - 1))] += 0.5  # at least one positive entry
    return w / w.sum()


settings.register_profile("celib", deadline=None, max_examples=60)
settings.load_profile("celib")


@given(logits_and_targets(), st.floats(0, 1))
def test_cross_entropy_is_non_negative(zt, smoothing):
    z, t = zt
    loss = celib.cross_entropy(torch.tensor(z), torch.tensor(t), reduction="none", label_smoothing=smoothing)
    assert (loss >= 0).all()
    assert (ref.cross_entropy(z, t, reduction="none", label_smoothing=smoothing) >= -1e-12).all()


@given(st.data())
def test_cross_entropy_of_distributions_bounds_entropy(data):
    p = data.draw(distributions())
    q = data.draw(distributions(size=len(p)))
    h_p, h_pq = ref.entropy(p), ref.cross_entropy_dist(p, q)
    assert h_pq >= h_p - 1e-12
    assert abs(ref.cross_entropy_dist(p, p) - h_p) < 1e-12
    kl = ref.kl_divergence(p, q)
    if np.isfinite(h_pq):
        assert abs(h_pq - (h_p + kl)) < 1e-9
    else:  # Q gives probability 0 to an outcome P can produce
        assert kl == np.inf and np.any((q == 0) & (p > 0))
    if not np.allclose(p, q, atol=1e-6):
        assert kl > 0


@given(logits_and_targets(extreme), st.floats(-1e3, 1e3))
def test_softmax_is_shift_invariant_and_stable(zt, shift):
    z, _ = zt
    p = ref.softmax(z)
    assert np.all(np.isfinite(p)) and np.allclose(p.sum(-1), 1.0)
    np.testing.assert_allclose(ref.softmax(z + shift), p, atol=1e-12)
    tz = torch.tensor(z)
    np.testing.assert_allclose(torch.softmax(tz + shift, 1).numpy(), torch.softmax(tz, 1).numpy(), atol=1e-12)
    assert np.all(np.isfinite(ref.log_softmax(z))) and np.all(np.isfinite(ref.logsumexp(z)))


@given(logits_and_targets(extreme))
def test_losses_stay_finite_at_extreme_logits(zt):
    z, t = zt
    assert np.all(np.isfinite(ref.cross_entropy(z, t, reduction="none")))
    assert torch.isfinite(celib.cross_entropy(torch.tensor(z), torch.tensor(t), reduction="none")).all()
    y = (z > 0).astype(np.float64)
    assert np.all(np.isfinite(ref.binary_cross_entropy_with_logits(z, 1 - y, reduction="none")))


@given(logits_and_targets(), st.sampled_from(["none", "mean", "sum"]))
def test_focal_with_gamma_zero_is_cross_entropy(zt, reduction):
    z, t = zt
    w = np.linspace(0.5, 1.5, z.shape[1])
    np.testing.assert_allclose(
        ref.focal_loss(z, t, w, gamma=0.0, reduction=reduction), ref.cross_entropy(z, t, w, reduction=reduction), rtol=1e-12
    )
    tz, tt, tw = torch.tensor(z), torch.tensor(t), torch.tensor(w)
    torch.testing.assert_close(
        celib.focal_loss(tz, tt, tw, gamma=0.0, reduction=reduction), celib.cross_entropy(tz, tt, tw, reduction=reduction)
    )


@given(arrays(np.float64, (5,), elements=extreme), arrays(np.float64, (5,), elements=st.sampled_from([0.0, 1.0])))
def test_bce_with_logits_is_two_class_cross_entropy(z, y):
    two_class = np.stack([np.zeros_like(z), z], axis=1)  # logits [0, z]: softmax gives sigmoid(z) to class 1
    np.testing.assert_allclose(
        ref.binary_cross_entropy_with_logits(z, y, reduction="none"),
        ref.cross_entropy(two_class, y.astype(np.int64), reduction="none"),
        rtol=1e-9,
        atol=1e-12,
    )
    torch.testing.assert_close(
        celib.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(y)),
        celib.cross_entropy(torch.tensor(two_class), torch.tensor(y).long()),
    )
