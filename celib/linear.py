"""The output layer and cross-entropy in one call, chunked so the (N, V) logits never exist at once.

For a language model the largest tensor of a training step is often the
logits: N tokens x V vocabulary entries, plus as much again for their gradient.
:func:`linear_cross_entropy` computes ``cross_entropy(input @ W.T + b, target)``
a chunk of rows at a time. For each chunk it forms the logits, the loss and the
gradient of the loss with respect to those logits, and immediately folds that
gradient into the gradients of ``input``, ``W`` and ``b``; the chunk's logits
are then dropped. So the work is the unfused version's three matrix products
(logits, input gradient, weight gradient) plus one pass over each chunk (two
with the Triton backend for rows longer than the kernel's one-block limit,
``celib.kernels.launch.block_size``), with
no recomputation, and the memory is one chunk of logits instead of N x V.

``reduction="none"`` is the exception: its gradient depends on an upstream
gradient per row that is only known in backward, so backward recomputes each
chunk's logits (four matrix products instead of three). So does a second
backward through the same graph (``retain_graph=True``): the first one scales
the gradients formed in forward in place.

The chunk loop itself is :mod:`celib._chunks` (shared with the
vocabulary-parallel losses), the chunk-size rule :mod:`celib._chunk_size`;
this module checks the arguments and holds the autograd and ``torch.compile``
entry points.
"""

from __future__ import annotations

import contextlib

import torch

from celib import _backend, _chunk_size, _chunks, _reduction, functional, validate
from celib._chunk_size import chunk_rows
from celib._options import LossOptions
from celib.errors import InputError, refuse_double_backward

__all__ = ["CHUNK_MEMORY", "chunk_rows", "linear_cross_entropy"]

#: The default cap, in bytes, on one chunk's logits and their float32 working copy, per device type
#: (2 GiB on CUDA, 256 MiB on CPU; see :func:`chunk_rows`). The dict the chunk rule reads: change an
#: entry to change the default.
CHUNK_MEMORY: dict[str, int] = _chunk_size.CHUNK_MEMORY


