"""Evaluation measures used in the book: calibration and per-class recall."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Reliability", "calibrated_ece", "per_class_recall", "reliability"]


@dataclass(frozen=True)
class Reliability:
    """Binned confidence vs accuracy; arrays of length ``n_bins`` (bins with no sample hold nan)."""

    bin_edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    ece: float


def reliability(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, n_bins: int = 10) -> Reliability:
    """Reliability-diagram data and expected calibration error (ECE) of predictions.

    Args:
        probs: (n, C) predicted class probabilities.
        labels: (n,) true class indices.
        n_bins: equal-width confidence bins on [0, 1].

    ECE = sum over bins of (bin count / n) * |accuracy in bin - mean confidence in bin|
    (Guo et al. 2017), with the confidence of a prediction = its largest probability.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be (n, C) and labels (n,), got {probs.shape} and {labels.shape}.")
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, n_bins) / count
        mean_acc = np.bincount(which, correct, n_bins) / count
    ece = float(np.nansum(count / len(conf) * np.abs(mean_acc - mean_conf)))
    return Reliability(edges, mean_conf, mean_acc, count, ece)


def calibrated_ece(
    probs: torch.Tensor | np.ndarray, *, n_draws: int = 200, n_bins: int = 10, seed: int = 0
) -> np.ndarray:
    """ECEs a perfectly calibrated model with these confidences would score: the estimator's noise.

    Each of ``n_draws`` simulations keeps ``probs`` (n, C) and draws new labels:
    a prediction is right with probability equal to its confidence (its largest
    probability), otherwise labelled with another class. The ECE of such a
    model is 0 in expectation over infinitely many examples; on n examples it
    is not. (The name reads "the ECE of a calibrated model", not "the ECE
    after calibration".)

    Args:
        probs: (n, C) predicted probabilities, float, C >= 2.
        n_draws: how many label sets to simulate.
        n_bins: equal-width confidence bins, as in :func:`reliability`.
        seed: seeds the draws.

    Returns:
        The ``n_draws`` simulated ECEs, a float64 array (n_draws,).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be (n, C) with C >= 2, got {probs.shape}.")
    rng = np.random.default_rng(seed)
    conf, pred = probs.max(1), probs.argmax(1)
    wrong = (pred + 1) % probs.shape[1]
    draws = [
        reliability(probs, np.where(rng.random(len(conf)) < conf, pred, wrong), n_bins).ece
        for _ in range(n_draws)
    ]
    return np.asarray(draws)


def per_class_recall(pred: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class: share of its examples predicted as it; shape (num_classes,), nan if absent."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    hits = np.bincount(labels[pred == labels], minlength=num_classes).astype(np.float64)
    totals = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / totals
