"""Reference implementations in NumPy, written to be read.

Everything here works on NumPy arrays in float64 and imports no deep-learning
framework. The functions are short and vectorised (no Python loop over rows or
classes); the book displays them next to the maths they implement. The losses
take the same arguments as :mod:`celib` and ``torch.nn.functional`` and return
the same values.

Conventions: the class axis of a loss input is axis 1 (axis 0 for a 1-D
input); the distribution functions (``softmax``, ``entropy``, ...) work along
the last axis. Information is in nats unless ``base=2`` (bits) is given.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["logsumexp", "log_softmax", "softmax", "sigmoid", "log_sigmoid", "entropy", "cross_entropy_dist", "kl_divergence", "cross_entropy", "cross_entropy_grad", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div", "sigmoid_focal_loss", "focal_loss"]

# ----------------------------------------------------------------------------
# Stable building blocks
# ----------------------------------------------------------------------------


def logsumexp(z: ArrayLike, axis: int = -1) -> np.ndarray:
    """log(sum(exp(z))) along ``axis``, max shifted out: exponents <= 0."""
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    # a row of -inf stays -inf instead of becoming nan
    m = np.where(np.isfinite(m), m, 0.0)
    # log(0) = -inf is the right answer for an all -inf row
    with np.errstate(divide="ignore"):
        total = np.sum(np.exp(z - m), axis=axis)
        return np.squeeze(m, axis) + np.log(total)


def log_softmax(z: ArrayLike, axis: int = -1) -> np.ndarray:
    """log softmax(z) = (z - m) - log(sum(exp(z - m))), m the max: finite for any finite logits.

    The differences are formed first: z - logsumexp(z) would round the log-sum-exp at the logits'
    magnitude before subtracting, and lose a confident row's small log-probabilities.
    """
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # a row of -inf stays -inf instead of becoming nan
    with np.errstate(divide="ignore"):
        return (z - m) - np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True))


def softmax(z: ArrayLike, axis: int = -1) -> np.ndarray:
    """exp(z) / sum(exp(z)) along ``axis``, with the max subtracted first so no exponent exceeds 0."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - np.max(z, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def sigmoid(z: ArrayLike) -> np.ndarray:
    """1 / (1 + exp(-z)), never exponentiating a positive number."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def log_sigmoid(z: ArrayLike) -> np.ndarray:
    """log sigmoid(z) = min(z, 0) - log(1 + exp(-abs(z))): always finite."""
    z = np.asarray(z, dtype=np.float64)
    return np.minimum(z, 0.0) - np.log1p(np.exp(-np.abs(z)))


# ----------------------------------------------------------------------------
# Information theory on distributions (last axis)
# ----------------------------------------------------------------------------


def _log(x: np.ndarray, base: float | None) -> np.ndarray:
    with np.errstate(divide="ignore"):
        out = np.log(x)
    return out if base is None else out / np.log(base)


def entropy(p: ArrayLike, base: float | None = None) -> np.ndarray:
    """H(P) = -sum P log P, with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    return 0.0 - np.sum(p * _log(np.where(p > 0, p, 1.0), base), axis=-1)  # 0.0 - x: a certain outcome gives 0.0, not -0.0


def cross_entropy_dist(p: ArrayLike, q: ArrayLike, base: float | None = None) -> np.ndarray:
    """H(P, Q) = -sum P log Q; terms with P = 0 count 0, and Q = 0 where P > 0 gives inf."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return -np.sum(p * _log(np.where(p > 0, q, 1.0), base), axis=-1)


def kl_divergence(p: ArrayLike, q: ArrayLike, base: float | None = None) -> np.ndarray:
    """KL(P || Q) = sum P log(P / Q) = H(P, Q) - H(P)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    present = p > 0
    return np.sum(p * (_log(np.where(present, p, 1.0), base) - _log(np.where(present, q, 1.0), base)), axis=-1)


# ----------------------------------------------------------------------------
# Losses with torch.nn.functional's arguments
# ----------------------------------------------------------------------------


def _classes_last(x: np.ndarray) -> np.ndarray:
    """(C,) -> (1, C); (N, C, d1, ..., dk) -> (N, d1, ..., dk, C)."""
    return x[None] if x.ndim == 1 else np.moveaxis(x, 1, -1)


def _classes_back(g: np.ndarray, ndim: int) -> np.ndarray:
    """Inverse of :func:`_classes_last`."""
    return g[0] if ndim == 1 else np.moveaxis(g, -1, 1)


