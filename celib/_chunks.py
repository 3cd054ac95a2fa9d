"""The chunk engine: the output layer and a loss a chunk of rows at a time, written once.

:func:`chunked_pass` is the one loop. For each chunk of rows it forms the
logits ``x @ W.T + b`` into buffers reused from chunk to chunk, asks a *row
loss* for the chunk's loss (and, when gradients are wanted, for the gradient
with respect to the logits, written over them), and folds that gradient into
the gradients of ``x``, ``W`` and ``b`` (:class:`ParamGrads`). It drives
:func:`celib.linear_cross_entropy`'s forward, its recomputation in backward and
its ``torch.compile`` ops, and ``celib.distributed``'s vocabulary-parallel
losses.

A row loss is :class:`TorchRowLoss` (PyTorch operations), :class:`TritonRowLoss`
(celib's kernel) or, in :mod:`celib.distributed`, the shard loss whose row
statistics are all-reduced over the ranks. Each has the same three members:
``options`` (its :class:`~celib._options.LossOptions`), ``raw`` (whether it
takes the product as the matrix multiply gives it, not converted to the
accumulation dtype and soft-capped) and ``loss_and_grad(z, rows, scale,
upstream, want_grad) -> loss``, which reads what it needs of the target from
``rows``, a slice of the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from celib import _reduction
from celib._options import LossOptions
from celib.kernels import launch

__all__ = ["ParamGrads", "RowLoss", "TorchRowLoss", "TritonRowLoss", "WeightGrad", "chunked_pass", "eager_backward",
           "eager_forward", "recompute", "row_loss", "softmax_grad_"]


class RowLoss(Protocol):
    """What :func:`chunked_pass` asks of a row loss (see the module docstring)."""

    options: LossOptions
    raw: bool

    def loss_and_grad(self, z: torch.Tensor, rows: slice, scale: torch.Tensor, upstream: torch.Tensor | None,
                      want_grad: bool) -> torch.Tensor | None: ...


def _row_slices(n: int, rows: int) -> Iterator[slice]:
    """The row slices of the chunks: [0, rows), [rows, 2 rows), ..."""
    return (slice(start, min(start + rows, n)) for start in range(0, n, rows))


class _Logits:
    """A chunk's logits, written into two buffers reused from chunk to chunk (so a pass holds one
    chunk of logits): the product in the weight's dtype, and, for half-precision weights, a copy in
    the accumulation dtype, soft-capped. A row loss with ``raw = True`` (the Triton kernel, which
    reads half precision and soft-caps itself) gets the product as it is."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, rows: int, acc: torch.dtype, raw: bool,
                 softcap: float | None) -> None:
        self.w, self.b, self.softcap = w, b, None if raw else softcap
        self.mm = torch.empty(rows, w.shape[0], dtype=w.dtype, device=w.device)
        self.acc = None if raw or acc == w.dtype else torch.empty(rows, w.shape[0], dtype=acc, device=w.device)

    def __call__(self, xs: torch.Tensor) -> torch.Tensor:
        n = len(xs)
        z = self.mm[:n]
        if self.b is None:
            torch.mm(xs, self.w.t(), out=z)
        else:
            torch.addmm(self.b, xs, self.w.t(), out=z)
        if self.acc is not None:  # half-precision inputs: the loss and its gradient in float32
            z = self.acc[:n].copy_(z)
        if self.softcap is not None:
            z = z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z


