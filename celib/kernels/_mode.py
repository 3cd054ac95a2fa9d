"""Compiled or interpreted: the one question about Triton that celib's runtime must settle itself.

Triton runs kernels compiled for a GPU, or, with ``TRITON_INTERPRET=1``, under its
interpreter (NumPy, on the CPU). It reads that variable once, when it is first
imported, for its own library as well as for kernels defined later, and offers no
other switch. So :func:`prefer_interpreter_without_gpu`, called when
``celib.kernels`` is imported (``import celib`` does), sets the variable on a
machine without a GPU and before anything has imported triton. That is the one
place celib changes the process's environment: only where Triton leaves no other
way, only when the variable is unset (a user's value is kept), and only where the
compiled mode could not run at all. It cannot be restored afterwards without
undoing the choice it makes (later imports of triton, e.g. by torch, read it).

If triton was imported first in compiled mode (``torch._dynamo`` and transformers
import it), CPU tensors cannot use the kernel: :func:`check_device` says so and
gives the fix.
"""

from __future__ import annotations

import contextlib
import os
import sys
from functools import lru_cache

import numpy as np
import torch

from celib.errors import InputError

__all__ = ["check_device", "interpreted", "kernel_module", "prefer_interpreter_without_gpu", "quiet"]


def prefer_interpreter_without_gpu() -> None:
    """Ask Triton for its interpreter on a machine without a GPU, if triton is not imported yet."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@lru_cache(maxsize=None)
def kernel_module():
    """The module of Triton kernels, compiled or interpreted as Triton was imported; under the interpreter
    checked against NumPy (:func:`celib._versions.check_interpreter`)."""
    from triton.runtime.interpreter import InterpretedFunction

    from celib.kernels import kernel

    if isinstance(kernel.forward_kernel, InterpretedFunction):
        import triton

        from celib._versions import check_interpreter

        check_interpreter(triton.__version__, np.__version__)
    return kernel


def interpreted() -> bool:
    """True when the kernels run under Triton's interpreter (on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel_module().forward_kernel, InterpretedFunction)


def quiet(device: torch.device):
    """Under the interpreter (NumPy), silence inf * 0 and log(0) in lanes that tl.where then discards."""
    if device.type == "cpu":
        return np.errstate(invalid="ignore", divide="ignore")
    return contextlib.nullcontext()


def check_device(logits: torch.Tensor) -> None:
    """Raise :class:`celib.InputError` for CPU tensors when Triton runs compiled, with the fix."""
    if not logits.is_cuda and not interpreted():
        if torch.cuda.is_available():
            cause = "this machine has a GPU, so Triton was imported in compiled mode"
        else:
            cause = ("triton was imported in compiled mode before celib (torch._dynamo and transformers import "
                     "it), and Triton fixes its mode when it is first imported")
        raise InputError(
            f"CPU tensors need Triton's interpreter, but {cause}. Set TRITON_INTERPRET=1 in the environment "
            f"before starting Python (or import celib first), or move the tensors to the GPU."
        )
