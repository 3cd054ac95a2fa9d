"""Every invalid input raises celib.InputError with a message that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import celib
from celib import InputError

X = torch.randn(4, 3)
T = torch.tensor([0, 1, 2, 1])


def raises(match: str):
    return pytest.raises(InputError, match=match)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


def test_out_of_range_target_names_value_position_and_range():
    with raises(r"class index 3 at position \(2,\), outside \[0, 2\] for 3 classes"):
        celib.cross_entropy(X, torch.tensor([0, 1, 3, 1]))
    with raises(r"class index -1"):
        celib.nll_loss(torch.log_softmax(X, 1), torch.tensor([0, -1, 2, 1]))
    with raises(r"class index 9"):
        celib.focal_loss(X, torch.tensor([0, 9, 2, 1]))
    # ignore_index values are not out of range; check_inputs=False skips the data check
    celib.cross_entropy(X, torch.tensor([0, 5, 2, 1]), ignore_index=5)


def test_bad_options():
    with raises(r"reduction='avg' is not supported; use one of 'none', 'mean', 'sum'"):
        celib.cross_entropy(X, T, reduction="avg")
    with raises(r"'batchmean'"):
        celib.kl_div(torch.log_softmax(X, 1), torch.softmax(X, 1), reduction="avg")
    with raises(r"label_smoothing must lie in \[0, 1\], got 1.5"):
        celib.cross_entropy(X, T, label_smoothing=1.5)
    with raises(r"backend='cuda' is not supported"):
        celib.cross_entropy(X, T, backend="cuda")
    with raises(r"gamma must be >= 0"):
        celib.focal_loss(X, T, gamma=-1.0)
    with raises(r"softcap must be a positive finite number"):
        celib.cross_entropy(X, T, softcap=0.0)


def test_weight_of_wrong_length():
    with raises(r"weight must be a 1-D tensor with one entry per class \(3\), got shape \(4,\)"):
        celib.cross_entropy(X, T, weight=torch.ones(4))
    with raises(r"weight must be a floating-point tensor"):
        celib.cross_entropy(X, T, weight=torch.ones(3, dtype=torch.long))


def test_shape_mismatches():
    with raises(r"class-index target shape \(3,\) does not fit input shape \(4, 3\): expected \(4,\)"):
        celib.cross_entropy(X, T[:3])
    with raises(r"looks like a one-hot encoding: pass class indices with target.argmax\(dim=1\)"):
        celib.cross_entropy(X, torch.nn.functional.one_hot(T, 3))
    with raises(r"class dimension of input looks last: move it to dim 1 with input.movedim\(-1, 1\)"):
        celib.cross_entropy(torch.randn(2, 6, 3), torch.randint(0, 3, (2, 6)))
    with raises(r"probability target shape \(4, 2\) does not match input shape \(4, 3\)"):
        celib.cross_entropy(X, torch.rand(4, 2))
    with raises(r"must be an integer tensor; convert it with target.long\(\)|convert with target.long\(\)"):
        celib.cross_entropy(X, T.float())
    with raises(r"target shape \(4, 2\) does not match input shape \(4, 3\)"):
        celib.binary_cross_entropy_with_logits(X, torch.rand(4, 2))
    with raises(r"input must have a class dimension"):
        celib.cross_entropy(torch.tensor(1.0), torch.tensor(0))


def test_dtypes_and_types():
    with raises(r"input must be a floating-point tensor .* got dtype torch.int64"):
        celib.cross_entropy(T.view(4, 1).repeat(1, 3), T)
    with raises(r"input must be a torch.Tensor, got list"):
        celib.cross_entropy([[0.0, 1.0]], T)
    with raises(r"target is a bool tensor"):
        celib.cross_entropy(X, T > 0)
    with raises(r"this loss takes class indices; convert with target.long\(\)"):
        celib.nll_loss(X, torch.rand(4, 3))
    with raises(r"target must be a float tensor of 0s and 1s"):
        celib.binary_cross_entropy_with_logits(X, torch.ones(4, 3, dtype=torch.long))


def test_probabilities_outside_unit_interval():
    with raises(r"input must hold probabilities in \[0, 1\], found values in \[-0.5, 2\]. If these are logits, use binary_cross_entropy_with_logits"):
        celib.binary_cross_entropy(torch.tensor([-0.5, 2.0, 0.3]), torch.tensor([0.0, 1.0, 1.0]))
    # a target of -1 and 1 labels: the fix converts them, it does not point at the unchecked logits loss
    with raises(r"target must hold probabilities in \[0, 1\], found values in \[-1, 1\]. Labels of -1 and 1\? "
                r"Convert them with \(s \+ 1\) / 2"):
        celib.binary_cross_entropy(torch.tensor([0.9, 0.1]), torch.tensor([1.0, -1.0]))
    with raises(r"pos_weight of shape \(2,\) does not broadcast"):
        celib.binary_cross_entropy_with_logits(X, torch.rand(4, 3), pos_weight=torch.ones(2))


def test_loss_dtype_must_be_floating():
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    for bad in (torch.int64, torch.bool, "float32"):
        with raises("loss_dtype"):
            celib.cross_entropy(x, t, loss_dtype=bad)
        with raises("loss_dtype"):
            celib.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), t, loss_dtype=bad)
    assert celib.cross_entropy(x, t, loss_dtype=torch.float64).dtype == torch.float64


def test_ignore_index_takes_any_integer_type_as_pytorch():
    import numpy as np

    x, t = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, -100])
    ours = celib.cross_entropy(x, t, ignore_index=np.int64(-100))
    assert ours == F.cross_entropy(x, t, ignore_index=np.int64(-100))
    with raises("ignore_index"):
        celib.cross_entropy(x, t, ignore_index=-100.0)


def test_probabilities_with_nan_are_refused():
    with raises("found NaN"):
        celib.binary_cross_entropy(torch.tensor([0.5, float("nan")]), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("option, value", [(option, value) for option in ("label_smoothing", "z_loss", "softcap")
                                           for value in ("0.1", None, True)
                                           if (option, value) != ("softcap", None)])  # None: softcap off
def test_a_numeric_option_that_is_not_a_number_is_refused_on_every_backend(option, value):
    """A string from a config file must not work on one backend and fail on another: both refuse it."""
    x, t = torch.randn(3, 5), torch.tensor([0, 2, 4])
    backends = ["torch"] + (["triton"] if celib.kernels.available() else [])
    for backend in backends:
        with pytest.raises(celib.InputError, match=f"{option} must be a number"):
            celib.cross_entropy(x, t, backend=backend, **{option: value})
    with pytest.raises(celib.InputError, match=f"{option} must be a number"):
        celib.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t, **{option: value})
