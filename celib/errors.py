"""The one exception type celib raises for bad input, and the one refusal of a use celib cannot serve."""

import torch

__all__ = ["InputError", "refuse_double_backward"]


class InputError(ValueError):
    """An argument to a celib function is invalid.

    Every message names the problem and how to fix it. It subclasses
    :class:`ValueError`, so ``except ValueError`` keeps working for code that
    was written against ``torch.nn.functional``.
    """


def refuse_double_backward(op: str, fix: str) -> None:
    """Raise in a custom ``backward`` that autograd runs with ``create_graph=True``.

    Such a backward returns a gradient computed by a kernel or from sums formed in forward, which has
    no graph back to its inputs: a second-order term (a gradient penalty, a Hessian-vector product)
    would be silently dropped. Autograd enables grad mode in backward only under ``create_graph=True``.
    """
    if torch.is_grad_enabled():
        raise InputError(f"{op} has no double backward (create_graph=True): its gradient is not built from "
                         f"differentiable operations, so the second-order term would be silently lost. {fix}")
