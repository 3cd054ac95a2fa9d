"""The one exception type celib raises for bad input."""

__all__ = ["InputError"]


class InputError(ValueError):
    """An argument to a celib function is invalid.

    Every message names the problem and how to fix it. It subclasses
    :class:`ValueError`, so ``except ValueError`` keeps working for code that
    was written against ``torch.nn.functional``.
    """