def _reduce(loss: np.ndarray, reduction: str, denominator: float | np.ndarray) -> np.ndarray:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return np.sum(loss)
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sum(loss) / denominator
    raise ValueError(f"reduction={reduction!r} is not supported; use 'none', 'mean' or 'sum'.")


def _class_weights(weight: ArrayLike | None, num_classes: int) -> np.ndarray:
    """The (C,) class weights, all ones when none are given."""
    return np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)


def _smoothed(target: np.ndarray, a: float, num_classes: int) -> np.ndarray:
    """Probability targets with classes last, smoothed: (1 - a) * q + a / C."""
    return _classes_last(target) * (1 - a) + a / num_classes


def _index_parts(input, target, weight, ignore_index):
    """Classes-last input, target indices (ignored ones replaced by 0), kept mask, class weights w, and w_t.

    w_t is the weight of each position's target class, 0 where the target is ignored.
    """
    z = _classes_last(np.asarray(input, dtype=np.float64))
    t = np.asarray(target).reshape(z.shape[:-1])
    num_classes = z.shape[-1]
    w = _class_weights(weight, num_classes)
    kept = t != ignore_index
    if np.any((t[kept] < 0) | (t[kept] >= num_classes)):
        raise ValueError(f"target holds a class index outside [0, {num_classes - 1}].")
    t = np.where(kept, t, 0)
    return z, t, kept, w, w[t] * kept


