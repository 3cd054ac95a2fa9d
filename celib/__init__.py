"""celib: cross-entropy losses to read, to check against PyTorch, and to train with.

- :mod:`celib.ref`: NumPy reference implementations, written to be read.
- ``celib.cross_entropy`` and friends: drop-ins for ``torch.nn.functional``
  (same names, arguments, defaults and results), with clear errors.
- :func:`celib.linear_cross_entropy`: the output layer and the loss in one call,
  chunked so that the (N, V) logits never exist at once.
- :mod:`celib.nn`: the matching ``torch.nn`` modules.
- :func:`celib.diagnose`: names a mistake in the inputs to a loss, and its fix.
- :mod:`celib.kernels`: a fused Triton softmax-cross-entropy kernel (optional:
  triton is imported only when the kernel runs, so celib works where triton is
  absent).
"""

from celib._versions import check_torch

check_torch()

from celib import kernels, nn, ref  # noqa: E402
from celib.diagnose import Finding, diagnose  # noqa: E402
from celib.errors import InputError  # noqa: E402
from celib.functional import (  # noqa: E402
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    focal_loss,
    kl_div,
    nll_loss,
    sigmoid_focal_loss,
)
from celib.linear import linear_cross_entropy  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Finding",
    "InputError",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "diagnose",
    "focal_loss",
    "kernels",
    "kl_div",
    "linear_cross_entropy",
    "nll_loss",
    "nn",
    "ref",
    "sigmoid_focal_loss",
]
