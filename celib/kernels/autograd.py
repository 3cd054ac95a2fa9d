"""Autograd for the kernels: an ``autograd.Function`` for eager mode, a ``torch.library`` op for torch.compile.

Eager mode (:class:`CrossEntropyFunction`) moves the least data: for rows that
fit in one block the forward launch writes the gradient at upstream 1, and
backward reads the upstream gradient on the device, moving nothing where it is
1 and recomputing the row from the logits elsewhere; streamed rows get their
gradient from the backward kernel (see :mod:`celib.kernels.kernel`). With
``inplace_backward`` the logits are overwritten, so an upstream other than 1
rescales the stored gradient in place instead. A second backward through the
same graph (``retain_graph=True``) recomputes into a new tensor; with
``inplace_backward`` it raises, since the logits it would read are gone.

Under ``torch.compile`` the kernels are one opaque op to the compiler,
``celib::cross_entropy`` (registered with :func:`torch.library.custom_op`, with
a fake kernel for shapes and :func:`~torch.library.register_autograd`), so
``fullgraph=True`` works. That op is functional (it never writes into a saved
tensor), so its backward always uses the backward kernel: 2 reads and 1 write
per logit for every row.

Why two entry points and not one: eager's 1 read + 1 write rests on state that
a compiled graph does not hold, the gradient written in forward, kept on
``ctx``, and in backward left as it is where the upstream gradient is 1 and
overwritten in place elsewhere. A compiled graph is functional: a backward that
returns the forward's gradient scaled out of place reads and writes it once
more (2 reads + 2 writes in all), more than the op's re-read. Both entry points
run the same implementation: :func:`_forward` (denominator, launch, reduction)
and :func:`celib.kernels.launch.backward`.
"""

from __future__ import annotations

import torch

from celib import _reduction, validate
from celib._options import LossOptions
from celib.errors import refuse_double_backward
from celib.kernels import launch

__all__ = ["CrossEntropyFunction", "cross_entropy_backward_op", "cross_entropy_op"]


def _forward(x3, t, options: LossOptions, max_block: int, compute_grad: bool = False,
             grad_out: torch.Tensor | None = None) -> tuple[torch.Tensor, launch.Forward, torch.Tensor]:
    """The forward of both entry points: (reduced float32 loss, the launch's outputs, gradient scale)."""
    denominator, grad_scale = _reduction.mean_scale(t, options, torch.float32)
    out = launch.forward(x3, t, options, grad_scale, compute_grad, grad_out=grad_out, max_block=max_block)
    return _reduction.reduce(out.loss, options.reduction, denominator), out, grad_scale


class CrossEntropyFunction(torch.autograd.Function):
    """Eager autograd around the kernels: loss and per-row lse forward; gradient as the module docstring says."""

    @staticmethod
    def forward(ctx, logits, target, options: LossOptions, inplace_backward: bool, max_block: int,
                grad_enabled: bool):
        x = launch.as_rows(logits.detach())
        t = launch.as_rows(target) if target.is_floating_point() else target.reshape(-1)
        compute_grad = grad_enabled and ctx.needs_input_grad[0]  # (forward itself runs without grad mode)
        in_place = inplace_backward and compute_grad  # write the gradient over the logits' storage
        loss, out, grad_scale = _forward(x, t, options, max_block, compute_grad, grad_out=x if in_place else None)
        if in_place:  # the logits now hold the gradient: an op that saved them for its backward must notice
            torch.autograd.graph.increment_version(logits)
        batch_shape = validate.index_target_shape(logits)
        loss = loss.view(batch_shape) if options.reduction == "none" else loss
        lse = out.lse.view(batch_shape)
        ctx.mark_non_differentiable(lse)
        if compute_grad:
            ctx.save_for_backward(logits, t, out.stats, grad_scale)  # the input itself: autograd checks its version
            ctx.grad = out.grad  # one-block rows: written already, scaled in place in backward
            ctx.backward_done = False
            ctx.options, ctx.max_block, ctx.in_place, ctx.input_shape = options, max_block, in_place, logits.shape
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        refuse_double_backward("celib.cross_entropy on the Triton kernel",
                               "Use backend='torch' where you need create_graph=True.")
        logits, t, stats, grad_scale = ctx.saved_tensors
        x = launch.as_rows(logits.detach())
        options, max_block, in_place = ctx.options, ctx.max_block, ctx.in_place
        grad, ctx.grad = ctx.grad, None  # the next backward (retain_graph) finds None and recomputes
        if grad is not None and in_place:  # the logits are gone: rescale what forward wrote over them
            grad = launch.scale_(grad, grad_loss, max_block)
        elif grad is not None:  # rows whose upstream is 1 are done; the others are recomputed, rounded once
            grad = launch.backward(x, t, options, stats, grad_scale, grad_loss, grad_out=grad,
                                   max_block=max_block, skip_unit_upstream=True)
        elif in_place and ctx.backward_done:
            raise RuntimeError("celib cross_entropy with inplace_backward=True: the logits were overwritten by "
                               "the gradient, so backward cannot run a second time (retain_graph).")
        else:  # streamed rows, or a second backward through one-block rows
            grad = launch.backward(x, t, options, stats, grad_scale, grad_loss,
                                   grad_out=x if in_place else None, max_block=max_block)
        ctx.backward_done = True
        return grad.reshape(ctx.input_shape), None, None, None, None, None


# ------------------------------------------------------------------------------------------- torch.compile
# The op's arguments after the target are LossOptions' fields in order (LossOptions.as_args), then the block.


@torch.library.custom_op("celib::cross_entropy", mutates_args=())
def cross_entropy_op(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                     reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
                     max_block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss in float32, per-row lse, per-row statistics, gradient scale) of logits (N, C, S)."""
    options = LossOptions(weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    t = target if target.is_floating_point() else target.reshape(-1)
    loss, out, grad_scale = _forward(logits, t, options, max_block)
    return loss, out.lse, out.stats, grad_scale


@cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, max_block):
    n, _, s = logits.shape
    loss = logits.new_empty((n * s,) if reduction == "none" else (), dtype=torch.float32)
    return (loss, logits.new_empty(n * s, dtype=torch.float32), logits.new_empty(3, n * s, dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


@torch.library.custom_op("celib::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                              ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                              softcap: float | None, max_block: int, stats: torch.Tensor,
                              grad_scale: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """d(sum(loss * upstream)) / d logits, from the backward kernel (a new (N, C, S) tensor)."""
    options = LossOptions(weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    t = target if target.is_floating_point() else target.reshape(-1)
    return launch.backward(logits, t, options, stats, grad_scale, upstream.float(), max_block=max_block)


@cross_entropy_backward_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, max_block, stats,
      grad_scale, upstream):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, weight, *scalars = inputs
    _, _, stats, grad_scale = output
    ctx.save_for_backward(logits, target, weight, stats, grad_scale)
    ctx.scalars = tuple(scalars)  # ignore_index, reduction, label_smoothing, z_loss, softcap, max_block


def _backward(ctx, grad_loss, grad_lse, grad_stats, grad_scale_out):
    logits, target, weight, stats, grad_scale = ctx.saved_tensors
    grad = cross_entropy_backward_op(logits, target, weight, *ctx.scalars, stats, grad_scale, grad_loss)
    return grad, None, None, None, None, None, None, None, None


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
