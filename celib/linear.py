"""The output layer and cross-entropy in one call, chunked so the (N, V) logits never exist at once.

For a language model the largest tensor of a training step is often the
logits: N tokens x V vocabulary entries, plus as much again for their gradient.
:func:`linear_cross_entropy` computes ``cross_entropy(input @ W.T + b, target)``
a chunk of rows at a time. For each chunk it forms the logits, the loss and the
gradient of the loss with respect to those logits, and immediately folds that
gradient into the gradients of ``input``, ``W`` and ``b``; the chunk's logits
are then dropped. So the work is the unfused version's three matrix products
(logits, input gradient, weight gradient) plus one pass over each chunk, with
no recomputation, and the memory is one chunk of logits instead of N x V.

``reduction="none"`` is the exception: its gradient depends on an upstream
gradient per row that is only known in backward, so backward recomputes each
chunk's logits (four matrix products instead of three). So does a second
backward through the same graph (``retain_graph=True``): the first one scales
the gradients formed in forward in place.
"""

from __future__ import annotations

import torch

from celib import validate
from celib.errors import InputError

#: Bytes of float32 logits one chunk may hold when ``chunk_size`` is not given.
CHUNK_BYTES = 16 * 2**20


def chunk_rows(num_rows: int, num_classes: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit :data:`CHUNK_BYTES` of float32 logits.

    The rule: ``CHUNK_BYTES // (4 * V)`` rows (16 MiB of float32 logits), rounded down to a
    multiple of 8 (whole SIMD tiles for the matrix products), at least 1 and at most N: 128 rows
    for V = 32000, 32 for V = 128256. Peak extra memory is about two such chunks (the logits and a
    temporary of the same size) plus the gradients of the weight (float32) and of the input.
    On this project's 2-core CPU, chunks of 128 to 1024 rows at V = 32000 ran within 3 % of each
    other and 64 rows 10 % slower (``benchmarks/bench_linear_ce.py``).
    """
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise InputError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
        return int(chunk_size)
    rows = CHUNK_BYTES // (4 * max(num_classes, 1))
    rows = rows - rows % 8 if rows >= 8 else rows
    return max(1, min(max(num_rows, 1), rows))


def _check(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing):
    validate.check_floating("input", input)
    validate.check_floating("linear_weight", linear_weight)
    if input.dim() not in (2, 3):
        raise InputError(f"input must be (N, H) or (B, T, H) hidden states, got shape {tuple(input.shape)}.")
    if linear_weight.dim() != 2:
        raise InputError(f"linear_weight must be (V, H) (as nn.Linear(H, V).weight), got shape "
                         f"{tuple(linear_weight.shape)}.")
    vocab, hidden = linear_weight.shape
    if input.shape[-1] != hidden:
        transposed = " It looks transposed: pass linear_weight.T." if linear_weight.shape[0] == input.shape[-1] else ""
        raise InputError(f"input's hidden size {input.shape[-1]} does not match linear_weight of shape "
                         f"{tuple(linear_weight.shape)}, which expects H = {hidden}.{transposed}")
    if linear_weight.dtype != input.dtype:
        raise InputError(f"input is {input.dtype} but linear_weight is {linear_weight.dtype}; cast one of them "
                         f"(e.g. input.to(linear_weight.dtype)).")
    if linear_bias is not None:
        validate.check_floating("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (vocab,):
            raise InputError(f"linear_bias must have shape ({vocab},), one entry per row of linear_weight; got "
                             f"{tuple(linear_bias.shape)}.")
    if not isinstance(target, torch.Tensor) or not validate.is_index_target(target):
        raise InputError("target must be an integer tensor of class indices; for probability targets use "
                         "celib.cross_entropy(F.linear(input, linear_weight, linear_bias), target).")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise InputError(f"target shape {tuple(target.shape)} does not fit input shape {tuple(input.shape)}: "
                         f"expected {tuple(input.shape[:-1])}, one class index per row of hidden states.")
    for name, t in (("linear_weight", linear_weight), ("target", target), ("linear_bias", linear_bias)):
        if t is not None and t.device != input.device:
            raise InputError(f"{name} is on {t.device} but input is on {input.device}; move it with .to(input.device).")
    validate.check_class_weight(weight, vocab, input)
    validate.check_reduction(reduction)
    validate.check_label_smoothing(label_smoothing)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise InputError(f"ignore_index must be an int, got {ignore_index!r}.")


class _Chunk:
    """Loss and logit-gradient of one chunk of rows, computed with PyTorch operations in float32."""

    def __init__(self, weight, ignore_index, smoothing, z_loss, softcap):
        self.weight, self.ignore_index = weight, ignore_index
        self.smoothing, self.z_loss, self.softcap = smoothing, z_loss, softcap

    def logits(self, x, w, b, buffers, raw=False):
        """The chunk's logits, written into ``buffers`` (reused from chunk to chunk, so the loop holds
        one chunk of logits): in the accumulation dtype and soft-capped, or, with ``raw``, as the
        matmul gives them (for the Triton kernel, which soft-caps itself)."""
        n = len(x)
        mm_out = buffers["mm"][:n]
        torch.mm(x, w.t(), out=mm_out) if b is None else torch.addmm(b, x, w.t(), out=mm_out)
        if raw or "acc" not in buffers:
            z = mm_out
        else:  # half-precision inputs: the loss and its gradient in float32
            z = buffers["acc"][:n].copy_(mm_out)
        if not raw and self.softcap is not None:
            z = z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    @staticmethod
    def buffers(rows: int, w: torch.Tensor, acc: torch.dtype, raw: bool) -> dict[str, torch.Tensor]:
        """The chunk buffers: (rows, V) in w's dtype, and in ``acc`` when that differs (and not ``raw``)."""
        out = {"mm": torch.empty(rows, w.shape[0], dtype=w.dtype, device=w.device)}
        if not raw and acc != w.dtype:
            out["acc"] = torch.empty(rows, w.shape[0], dtype=acc, device=w.device)
        return out

    def loss_and_grad(self, z, t, scale, want_grad):
        """Per-row loss (n,) and lse (n,); z is overwritten: with d(loss * scale)/dz if ``want_grad``.

        ``scale`` is a per-row factor (n,): 1/den for the mean, 1 for the sum, the upstream
        gradient for "none"; it is 0 on ignored rows.
        """
        n, c = z.shape
        kept = (t != self.ignore_index).to(z.dtype)  # as a float: bool * float would give float32
        safe = torch.where(t != self.ignore_index, t, torch.zeros_like(t))
        a = self.smoothing
        w_t = kept if self.weight is None else self.weight[safe] * kept
        sum_w = float(c) if self.weight is None else self.weight.sum()
        capped = z.clone() if want_grad and self.softcap is not None else None
        # Shift by the row max in place (no temporary the size of z), then exponentiate in place.
        # Sums are taken of shifted logits, so no large |z| is subtracted from another.
        m = z.amax(1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf: exp gives 0, lse -inf
        z.sub_(m[:, None])
        z_t = z.gather(1, safe[:, None]).squeeze(1)  # z_t - m
        wz = (z.sum(1) if self.weight is None else torch.mv(z, self.weight)) if a else None
        e = z.exp_()  # z is overwritten from here on
        total = e.sum(1)
        log_total = total.log()
        lse = m + log_total
        loss = (1 - a) * w_t * (log_total - z_t)
        if a:
            loss = loss + (a / c) * (sum_w * log_total - wz) * kept
        if self.z_loss:
            loss = loss + self.z_loss * lse.square() * kept
        if not want_grad:
            return loss, lse
        coef = ((1 - a) * w_t + (a / c) * sum_w * kept + 2 * self.z_loss * lse * kept) * scale
        g = e.mul_((coef / total)[:, None])  # coef * p, in place
        if a:
            w = self.weight if self.weight is not None else torch.ones_like(z[0])
            g.addr_(kept * scale, w, alpha=-a / c)
        rows = torch.arange(n, device=z.device)
        g[rows, safe] -= (1 - a) * w_t * scale  # p - 1 at the target, formed in float32
        if capped is not None:
            g.mul_(1 - (capped / self.softcap).square())
        return loss, lse


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked linear + cross-entropy; gradients formed in forward (mean, sum) or recomputed (none)."""

    @staticmethod
    def forward(ctx, x, w, b, t, weight, ignore_index, reduction, smoothing, z_loss, softcap, rows, backend):
        n = x.shape[0]
        acc = _accumulation_dtype(x)
        chunk = _Chunk(None if weight is None else weight.to(acc), ignore_index, smoothing, z_loss, softcap)
        kept = t != ignore_index
        if reduction == "mean":
            w_t = kept.to(acc) if weight is None else weight.to(acc)[torch.where(kept, t, 0)] * kept
            den = w_t.sum()
            scale_all = torch.where(den > 0, 1 / den, torch.zeros_like(den))  # all ignored: nan loss, zero grad
        else:
            den = None
            scale_all = torch.ones((), dtype=acc, device=x.device)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grads_now = reduction != "none" and (need_x or need_w or need_b)
        gx = torch.empty_like(x) if grads_now and need_x else None
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if grads_now and need_w else None
        gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if grads_now and need_b else None
        losses = torch.empty(n, dtype=acc, device=x.device)
        buffers = _Chunk.buffers(min(rows, n), w, acc, raw=backend == "triton")
        for start in range(0, n, rows):
            xs, ts = x[start : start + rows], t[start : start + rows]
            z = chunk.logits(xs, w, b, buffers, raw=backend == "triton")
            loss, _ = _chunk_loss_and_grad(chunk, z, ts, scale_all, None, grads_now, backend)
            losses[start : start + rows] = loss
            if grads_now:
                _fold(z, xs, w, gx, gw, gb, start)
        ctx.save_for_backward(x, w, b, t, weight)
        ctx.grads = (gx, gw, gb) if grads_now else None
        ctx.scale_all = scale_all
        ctx.options = (ignore_index, reduction, smoothing, z_loss, softcap, rows, backend)
        if reduction == "none":
            out = losses
        elif reduction == "sum":
            out = losses.sum()
        else:
            out = losses.sum() / den
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, w, b, t, weight = ctx.saved_tensors
        ignore_index, reduction, smoothing, z_loss, softcap, rows, backend = ctx.options
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _accumulation_dtype(x)
        if reduction != "none" and ctx.grads is not None:
            # Formed in forward: scale by the upstream scalar in place (no host sync, no copy). A second
            # backward (retain_graph=True) finds them consumed and recomputes below.
            g = grad_out.to(acc)
            gx, gw, gb = (None if v is None else v.mul_(g).to(like.dtype) for v, like in zip(ctx.grads, (x, w, w)))
            ctx.grads = None
            return gx, gw, gb, None, None, None, None, None, None, None, None, None
        upstream = grad_out if reduction == "none" else (grad_out.to(acc) * ctx.scale_all).expand(x.shape[0])
        chunk = _Chunk(None if weight is None else weight.to(acc), ignore_index, smoothing, z_loss, softcap)
        gx = torch.empty_like(x) if need_x else None
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_b else None
        buffers = _Chunk.buffers(min(rows, x.shape[0]), w, acc, raw=backend == "triton")
        for start in range(0, x.shape[0], rows):
            xs, ts = x[start : start + rows], t[start : start + rows]
            z = chunk.logits(xs, w, b, buffers, raw=backend == "triton")  # recomputed: the upstream is known only now
            one = torch.ones((), dtype=acc, device=x.device)
            _chunk_loss_and_grad(chunk, z, ts, one, upstream[start : start + rows], True, backend)
            _fold(z, xs, w, gx, gw, gb, start)
        return (gx, None if gw is None else gw.to(w.dtype), None if gb is None else gb.to(w.dtype),
                None, None, None, None, None, None, None, None, None)


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half-precision inputs accumulate in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_loss_and_grad(chunk: _Chunk, z, ts, scale_all, upstream, want_grad, backend):
    """Loss and lse of a chunk's rows; with ``want_grad`` the gradient d(loss * scale)/dz replaces z.

    ``scale_all`` is a () tensor (1/den for the mean, else 1); ``upstream`` an optional (n,) factor
    per row (reduction="none"). Ignored rows get zero gradient.
    """
    if backend == "triton":
        from celib.kernels import launch

        n, c = z.shape
        rows = z.view(n, c, 1)
        # With a per-row upstream (reduction="none", known only in backward) the forward kernel writes no
        # gradient and the backward kernel forms it, upstream included: rounded once, any upstream layout.
        grad_now = want_grad and upstream is None
        out = launch.forward(rows, ts, chunk.weight, chunk.ignore_index, chunk.smoothing, chunk.z_loss,
                             chunk.softcap, scale_all, grad_now, grad_out=rows if grad_now else None)
        if want_grad and out.grad is None:  # streamed rows, or an upstream: re-read the logits, write over them
            up = torch.ones((), dtype=torch.float32, device=z.device) if upstream is None else upstream.float()
            launch.backward(rows, ts, chunk.weight, chunk.ignore_index, chunk.smoothing, chunk.softcap,
                            out.stats, scale_all, up, grad_out=rows)
        return out.loss, out.lse
    scale = scale_all.to(z.dtype) * (ts != chunk.ignore_index)
    if upstream is not None:
        scale = scale * upstream.to(z.dtype)
    return chunk.loss_and_grad(z, ts, scale, want_grad)


def _fold(g, xs, w, gx, gw, gb, start):
    """Fold one chunk's logit gradient g (n, V) into the gradients of input, weight and bias."""
    gh = g.to(w.dtype)
    if gx is not None:
        torch.mm(gh, w, out=gx[start : start + len(xs)])
    if gw is not None:
        if gh.dtype == gw.dtype:
            gw.addmm_(gh.t(), xs)
        else:  # half precision: the chunk's product in the input dtype, accumulated in float32
            gw += torch.mm(gh.t(), xs).float()
    if gb is not None:
        gb += g.sum(0).to(gb.dtype)


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
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    r"""Cross-entropy of a linear layer's output, without materialising the (N, V) logits.

    The value and gradients of
    ``celib.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``
    (that is, of :func:`torch.nn.functional.linear_cross_entropy`'s reference path), computed
    ``chunk_size`` rows at a time. Peak extra memory is one chunk of logits plus the weight's
    gradient, instead of the N x V logits and their gradient.

    Args:
        input: hidden states, (N, H) or (B, T, H), float16/bfloat16/float32/float64.
        linear_weight: (V, H), the weight of ``nn.Linear(H, V)``, same dtype as ``input``.
        target: class indices, int, of shape (N,) or (B, T); values in [0, V-1] or
            ``ignore_index``. (B, T, H) input is treated as B*T rows, as a language model's
            head: the loss is that of ``logits.reshape(-1, V)`` and ``target.reshape(-1)``.
        linear_bias: optional (V,).
        weight, reduction, ignore_index, label_smoothing, z_loss, softcap: as in
            :func:`celib.cross_entropy`. ``reduction="none"`` returns the loss per row, shape
            of ``target``; its backward recomputes the logits of each chunk.
        chunk_size: rows per chunk; default from a memory budget (see :func:`chunk_rows`).
        backend: ``"torch"`` (PyTorch operations per chunk), ``"triton"`` (celib's fused kernel
            per chunk, writing the gradient over the chunk's logits; CUDA, or Triton's
            interpreter on CPU), or ``"auto"``: the kernel on CUDA when triton is installed.
        check_inputs: check that every target is in range (reads the target; a device sync).

    Returns:
        The loss in ``input``'s dtype: a scalar, or per row for ``reduction="none"``.
        Gradients of half-precision ``linear_weight`` and ``linear_bias`` are accumulated over
        chunks in float32 and rounded once.

    Raises:
        InputError: shapes that do not fit (hidden size vs weight, vocabulary of weight vs
            bias, target shape), dtype or device mismatch, out-of-range targets.
    """
    from celib.functional import BACKENDS

    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r} is not supported; use one of {', '.join(map(repr, BACKENDS))}.")
    _check(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing)
    validate.check_extras(z_loss, softcap)
    vocab, hidden = linear_weight.shape
    t = target.reshape(-1)
    if check_inputs:
        validate.check_target_range(t, vocab, ignore_index)
    t = t.long()
    use_kernel = backend == "triton"
    if backend == "auto" and input.is_cuda:
        from celib import kernels

        use_kernel = kernels.available() and input.dtype in kernels.DTYPES
    if use_kernel:
        from celib import kernels

        kernels._require_triton()
        if input.dtype not in kernels.DTYPES:
            raise InputError(f"the Triton kernel takes float16, bfloat16 or float32, got {input.dtype}; "
                             f"use backend='torch'.")
    x = input.reshape(-1, hidden)
    rows = chunk_rows(x.shape[0], vocab, chunk_size)
    loss = LinearCrossEntropyFunction.apply(
        x, linear_weight, linear_bias, t, weight, ignore_index, reduction, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), rows, "triton" if use_kernel else "torch",
    )
    return loss.reshape(target.shape) if reduction == "none" else loss
