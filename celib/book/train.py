"""A deliberately plain training loop for the book's small experiments."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["History", "MLPStack", "accuracy", "fit", "fit_stack", "linear_model", "mlp_stack", "predict", "predict_proba"]


@dataclass
class History:
    """Per-epoch records of a :func:`fit` run (lists of Python floats)."""

    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)


def linear_model(in_features: int, num_classes: int, *, hidden: int | None = None, seed: int = 0) -> nn.Module:
    """A linear classifier (or a one-hidden-layer MLP when ``hidden`` is set), seeded."""
    torch.manual_seed(seed)
    if hidden is None:
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int = 50,
    lr: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    optimizer: str = "sgd",
) -> History:
    """Train ``model`` with mini-batch SGD (or Adam) on ``loss_fn(model(x), y)``; returns a :class:`History`.

    The batch order is drawn from a generator seeded with ``seed``, so a run is
    repeatable. ``train_loss`` is the mean batch loss of each epoch (it may be
    nan or inf if training diverges; the loop does not stop).
    """
    generator = torch.Generator().manual_seed(seed)
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    opt = opt_cls(model.parameters(), lr=lr)
    history = History()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total, batches = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
        history.train_loss.append(total / batches)
        history.train_accuracy.append(accuracy(model, x, y))
        if x_test is not None and y_test is not None:
            history.test_accuracy.append(accuracy(model, x_test, y_test))
    return history


@dataclass
class MLPStack:
    """K one-hidden-layer ReLU networks kept as stacked parameters (default dtype).

    ``w1`` (K, d, h), ``b1`` (K, 1, h), ``w2`` (K, h, C), ``b2`` (K, 1, C).
    Calling it on x (K, n, d), one input batch per network, gives logits
    (K, n, C) with two batched matrix products: training many small networks
    this way costs a fraction of training them one by one.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def parameters(self) -> list[torch.Tensor]:
        return [self.w1, self.b1, self.w2, self.b2]


def mlp_stack(seeds: Sequence[int], in_features: int, num_classes: int, *, hidden: int) -> MLPStack:
    """K = len(seeds) networks, network k initialised exactly as
    ``linear_model(in_features, num_classes, hidden=hidden, seed=seeds[k])``."""
    nets = [linear_model(in_features, num_classes, hidden=hidden, seed=s) for s in seeds]

    def stack(get: Callable[[nn.Sequential], torch.Tensor]) -> torch.Tensor:
        return torch.stack([get(n).detach().clone() for n in nets])

    return MLPStack(
        stack(lambda n: n[0].weight.T),
        stack(lambda n: n[0].bias[None]),
        stack(lambda n: n[2].weight.T),
        stack(lambda n: n[2].bias[None]),
    )


def fit_stack(
    nets: MLPStack,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    lr: float | Sequence[float] | torch.Tensor,
    epochs: int,
) -> None:
    """Full-batch gradient descent on K networks at once, in place.

    ``x`` (K, n, d) and ``y`` (K, n) hold each network's own batch.
    ``loss_fn(logits (K, n, C), y (K, n))`` returns the K networks' losses
    (K,); network k steps with ``lr[k]`` (one rate, or K). The arithmetic is
    that of K separate runs of :func:`fit` with ``batch_size=n`` (plain
    SGD), up to the order of floating-point sums.

    Raises:
        ValueError: ``lr`` holds neither 1 nor K rates, or ``loss_fn`` does
            not return shape (K,) (a loss averaged over all networks would
            divide every gradient by K).
    """
    params = nets.parameters()
    k = params[0].shape[0]
    step = torch.as_tensor(lr, dtype=params[0].dtype, device=params[0].device).reshape(-1)
    if step.numel() not in (1, k):
        raise ValueError(f"lr must hold 1 or {k} learning rates (one per network), got {step.numel()}.")
    step = step.view(-1, 1, 1)
    try:
        for p in params:
            p.requires_grad_()
        for _ in range(epochs):
            losses = loss_fn(nets(x), y)
            if losses.shape != (k,):
                raise ValueError(f"loss_fn must return the {k} networks' losses, shape ({k},), "
                                 f"got shape {tuple(losses.shape)}.")
            grads = torch.autograd.grad(losses.sum(), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= step * g
    finally:
        for p in params:
            p.requires_grad_(False)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Probabilities of ``model`` on ``x``, in eval mode: softmax (n, C) for C > 1 outputs,
    sigmoid (n, 1) for a single (binary) output."""
    model.eval()
    logits = model(x)
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes (n,) int64: the arg-max, or probability > 0.5 for a single binary output."""
    probs = predict_proba(model, x)
    return (probs[:, 0] > 0.5).long() if probs.shape[1] == 1 else probs.argmax(1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` whose predicted class (see :func:`predict`) equals ``y``."""
    return float((predict(model, x) == y.long()).float().mean())