def softmax_grad_(e: torch.Tensor, total: torch.Tensor, lse: torch.Tensor, w_t: torch.Tensor, kept: torch.Tensor,
                  s: torch.Tensor, options: LossOptions, num_classes: int,
                  sum_w: float | torch.Tensor) -> torch.Tensor:
    """The gradient of the loss of class-index rows with respect to their logits, but for the target's
    one-hot term, written over ``e``.

    ``e`` (n, C) holds exp(z - shift) and ``total`` (n,) the sum over the whole row of exp(z - shift),
    so that ``e / total`` is the softmax p; ``w_t`` (n,) is each row's target class weight (1 without
    weights, 0 for an ignored row), ``kept`` (n,) 1 for a row that counts and 0 for an ignored one,
    ``s`` (n,) each row's factor (the mean's scale times the upstream gradient, times ``kept``),
    ``num_classes`` and ``sum_w`` the whole row's C and sum of class weights. With smoothing a, z-loss
    coefficient zl and class weights w (ones without them) the gradient is::

        ((1 - a) w_t + (a / C) sum_w + 2 zl lse) s p - (a / C) s w - (1 - a) w_t s onehot(target)

    The caller subtracts the last term at the target's column, in the accumulation dtype, so that
    p - 1 keeps its precision (and only where the target's column is in ``e``).
    """
    o = options
    a = o.label_smoothing
    coef = ((1 - a) * w_t + (a / num_classes) * sum_w * kept + 2 * o.z_loss * lse * kept) * s
    g = e.mul_((coef / total)[:, None])  # coef * p, in place
    if a:
        g.addr_(s, o.weight if o.weight is not None else e.new_ones(e.shape[1]), alpha=-a / num_classes)
    return g


