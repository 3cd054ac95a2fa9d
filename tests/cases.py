"""Argument grids shared by the conformance tests of celib and celib.ref against PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CECase:
    """One call of cross_entropy: logits, target and options."""

    name: str
    input: torch.Tensor
    target: torch.Tensor
    kwargs: dict

    def __repr__(self) -> str:
        return self.name


def _logits(*shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype) * 2


def _indices(shape: tuple[int, ...], num_classes: int, ignored: float = 0.0, ignore_index: int = -100) -> torch.Tensor:
    t = torch.randint(0, num_classes, shape)
    if ignored:
        t[torch.rand(shape) < ignored] = ignore_index
    return t


def _probs(*shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, dtype=dtype), dim=1 if len(shape) > 1 else 0)


def cross_entropy_cases(dtype=torch.float64) -> list[CECase]:
    """A grid over target kind, weights, ignore_index, smoothing, reduction and input rank."""
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    C = 7
    w = torch.rand(C, generator=g, dtype=dtype) + 0.1
    cases: list[CECase] = []
    shapes = {"1d": (C,), "2d": (6, C), "kdim": (3, C, 4, 2)}
    for rank, shape in shapes.items():
        batch = shape[:0] if len(shape) == 1 else shape[:1] + shape[2:]
        x = _logits(*shape, dtype=dtype)
        for reduction in ("none", "mean", "sum"):
            for smoothing in (0.0, 0.2):
                for weighted in (False, True):
                    kw = dict(reduction=reduction, label_smoothing=smoothing, weight=w if weighted else None)
                    tag = f"{rank}-{reduction}-ls{smoothing}-w{int(weighted)}"
                    cases.append(CECase(f"index-{tag}", x, _indices(batch, C), kw))
                    if len(shape) > 1:
                        cases.append(CECase(f"ignore-{tag}", x, _indices(batch, C, ignored=0.3), kw))
                        cases.append(
                            CECase(f"ignore7-{tag}", x, _indices(batch, C, ignored=0.3, ignore_index=3), dict(kw, ignore_index=3))
                        )
                    cases.append(CECase(f"probs-{tag}", x, _probs(*shape, dtype=dtype), kw))
    for reduction in ("none", "mean", "sum"):
        x = _logits(5, C, dtype=dtype)
        cases.append(CECase(f"all-ignored-{reduction}", x, torch.full((5,), -100), dict(reduction=reduction, weight=w)))
        cases.append(CECase(f"all-ignored-ls-{reduction}", x, torch.full((5,), -100), dict(reduction=reduction, label_smoothing=0.1)))
        cases.append(CECase(f"empty-{reduction}", _logits(0, C, dtype=dtype), torch.zeros(0, dtype=torch.long), dict(reduction=reduction)))
        cases.append(CECase(f"empty-probs-{reduction}", _logits(0, C, dtype=dtype), _probs(0, C, dtype=dtype), dict(reduction=reduction)))
        cases.append(CECase(f"one-class-{reduction}", _logits(4, 1, dtype=dtype), torch.zeros(4, dtype=torch.long), dict(reduction=reduction)))
    return cases


def fused(input, target, max_block=None, **kwargs):
    """``celib.cross_entropy(input, target, backend="triton", **kwargs)``, with the kernel's one-block limit
    set to ``max_block`` for the call (``launch.tuned``) when given: small blocks make short rows stream."""
    import contextlib

    import celib
    from celib.kernels import launch

    with launch.tuned(max_block=max_block) if max_block else contextlib.nullcontext():
        return celib.cross_entropy(input, target, backend="triton", **kwargs)