def _check(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, z_loss,
           softcap) -> LossOptions:
    """Every check of :func:`linear_cross_entropy` that reads no data; its options."""
    validate.check_output_layer(input, linear_weight, linear_bias)
    vocab = linear_weight.shape[0]
    if not isinstance(target, torch.Tensor) or not validate.is_index_target(target):
        raise InputError("target must be an integer tensor of class indices; for probability targets use "
                         "celib.cross_entropy(F.linear(input, linear_weight, linear_bias), target).")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise InputError(f"target shape {tuple(target.shape)} does not fit input shape {tuple(input.shape)}: "
                         f"expected {tuple(input.shape[:-1])}, one class index per row of hidden states.")
    if target.device != input.device:
        raise InputError(f"target is on {target.device} but input is on {input.device}; move it with "
                         f"target.to(input.device).")
    validate.check_class_weight(weight, vocab, input)
    return validate.loss_options(weight, ignore_index, reduction, label_smoothing, z_loss, softcap)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked linear + cross-entropy, eagerly: :func:`celib._chunks.eager_forward` and ``eager_backward``."""

    @staticmethod
    def forward(ctx, x, w, b, t, options: LossOptions, rows: int, backend: str, out_dtype, grad_enabled: bool):
        acc = _reduction.accumulator(x.dtype)
        den, scale = _reduction.mean_scale(t, options, acc)
        losses = _chunks.eager_forward(ctx, x, w, b, _chunks.row_loss(backend, options, t, acc), rows, scale,
                                       grad_enabled)
        ctx.save_for_backward(x, w, b, t, scale)
        ctx.options, ctx.rows, ctx.backend = options, rows, backend
        return _reduction.reduce(losses, options.reduction, den).to(out_dtype or x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("celib.linear_cross_entropy", "Compute the loss unfused, "
                               "F.cross_entropy(F.linear(input, linear_weight, linear_bias), target), "
                               "where you need create_graph=True.")
        x, w, b, t, scale = ctx.saved_tensors
        loss = _chunks.row_loss(ctx.backend, ctx.options, t, _reduction.accumulator(x.dtype))
        gx, gw, gb = _chunks.eager_backward(ctx, grad_out, x, w, b, loss, ctx.rows, scale)
        return gx, gw, gb, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------- torch.compile
# Under torch.compile the chunk loop is one opaque operator for the forward and one for the backward,
# so the compiler neither unrolls the loop (compile time independent of the number of chunks) nor
# materialises the logits (memory as in eager). The forward op returns the per-row losses; the
# reduction is ordinary PyTorch arithmetic around it; the backward op recomputes each chunk with the
# per-row upstream gradient (four products instead of three, the price of a functional op: eager's
# gradients formed in forward and scaled in place in backward are state a compiled graph does not
# hold). Both ops run the same chunk loop as eager (celib._chunks.chunked_pass). Their arguments after
# the target are LossOptions' fields in order (LossOptions.as_args), then the rows and the backend.


@torch.library.custom_op("celib::linear_cross_entropy_rows", mutates_args=())
def _rows_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor,
             weight: torch.Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
             z_loss: float, softcap: float | None, rows: int, backend: str) -> torch.Tensor:
    """Per-row losses (N,) of cross_entropy(x @ w.T + b, t), float32 (float64 for float64 input)."""
    options = LossOptions(weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    acc = _reduction.accumulator(x.dtype)
    losses = torch.empty(x.shape[0], dtype=acc, device=x.device)
    one = torch.ones((), dtype=acc, device=x.device)
    with torch.no_grad():
        _chunks.chunked_pass(x, w, b, _chunks.row_loss(backend, options, t, acc), rows, one, losses=losses)
    return losses


@_rows_op.register_fake
def _(x, w, b, t, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, rows, backend):
    return x.new_empty(x.shape[0], dtype=_reduction.accumulator(x.dtype))


@torch.library.custom_op("celib::linear_cross_entropy_rows_backward", mutates_args=())
def _rows_backward_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor,
                      weight: torch.Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
                      z_loss: float, softcap: float | None, rows: int, backend: str, upstream: torch.Tensor,
                      need_x: bool, need_w: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dW, dB) of sum(losses * upstream); a 0-element tensor for a gradient not asked for."""
    options = LossOptions(weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    acc = _reduction.accumulator(x.dtype)
    one = torch.ones((), dtype=acc, device=x.device)
    with torch.no_grad():
        gx, gw, gb = _chunks.recompute(x, w, b, _chunks.row_loss(backend, options, t, acc), rows, one, upstream,
                                       (need_x, need_w, need_b and b is not None))
    # a fresh 0-element tensor per missing gradient: outputs of a custom op may not alias each other
    return (x.new_empty(0) if gx is None else gx, x.new_empty(0) if gw is None else gw,
            x.new_empty(0) if gb is None else gb)


@_rows_backward_op.register_fake
def _(x, w, b, t, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, rows, backend, upstream,
      need_x, need_w, need_b):
    return (torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(w) if need_w else x.new_empty(0),
            torch.empty_like(b) if need_b and b is not None else x.new_empty(0))


def _rows_setup(ctx, inputs, output):
    x, w, b, t, *scalars = inputs
    ctx.save_for_backward(x, w, b, t)
    ctx.scalars = tuple(scalars)  # the class weight, the other options, rows, backend
    ctx.need = tuple(ctx.needs_input_grad[:3])


def _rows_backward(ctx, upstream):
    x, w, b, t = ctx.saved_tensors
    need_x, need_w, need_b = ctx.need
    gx, gw, gb = _rows_backward_op(x, w, b, t, *ctx.scalars, upstream, need_x, need_w, need_b)
    return (gx if need_x else None, gw if need_w else None, gb if need_b and b is not None else None,
            None, None, None, None, None, None, None, None, None)


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


def _compiled(x, w, b, t, options: LossOptions, rows, backend, out_dtype):
    """The loss under torch.compile: the per-row op, then the reduction in PyTorch operations."""
    losses = _rows_op(x, w, b, t, *options.as_args(), rows, backend)
    den = _reduction.mean_scale(t, options, losses.dtype)[0]
    return _reduction.reduce(losses, options.reduction, den).to(out_dtype or x.dtype)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    chunk_memory: int | None = None,
    backend: str = "auto",
    check_inputs: bool = True,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of a linear layer's output, without materialising the (N, V) logits.

    The value and gradients of
    ``celib.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``
    (that is, of :func:`torch.nn.functional.linear_cross_entropy`'s reference path), computed
    ``chunk_size`` rows at a time. Peak extra memory is one chunk of logits plus the weight's
    gradient, instead of the N x V logits and their gradient.

    Args:
        input: hidden states, (N, H) or (B, T, H), float16/bfloat16/float32/float64.
        linear_weight: (V, H), the weight of ``nn.Linear(H, V)`` (its ``.weight``, not the
            module), same dtype as ``input`` outside autocast.
        target: class indices, int, of shape (N,) or (B, T); values in [0, V-1] or
            ``ignore_index``. (B, T, H) input is treated as B*T rows, as a language model's
            head: the loss is that of ``logits.reshape(-1, V)`` and ``target.reshape(-1)``.
        linear_bias: optional (V,).
        weight: class weights (V,), as in :func:`celib.cross_entropy`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``, as in :func:`celib.cross_entropy`;
            ``"none"`` returns the loss per row, shape of ``target``, and its backward
            recomputes the logits of each chunk.
        ignore_index: as in :func:`celib.cross_entropy`.
        label_smoothing: as in :func:`celib.cross_entropy`.
        z_loss: as in :func:`celib.cross_entropy`.
        softcap: as in :func:`celib.cross_entropy`.
        chunk_size: rows per chunk; default from the device's rule, capped by ``chunk_memory``
            (see :func:`celib.linear.chunk_rows`: on CUDA 1280 rows for bf16 at H = 4096, more for a
            smaller H; on a CPU a
            quarter of the batch, 128 to 512 rows).
        chunk_memory: bytes one chunk's logits may take when ``chunk_size`` is not given (default
            :data:`celib.linear.CHUNK_MEMORY`: 2 GiB on CUDA, 256 MiB on CPU).
        backend: ``"torch"`` (PyTorch operations per chunk), ``"triton"`` (celib's fused kernel
            per chunk, writing the gradient over the chunk's logits; CUDA, or Triton's
            interpreter on CPU), or ``"auto"``: the kernel on CUDA when triton is installed.
        check_inputs: check that every target is in range (reads the target; a device sync).
        loss_dtype: dtype of the returned loss; ``None`` keeps the input's dtype (as PyTorch),
            ``torch.float32`` returns the float32 loss of half-precision inputs unrounded.

    Under ``torch.autocast`` the matrix products run in the autocast dtype, as ``F.linear``'s
    would: the hidden states, ``linear_weight`` and ``linear_bias`` are cast to it (unless
    float64), so bf16 hidden states with a float32 output layer, what autocast produces, are
    accepted. The loss is then returned in float32, as autocast's ``cross_entropy`` returns it,
    and the gradients are accumulated in float32.

    Returns:
        The loss, in ``loss_dtype`` (by default ``input``'s dtype, or float32 under autocast), a
        scalar or, for ``reduction="none"``, one value per row. Gradients of half-precision
        ``linear_weight`` and ``linear_bias`` are accumulated over chunks in float32 and rounded
        once.

    Raises:
        InputError: shapes that do not fit (hidden size vs weight, vocabulary of weight vs
            bias, target shape), dtype or device mismatch, out-of-range targets.

    Example:
        >>> import torch, celib
        >>> g = torch.Generator().manual_seed(0)
        >>> hidden = torch.randn(6, 8, generator=g, dtype=torch.float64)
        >>> weight = torch.randn(50, 8, generator=g, dtype=torch.float64)
        >>> target = torch.tensor([3, 7, 0, 49, 12, -100])
        >>> fused = celib.linear_cross_entropy(hidden, weight, target, chunk_size=2)
        >>> unfused = torch.nn.functional.cross_entropy(hidden @ weight.T, target)
        >>> bool(torch.isclose(fused, unfused, rtol=1e-12))
        True
    """
    _backend.check(backend)
    validate.check_loss_dtype(loss_dtype)
    device_type = input.device.type if isinstance(input, torch.Tensor) else "cpu"
    autocast = _backend.autocast_on(device_type)
    if autocast:  # as F.linear under autocast: the products in the autocast dtype (casts are differentiable)
        dt = torch.get_autocast_dtype(device_type)
        input, linear_weight, linear_bias = (
            v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64 else v
            for v in (input, linear_weight, linear_bias))
        loss_dtype = loss_dtype or torch.float32  # autocast runs cross_entropy in float32
    options = _check(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                     label_smoothing, z_loss, softcap)
    vocab, hidden = linear_weight.shape
    t = target.reshape(-1)
    if check_inputs:
        validate.check_target_range(t, vocab, ignore_index)
    if vocab == 0:  # no classes, every row ignored: PyTorch's answer (mean nan, sum 0), no chunk loop
        logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
        return functional.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                        check_inputs=False).to(loss_dtype or input.dtype)
    t = t.long()
    use_kernel = _backend.use_kernel(backend, input)
    x, w, b = input.reshape(-1, hidden), linear_weight, linear_bias
    rows = chunk_rows(x.shape[0], vocab, chunk_size, dtype=x.dtype, device=x.device, memory=chunk_memory,
                      hidden=hidden)
    args = (x, w, b, t, options, rows, "triton" if use_kernel else "torch", loss_dtype)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if torch.compiler.is_compiling():
            loss = _compiled(*args)
        else:
            loss = _LinearCrossEntropyFunction.apply(*args, torch.is_grad_enabled())
    return loss.reshape(target.shape) if reduction == "none" else loss