class TorchRowLoss:
    """Loss and logit-gradient of a chunk's rows with PyTorch operations, in the logits' dtype (the
    accumulation dtype), in place: no temporary the size of the chunk except with soft-capping."""

    raw = False

    def __init__(self, options: LossOptions, target: torch.Tensor, acc: torch.dtype) -> None:
        weight = None if options.weight is None else options.weight.to(acc)
        self.options, self.target = options.replace(weight=weight), target

    def loss_and_grad(self, z: torch.Tensor, rows: slice, scale: torch.Tensor, upstream: torch.Tensor | None,
                      want_grad: bool) -> torch.Tensor:
        """Per-row loss (n,) of the logits z (n, C) of ``rows``; with ``want_grad`` z is overwritten
        by d(loss * scale * upstream)/dz, where ``scale`` is () (1/den for the mean, else 1) and
        ``upstream`` an optional per-row factor (n,). Ignored rows get zero gradient."""
        o, t = self.options, self.target[rows]
        n, c = z.shape
        kept = (t != o.ignore_index).to(z.dtype)  # as a float: bool * float would give float32
        safe = torch.where(t != o.ignore_index, t, torch.zeros_like(t))
        a, zl = o.label_smoothing, o.z_loss
        w_t = _reduction.kept_weight(t, o.weight, o.ignore_index, z.dtype)
        sum_w = float(c) if o.weight is None else o.weight.sum()
        capped = z.clone() if want_grad and o.softcap is not None else None
        # Shift by the row max in place (no temporary the size of z), then exponentiate in place.
        # Sums are taken of shifted logits, so no large |z| is subtracted from another.
        m = z.amax(1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf: exp gives 0, lse -inf
        z.sub_(m[:, None])
        z_t = z.gather(1, safe[:, None]).squeeze(1)  # z_t - m
        wz = (z.sum(1) if o.weight is None else torch.mv(z, o.weight)) if a else None
        e = z.exp_()  # z is overwritten from here on
        total = e.sum(1)
        log_total = total.log()
        lse = m + log_total
        loss = (1 - a) * w_t * (log_total - z_t)
        if a:
            loss = loss + (a / c) * (sum_w * log_total - wz) * kept
        if zl:
            loss = loss + zl * lse.square() * kept
        # an ignored row is 0, also where its placeholder class 0 has a -inf logit (0 * inf would be nan)
        loss = torch.where(t != o.ignore_index, loss, torch.zeros_like(loss))
        if not want_grad:
            return loss
        s = scale.to(z.dtype) * kept
        if upstream is not None:
            s = s * upstream.to(z.dtype)
        g = softmax_grad_(e, total, lse, w_t, kept, s, o, c, sum_w)
        g[torch.arange(n, device=z.device), safe] -= (1 - a) * w_t * s  # p - 1 at the target, in float32
        if capped is not None:
            g.mul_(1 - (capped / o.softcap).square())
        return loss


class TritonRowLoss:
    """Loss and logit-gradient of a chunk's rows from celib's Triton kernel, which reads the raw
    product (half precision, not soft-capped) and writes the gradient over it."""

    raw = True

    def __init__(self, options: LossOptions, target: torch.Tensor, acc: torch.dtype) -> None:
        self.options, self.target = options, target

    def loss_and_grad(self, z: torch.Tensor, rows: slice, scale: torch.Tensor, upstream: torch.Tensor | None,
                      want_grad: bool) -> torch.Tensor:
        """As :meth:`TorchRowLoss.loss_and_grad` (the loss in float32)."""
        n, c = z.shape
        z3, t = z.view(n, c, 1), self.target[rows]
        # With a per-row upstream (known only in backward) the forward kernel writes no gradient and the
        # backward kernel forms it, upstream included: rounded once, any upstream layout.
        grad_now = want_grad and upstream is None
        out = launch.forward(z3, t, self.options, scale, grad_now, grad_out=z3 if grad_now else None)
        if want_grad and out.grad is None:  # streamed rows, or an upstream: re-read the logits, write over them
            up = torch.ones((), dtype=torch.float32, device=z.device) if upstream is None else upstream.float()
            launch.backward(z3, t, self.options, out.stats, scale, up, grad_out=z3)
        return out.loss


def row_loss(backend: str, options: LossOptions, target: torch.Tensor, acc: torch.dtype):
    """The row loss of ``backend`` (``"torch"`` or ``"triton"``)."""
    return (TritonRowLoss if backend == "triton" else TorchRowLoss)(options, target, acc)


_OUT_DTYPE_ADDMM: dict[tuple[str, torch.dtype], bool] = {}  # (device type, dtype) -> it works there


def _mixed_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32)`` multiplies ``dtype`` operands into a float32
    result on ``device`` (CUDA builds of recent PyTorch do; CPU builds do not). Decided once per device
    type and dtype by a 1 x 1 product, so that an error of a real call is never mistaken for "absent"."""
    key = (device.type, dtype)
    if key not in _OUT_DTYPE_ADDMM:
        a = torch.zeros(1, 1, dtype=dtype, device=device)
        try:
            torch.addmm(torch.zeros(1, 1, device=device), a, a, out_dtype=torch.float32)
            _OUT_DTYPE_ADDMM[key] = True
        except (RuntimeError, NotImplementedError, TypeError):  # no such overload on this build
            _OUT_DTYPE_ADDMM[key] = False
    return _OUT_DTYPE_ADDMM[key]


def _accumulate_half(gw: torch.Tensor, g: torch.Tensor, gh: torch.Tensor, xs: torch.Tensor) -> None:
    """gw (V, H) float32 += g.T @ xs for half-precision chunks, with no (V, H) temporary.

    Where PyTorch has the mixed-precision product (:func:`_mixed_addmm`), the half operands ``gh`` and
    ``xs`` are multiplied on the tensor cores and added into ``gw`` in float32. Elsewhere the gradient
    ``g`` (float32, or the weight's dtype from a raw row loss) and ``xs`` are multiplied in float32 (a
    chunk-sized copy, not (V, H)), in place.
    """
    if _mixed_addmm(gw.device, gh.dtype):
        torch.addmm(gw, gh.t(), xs, out_dtype=torch.float32, out=gw)
    else:
        gw.addmm_(g.t() if g.dtype == gw.dtype else g.t().float(), xs.float())


class WeightGrad:
    """The (V, H) weight gradient, accumulated over chunks in place, in the accumulation dtype.

    For a weight of that dtype it is one tensor. For a half-precision weight it is float32 blocks of
    at most V / :attr:`BLOCKS` rows of W, so that :meth:`result` can convert it to the weight's dtype
    freeing each float32 block as it goes, and then join the half-precision blocks (one copy of the
    result, 2 x 2 V H bytes moved): the peak is the float32 accumulator plus one half-precision
    block, not plus a whole half-precision copy (1.05 GB at V = 128256, H = 4096 in bf16).
    """

    BLOCKS = 8

    def __init__(self, w: torch.Tensor, acc: torch.dtype) -> None:
        self.shape, self.dtype, self.device = w.shape, w.dtype, w.device
        vocab = w.shape[0]
        step = max(1, vocab if acc == w.dtype else -(-vocab // self.BLOCKS))  # a shard may hold no rows
        self.starts = list(range(0, vocab, step))
        self.blocks: list[torch.Tensor | None] = [
            torch.zeros(min(step, vocab - s), w.shape[1], dtype=acc, device=w.device) for s in self.starts]

    def add(self, g: torch.Tensor, gh: torch.Tensor, xs: torch.Tensor) -> None:
        """+= gh.T @ xs, block by block (g: the chunk's gradient in the logits' dtype, float32 or the
        weight's own for a raw row loss; gh: in the weight's dtype)."""
        for start, block in zip(self.starts, self.blocks):
            cols = slice(start, start + block.shape[0])
            if gh.dtype == block.dtype:
                block.addmm_(gh[:, cols].t(), xs)
            else:
                _accumulate_half(block, g[:, cols], gh[:, cols], xs)

    def result(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The gradient in the weight's dtype, times ``scale`` if given; consumes the accumulator."""
        if not self.blocks:  # a weight of no rows (a vocabulary shard that holds no class)
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        if len(self.blocks) == 1 and self.blocks[0].dtype == self.dtype:
            out = self.blocks.pop()
            return out if scale is None else out.mul_(scale.to(out.dtype))
        parts = []
        for i in range(len(self.blocks)):
            block, self.blocks[i] = self.blocks[i], None
            part = torch.empty(block.shape, dtype=self.dtype, device=block.device)
            if scale is None:
                part.copy_(block)
            else:
                torch.mul(block, scale.to(block.dtype), out=part)
            parts.append(part)
            del block  # its float32 memory is free before the next block is converted
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class ParamGrads:
    """The gradients of the input (N, H), the weight (V, H) and the bias (V,), accumulated chunk by
    chunk in place (no (V, H) temporary in any dtype); None for one not asked for.

    The input's gradient is in ``input_dtype`` (the input's own; the accumulation dtype where it is
    summed over ranks afterwards), the bias's in the accumulation dtype until :meth:`result`.
    """

    def __init__(self, x: torch.Tensor, w: torch.Tensor, acc: torch.dtype, need: tuple[bool, bool, bool],
                 input_dtype: torch.dtype | None = None) -> None:
        need_x, need_w, need_b = need
        self.w_dtype = w.dtype
        self.x = torch.empty(x.shape, dtype=input_dtype or x.dtype, device=x.device) if need_x else None
        self.w = WeightGrad(w, acc) if need_w else None
        self.b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_b else None

    def add(self, g: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, rows: slice) -> None:
        """Fold one chunk's logit gradient g (n, V) in: the input's ``rows``, the weight, the bias."""
        gh = g.to(w.dtype)
        if self.x is not None:
            if self.x.dtype == gh.dtype:
                torch.mm(gh, w, out=self.x[rows])
            else:  # an accumulator in another dtype (the vocabulary-parallel input gradient)
                self.x[rows] = torch.mm(gh, w).to(self.x.dtype)
        if self.w is not None:
            self.w.add(g, gh, xs)
        if self.b is not None:
            self.b += g.sum(0, dtype=self.b.dtype)

    def result(self, scale: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
        """(dX, dW, dB), times ``scale`` (a () tensor) if given, dW and dB in the weight's dtype;
        consumes the accumulators."""
        gx, gb = self.x, self.b
        if scale is not None:
            gx = None if gx is None else gx.mul_(scale.to(gx.dtype))
            gb = None if gb is None else gb.mul_(scale.to(gb.dtype))
        gw = None if self.w is None else self.w.result(scale)
        self.x = self.w = self.b = None
        return gx, gw, None if gb is None else gb.to(self.w_dtype)


def chunked_pass(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, loss: RowLoss, rows: int,
                 scale: torch.Tensor, *, upstream: torch.Tensor | None = None, grads: ParamGrads | None = None,
                 losses: torch.Tensor | None = None) -> None:
    """The one chunk loop: for each chunk of ``rows`` rows of ``x`` (N, H), the logits
    ``x @ w.T + b``, the row ``loss``'s ``loss_and_grad`` (the gradient scaled by ``scale`` () and,
    if given, ``upstream`` (N,)), the per-row losses into ``losses`` (N,) if given, and with
    ``grads`` the gradient folded into it."""
    acc = _reduction.accumulator(x.dtype)
    logits = _Logits(w, b, min(rows, x.shape[0]), acc, loss.raw, loss.options.softcap)
    for sl in _row_slices(x.shape[0], rows):
        z = logits(x[sl])
        out = loss.loss_and_grad(z, sl, scale, None if upstream is None else upstream[sl], grads is not None)
        if losses is not None:
            losses[sl] = out
        if grads is not None:
            grads.add(z, x[sl], w, sl)


# ------------------------------------------------------------------------------ the eager autograd path
# Used by the autograd.Functions of celib.linear and celib.distributed, which differ only in their row
# loss and in what they do with the input's gradient afterwards.


def eager_forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, loss: RowLoss, rows: int,
                  scale: torch.Tensor, grad_enabled: bool, input_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The per-row losses (N,) in the accumulation dtype. With a scalar upstream gradient to come
    (``"mean"``, ``"sum"``) and a gradient wanted, the gradients are formed now, at upstream 1, and
    kept on ``ctx`` for :func:`eager_backward` to scale: three matrix products, no recomputation."""
    acc = _reduction.accumulator(x.dtype)
    need = tuple(grad_enabled and n for n in ctx.needs_input_grad[:3])  # (forward runs without grad mode)
    formed_now = loss.options.reduction != "none" and any(need)
    ctx.grads = ParamGrads(x, w, acc, need, input_dtype) if formed_now else None
    losses = torch.empty(x.shape[0], dtype=acc, device=x.device)
    chunked_pass(x, w, b, loss, rows, scale, grads=ctx.grads, losses=losses)
    return losses


def eager_backward(ctx, grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                   loss: RowLoss, rows: int, scale: torch.Tensor,
                   input_dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, ...]:
    """(dX, dW, dB): the gradients formed in forward scaled in place by the upstream scalar (no host
    sync, no copy), or, for ``"none"`` or a second backward (``retain_graph=True``, which finds them
    consumed), recomputed chunk by chunk with the upstream gradient of each row."""
    acc = _reduction.accumulator(x.dtype)
    if ctx.grads is not None:
        grads, ctx.grads = ctx.grads, None
        return grads.result(grad_out.to(acc))
    upstream = grad_out.to(acc).expand(x.shape[0])
    return recompute(x, w, b, loss, rows, scale, upstream, tuple(ctx.needs_input_grad[:3]), input_dtype)


def recompute(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, loss: RowLoss, rows: int,
              scale: torch.Tensor, upstream: torch.Tensor, need: tuple[bool, bool, bool],
              input_dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, ...]:
    """(dX, dW, dB) of sum(loss_rows * scale * upstream), recomputing each chunk's logits (the upstream
    (N,) per row is known only in backward): four matrix products instead of three."""
    grads = ParamGrads(x, w, _reduction.accumulator(x.dtype), need, input_dtype)
    chunked_pass(x, w, b, loss, rows, scale, upstream=upstream, grads=grads)
    return grads.result()