def _pick(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """x[..., t]: the entry of each position's target class (x has classes last)."""
    return np.take_along_axis(x, t[..., None], axis=-1)[..., 0]


def cross_entropy(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> np.ndarray:
    """Cross-entropy from logits, with PyTorch's semantics (see :func:`celib.cross_entropy`).

    input: logits (C,), (N, C) or (N, C, d1, ..., dk). target: class indices of
    the batch shape, or probabilities of the input's shape (float).
    """
    a, target = label_smoothing, np.asarray(target)
    z = _classes_last(np.asarray(input, dtype=np.float64))
    num_classes = z.shape[-1]
    logp = log_softmax(z)
    if np.issubdtype(target.dtype, np.floating):  # probability targets
        loss = -np.sum(_class_weights(weight, num_classes) * _smoothed(target, a, num_classes) * logp, axis=-1)
        loss = loss[0] if np.ndim(input) == 1 else loss
        return _reduce(loss, reduction, logp.size / num_classes)
    _, t, kept, w, w_t = _index_parts(input, target, weight, ignore_index)
    logp = np.where(kept[..., None], logp, 0.0)  # ignored rows add 0, even with -inf logits
    loss = (1 - a) * w_t * -_pick(logp, t)
    if a:  # the smoothing term: a/C times the weighted loss against every class
        loss = loss + a / num_classes * kept * -np.sum(w * logp, axis=-1)
    loss = loss[0] if np.ndim(input) == 1 else loss
    return _reduce(loss, reduction, np.sum(w_t))


def cross_entropy_grad(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> np.ndarray:
    """Gradient of :func:`cross_entropy` w.r.t. the logits, by the formula.

    Per position, with smoothed target q and softmax p, the gradient is
    ``sum(w * q) * p - w * q``; with one-hot q and no weights, p - y.
    For ``reduction="none"`` this is the gradient of the summed losses.
    Where the mean's denominator is 0 (every target ignored, or class
    weights summing to 0 over the kept targets) the loss is nan or +-inf
    and the gradient is taken as 0. Returns an array of the input's shape.
    """
    a, target = label_smoothing, np.asarray(target)
    z = _classes_last(np.asarray(input, dtype=np.float64))
    num_classes = z.shape[-1]
    p = softmax(z)
    if np.issubdtype(target.dtype, np.floating):
        w = _class_weights(weight, num_classes)
        wq = w * _smoothed(target, a, num_classes)
        grad = np.sum(wq, axis=-1, keepdims=True) * p - wq
        denominator = p.size / num_classes
    else:
        # q = (1 - a) * one_hot(t) + a / C on kept positions, 0 on ignored
        # ones; w * q is (a / C) * w everywhere plus (1 - a) * w_t at the
        # target class.
        parts = _index_parts(input, target, weight, ignore_index)
        _, t, kept, w, w_t = parts
        total_wq = (1 - a) * w_t + a / num_classes * np.sum(w) * kept
        grad = total_wq[..., None] * p
        if a:  # the smoothing part of w * q
            grad -= (a / num_classes) * w * kept[..., None]
        at_target = _pick(grad, t) - (1 - a) * w_t
        np.put_along_axis(grad, t[..., None], at_target[..., None], axis=-1)
        denominator = np.sum(w_t)
    if reduction == "mean":
        # A denominator of 0 (every target ignored, or class weights that
        # cancel) makes the mean nan or +-inf; its gradient is taken as 0,
        # as in PyTorch when every target is ignored, and in celib's
        # kernels for both cases (PyTorch gives inf or nan for the second).
        grad = grad / denominator if denominator != 0 else np.zeros_like(grad)
    elif reduction not in ("none", "sum"):
        raise ValueError(
            f"reduction={reduction!r} is not supported; use 'none', 'mean' "
            f"or 'sum'."
        )
    return _classes_back(grad, np.ndim(input))


def nll_loss(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> np.ndarray:
    """Negative log-likelihood: ``-weight[t] * input[t]`` per position (input holds log-probabilities)."""
    logp, t, kept, _, w_t = _index_parts(input, target, weight, ignore_index)
    loss = -np.where(kept, _pick(logp, t), 0.0) * w_t  # ignored rows add 0, even at a -inf input
    loss = loss[0] if np.ndim(input) == 1 else loss
    return _reduce(loss, reduction, np.sum(w_t))


def binary_cross_entropy(
    input: ArrayLike, target: ArrayLike, weight: ArrayLike | None = None, reduction: str = "mean"
) -> np.ndarray:
    """-w [y log p + (1 - y) log(1 - p)] on probabilities, each log clamped at -100 as PyTorch does."""
    p, y = np.asarray(input, dtype=np.float64), np.asarray(target, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_p, log_1mp = np.maximum(np.log(p), -100.0), np.maximum(np.log1p(-p), -100.0)
    loss = -(y * log_p + (1 - y) * log_1mp)
    loss = loss if weight is None else loss * np.asarray(weight, dtype=np.float64)
    return _reduce(loss, reduction, loss.size)


def binary_cross_entropy_with_logits(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    pos_weight: ArrayLike | None = None,
) -> np.ndarray:
    """-w [pos_weight * y log sigmoid(x) + (1 - y) log sigmoid(-x)], exact for any logit."""
    x, y = np.asarray(input, dtype=np.float64), np.asarray(target, dtype=np.float64)
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, dtype=np.float64)
    loss = -(pw * y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x))
    loss = loss if weight is None else loss * np.asarray(weight, dtype=np.float64)
    return _reduce(loss, reduction, loss.size)


def kl_div(input: ArrayLike, target: ArrayLike, reduction: str = "mean", log_target: bool = False) -> np.ndarray:
    """Pointwise ``target * (log target - input)`` (input: log-probabilities), then reduced.

    ``"batchmean"`` divides the sum by ``input.shape[0]`` (the KL per example);
    ``"mean"`` divides by the number of elements.
    """
    x, t = np.asarray(input, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if log_target:
        loss = np.exp(t) * (t - x)
    else:
        loss = np.where(t > 0, t * (np.log(np.where(t > 0, t, 1.0)) - x), 0.0)
    if reduction == "batchmean":
        return np.sum(loss) / (x.shape[0] if x.ndim else 1)  # a 0-dim input is one example, as PyTorch
    return _reduce(loss, reduction, loss.size)


def sigmoid_focal_loss(
    inputs: ArrayLike, targets: ArrayLike, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> np.ndarray:
    """alpha_t (1 - p_t)^gamma * BCE-with-logits, as torchvision defines it (alpha < 0: no alpha_t)."""
    x, y = np.asarray(inputs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    p = sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    loss = binary_cross_entropy_with_logits(x, y, reduction="none") * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return _reduce(loss, reduction, loss.size)


def focal_loss(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    gamma: float = 2.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> np.ndarray:
    """Softmax focal loss -w_t (1 - p_t)^gamma log p_t; mean divides by the summed w_t of kept targets."""
    z, t, kept, _, w_t = _index_parts(input, target, weight, ignore_index)
    logp_t = np.where(kept, _pick(log_softmax(z), t), 0.0)  # ignored rows add 0, even with -inf logits
    loss = -w_t * (1 - np.exp(logp_t)) ** gamma * logp_t
    loss = loss[0] if np.ndim(input) == 1 else loss
    return _reduce(loss, reduction, np.sum(w_t))
