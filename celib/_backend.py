"""Which backend a call runs on: PyTorch operations, or celib's Triton kernel. Decided here, once."""

from __future__ import annotations

import torch

from celib import _versions
from celib.errors import InputError

__all__ = ["BACKENDS", "autocast_on", "check", "require_triton", "use_kernel"]

#: The values of every ``backend=`` argument.
BACKENDS = ("auto", "torch", "triton")


def require_triton() -> None:
    """Raise ImportError, with the way to install it, when triton is missing or older than supported."""
    from celib import kernels

    if not kernels.available():
        raise ImportError(
            "backend='triton' needs the triton package, which is not installed (it exists for Linux): "
            f"pip install 'triton>={'.'.join(map(str, _versions.MIN_TRITON))}', or reinstall celib from its "
            "source tree with the extra, "
            "pip install '.[triton]' (not 'celib' from the package index: that name belongs to another "
            "project). Use backend='torch' (or 'auto') instead."
        )
    _versions.check_triton()


def check(backend: str) -> None:
    """Raise :class:`celib.InputError` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r} is not supported; use one of {', '.join(map(repr, BACKENDS))}.")


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``. Under torch.compile the availability check is skipped
    (the traced devices have autocast): torch 2.9's Dynamo has no rule for the C function
    ``torch.amp.is_autocast_available`` calls (2.13 has), and would stop a ``fullgraph=True`` compile."""
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def use_kernel(backend: str, input: torch.Tensor) -> bool:
    """True when a call runs the Triton kernel: ``backend="triton"``, or ``"auto"`` on a CUDA tensor of a
    dtype the kernel takes with a supported triton installed (``"auto"`` never picks the interpreter, and
    falls back to PyTorch on a triton older than :data:`celib._versions.MIN_TRITON`).

    Raises:
        InputError: an unknown backend, or ``"triton"`` for a dtype the kernel does not take.
        ImportError: ``"triton"`` without triton (see :func:`require_triton`).
    """
    check(backend)
    if backend == "torch":
        return False
    from celib import kernels

    if backend == "auto":
        return bool(input.is_cuda and input.dtype in kernels.DTYPES and kernels.available()
                    and _versions.triton_supported())
    require_triton()
    if input.dtype not in kernels.DTYPES:
        raise InputError(f"the Triton kernel takes float16, bfloat16 or float32 logits, got {input.dtype}; "
                         f"use backend='torch' for {input.dtype}.")
    return True
