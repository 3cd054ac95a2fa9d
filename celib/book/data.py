"""Small real data sets for the book's experiments, with nothing downloaded.

scikit-learn ships the 8x8 handwritten digits (1797 images, 10 classes) inside
its package; these helpers split, standardise and (optionally) unbalance them
and return torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Split", "digits"]


@dataclass(frozen=True)
class Split:
    """Train/test tensors: ``x_*`` float32 (n, 64) standardised pixels; ``y_*`` int64 (n,) labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def digits(
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    keep_fraction: dict[int, float] | None = None,
) -> Split:
    """The scikit-learn digits, split into train and test (stratified, seeded).

    Args:
        test_fraction: share of each class put in the test set.
        seed: seeds the split and the subsampling.
        keep_fraction: optional ``{class: fraction}``; the *training* set keeps
            only that fraction of each named class, which makes it imbalanced
            (the test set is left balanced, so per-class recall stays
            measurable). Example: ``{0: 0.05}`` keeps 5% of the zeros.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train = idx[n_test:]
        if keep_fraction and c in keep_fraction:
            train = train[: max(1, int(round(keep_fraction[c] * len(train))))]
        train_idx.append(train)
    train_idx, test_idx = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    # Standardise with the training split's statistics. A feature that is
    # constant there is only centred: divided by a tiny std, a value the
    # training split never showed would become huge (10^6 for one pixel of
    # seed 2's test split), and the model's untrained weight on it would
    # decide that image. (Other features keep the + 1e-6 they always had, so
    # every other standardised value is unchanged.)
    mean, std = x[train_idx].mean(0), x[train_idx].std(0)
    std = np.where(std > 0, std + 1e-6, 1.0)
    scale = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return Split(
        scale(x[train_idx]),
        torch.tensor(y[train_idx], dtype=torch.int64),
        scale(x[test_idx]),
        torch.tensor(y[test_idx], dtype=torch.int64),
    )
