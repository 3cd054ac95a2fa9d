"""The oldest PyTorch and Triton celib supports, checked on import with an error that names them.

torch 2.9 and triton 3.4 are the oldest the GPU machines this project is checked on may carry; celib
uses nothing newer (``torch.library.custom_op`` dates from 2.4, ``tl.constexpr`` globals from Triton 3.0).
CI tests the pinned versions only (torch 2.13.0 CPU build, triton 3.9.0): the bounds are the promise,
the pins are what is tested.
"""

from __future__ import annotations

import re

MIN_TORCH = (2, 9)
MIN_TRITON = (3, 4)


def parse(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '2.13.0+cpu' or '3.4.0.dev20250101'."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def require(name: str, found: str, minimum: tuple[int, int]) -> None:
    """Raise ImportError if ``found`` is older than ``minimum``."""
    if parse(found) < minimum:
        wanted = ".".join(map(str, minimum))
        raise ImportError(f"celib needs {name} >= {wanted}, found {name} {found}; upgrade it "
                          f"(pip install '{name}>={wanted}').")


def check_torch() -> None:
    import torch

    require("torch", torch.__version__, MIN_TORCH)


def check_triton() -> None:
    import triton

    require("triton", triton.__version__, MIN_TRITON)
