"""The oldest PyTorch and Triton celib supports, checked on import with an error that names them.

- triton >= 3.6 is *tested*: ``make test`` installs triton 3.6.0 in front of
  the pinned 3.9.0 and runs the kernel tests with it (``make oldest-triton``).
  3.6 is what this project's GPU machines carry; 3.5 runs the kernels but has
  no ``ptxas`` for sm_100a (the resource table), and 3.4 cannot build the
  table at all.
- torch >= 2.9 is *read from the APIs used*, not tested: only torch 2.13.0
  (CPU build) can be installed on the machines that run CI. Every torch call
  of celib and ``benchmarks/gpu_check.py`` was checked against the 2.9 source
  (``torch.library.custom_op`` and ``register_autograd`` date from 2.4).

Triton's interpreter (celib's kernel on a CPU) before 3.8 converts one-element
NumPy arrays to integers, which NumPy 2.4 made an error: with such a Triton,
the interpreter needs numpy < 2.4 (:func:`check_interpreter` says so).
"""

from __future__ import annotations

import functools
import importlib.metadata
import re

__all__ = ["MIN_TORCH", "MIN_TRITON", "TRITON_INTERPRETER_NUMPY_2_4", "check_interpreter", "check_torch",
           "check_triton", "parse", "require", "triton_supported"]

MIN_TORCH = (2, 9)
MIN_TRITON = (3, 6)
#: The first Triton whose interpreter runs with NumPy >= 2.4.
TRITON_INTERPRETER_NUMPY_2_4 = (3, 8)


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


@functools.cache
def triton_supported() -> bool:
    """True when triton is installed at a version celib supports (read from its metadata: triton is not
    imported). ``backend="auto"`` runs the kernel only then; ``backend="triton"`` raises instead."""
    try:
        return parse(importlib.metadata.version("triton")) >= MIN_TRITON
    except importlib.metadata.PackageNotFoundError:
        return False


def check_interpreter(triton_version: str, numpy_version: str) -> None:
    """Raise ImportError where Triton's interpreter cannot run celib's kernel: Triton < 3.8 with
    NumPy >= 2.4 (its ``tensor.__index__`` calls ``int()`` on a one-element array, as
    ``range(0, n_cols, BLOCK)`` in a kernel does)."""
    if parse(triton_version) < TRITON_INTERPRETER_NUMPY_2_4 and parse(numpy_version) >= (2, 4):
        raise ImportError(
            f"Triton {triton_version}'s interpreter (celib's kernel on a CPU) does not run with NumPy "
            f"{numpy_version}: before Triton 3.8 it converts one-element arrays to integers, an error "
            f"since NumPy 2.4. Install numpy<2.4, or triton>=3.8.")
