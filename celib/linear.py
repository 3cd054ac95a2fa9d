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

import contextlib

import torch

from celib import _backend, _reduction, validate
from celib.errors import InputError

__all__ = ["CHUNK_MEMORY", "chunk_rows", "linear_cross_entropy"]

#: The GPU the CUDA rule is derived for, an H100 SXM: dense tensor-core throughput (FLOP/s) per input
#: dtype, and HBM3 bandwidth (bytes/s). Their ratio is the machine balance, in FLOP per byte.
GPU_FLOPS = {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 495e12, torch.float64: 67e12}
GPU_BYTES_PER_S = 3.35e12
#: The default cap, in bytes, on one chunk's logits and their float32 working copy, per device type.
CHUNK_MEMORY = {"cuda": 2 * 2**30, "cpu": 256 * 2**20}
#: Rows per chunk on a CPU: a quarter of the batch, at least CPU_MIN_ROWS and at most CPU_ROWS (see
#: :func:`celib.linear.chunk_rows`).
CPU_ROWS, CPU_MIN_ROWS = 512, 128


def _chunk_bytes_per_row(num_classes: int, dtype: torch.dtype) -> int:
    """Bytes one row of a chunk takes: its logits in the input's dtype, plus a float32 copy for half inputs."""
    size = torch.finfo(dtype).bits // 8
    return num_classes * (size + (4 if size < 4 else 0))


def _roofline_rows(dtype: torch.dtype) -> int:
    """The fewest rows per chunk for which every matrix product of a chunk is compute-bound on the GPU.

    A chunk of n rows makes three products with the (V, H) weight: the logits (n V H multiply-adds,
    reading W: b V H bytes), the input's gradient (the same) and the weight's gradient, accumulated in
    float32 over the chunks: 2 n V H FLOP against reading and writing the (V, H) float32 accumulator,
    8 V H bytes. That last one is the binding one: it is compute-bound when 2 n V H / F >= 8 V H / B,
    that is n >= 4 F / B, four times the machine balance F / B (H100, bf16: 4 x 295 = 1181 rows).
    Rounded up to a multiple of 128 (whole tensor-core tiles): 1280 rows for bf16 and fp16, 640 for
    float32 (TF32), 128 for float64.
    """
    balance = GPU_FLOPS.get(dtype, GPU_FLOPS[torch.float32]) / GPU_BYTES_PER_S
    rows = int(-(-4 * balance // 1))
    return -(-rows // 128) * 128


def chunk_rows(num_rows: int, num_classes: int, chunk_size: int | None = None, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               memory: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else the rule for the device, capped by a memory budget.

    - CUDA: ``_roofline_rows`` (every product of a chunk compute-bound on an H100: 1280 rows in
      bf16), so chunking costs no more time than the unfused products.
    - CPU: a quarter of the batch, at least 128 and at most 512 rows (``CPU_ROWS``). A CPU's
      matrix products are compute-bound at any of these sizes; what costs is the per-chunk work that
      does not scale with the rows, so chunks should be large, and a quarter of the batch keeps
      chunking worth its name for small batches (at most a quarter of the logits in memory).
      ``benchmarks/bench_linear_ce.py`` measures the time against the unfused
      ``F.cross_entropy(x @ W.T)`` at several chunk sizes (the README shows a run).

    Either is capped so that a chunk's logits take at most ``memory`` bytes (default
    :data:`celib.linear.CHUNK_MEMORY` for the device: 2 GiB on CUDA, 256 MiB on CPU; see
    ``_chunk_bytes_per_row``), and is at least 1 and at most N.
    Peak extra memory is then about one chunk, plus the float32 gradient of the weight and the
    gradient of the input.
    """
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise InputError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
        return int(chunk_size)
    kind = torch.device(device).type
    if kind == "cuda":
        rows = _roofline_rows(dtype)
    else:  # a quarter of the batch, between 128 and CPU_ROWS rows
        rows = min(CPU_ROWS, max(CPU_MIN_ROWS, -(-num_rows // 4)))
    budget = CHUNK_MEMORY.get(kind, CHUNK_MEMORY["cpu"]) if memory is None else int(memory)
    if budget < 1:
        raise InputError(f"the chunk memory budget must be a positive number of bytes, got {memory}.")
    rows = min(rows, budget // _chunk_bytes_per_row(max(num_classes, 1), dtype))
    return max(1, min(max(num_rows, 1), rows))


def _check(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing):
    validate.check_floating("input", input)
    if isinstance(linear_weight, torch.nn.Module):
        raise InputError(f"linear_weight must be the output layer's weight tensor, got a "
                         f"{type(linear_weight).__name__} module; pass its .weight (and .bias as linear_bias).")
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
        w_t = _reduction.kept_weight(t, self.weight, self.ignore_index, z.dtype)
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


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked linear + cross-entropy; gradients formed in forward (mean, sum) or recomputed (none)."""

    @staticmethod
    def forward(ctx, x, w, b, t, weight, ignore_index, reduction, smoothing, z_loss, softcap, rows, backend,
                out_dtype):
        n = x.shape[0]
        acc = _accumulation_dtype(x)
        chunk = _Chunk(None if weight is None else weight.to(acc), ignore_index, smoothing, z_loss, softcap)
        if reduction == "mean":
            den = _reduction.kept_weight(t, weight, ignore_index, acc).sum()
            scale_all = _reduction.grad_scale(den)  # all ignored: nan loss, zero gradient
        else:
            den = None
            scale_all = torch.ones((), dtype=acc, device=x.device)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grads_now = reduction != "none" and (need_x or need_w or need_b)
        gx = torch.empty_like(x) if grads_now and need_x else None
        gw = _WeightGrad(w, acc) if grads_now and need_w else None
        gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if grads_now and need_b else None
        losses = torch.empty(n, dtype=acc, device=x.device)
        buffers = _Chunk.buffers(min(rows, n), w, acc, raw=backend == "triton")
        for start in range(0, n, rows):
            xs, ts = x[start : start + rows], t[start : start + rows]
            z = chunk.logits(xs, w, b, buffers, raw=backend == "triton")
            loss, _ = _chunk_loss_and_grad(chunk, z, ts, scale_all, None, grads_now, backend)
            losses[start : start + rows] = loss
            if grads_now:
                _accumulate_param_grads(z, xs, w, gx, gw, gb, slice(start, start + len(xs)))
        ctx.save_for_backward(x, w, b, t, weight)
        ctx.grads = (gx, gw, gb) if grads_now else None
        ctx.scale_all = scale_all
        ctx.options = (ignore_index, reduction, smoothing, z_loss, softcap, rows, backend)
        return _reduction.reduce(losses, reduction, den).to(out_dtype or x.dtype)

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
            gx, gw, gb = ctx.grads
            gx = None if gx is None else gx.mul_(g.to(gx.dtype))
            gw = None if gw is None else gw.result(g)  # frees the float32 blocks as it converts them
            gb = None if gb is None else gb.mul_(g).to(w.dtype)
            ctx.grads = None
            return gx, gw, gb, None, None, None, None, None, None, None, None, None, None
        upstream = grad_out if reduction == "none" else (grad_out.to(acc) * ctx.scale_all).expand(x.shape[0])
        gx, gw, gb = _recompute(x, w, b, t, weight, ctx.options, upstream, need_x, need_w, need_b)
        return gx, gw, gb, None, None, None, None, None, None, None, None, None, None


def _recompute(x, w, b, t, weight, options, upstream, need_x, need_w, need_b):
    """(dX, dW, dB) of sum(loss_rows * upstream), recomputing each chunk's logits (the upstream per row
    is known only in backward): four matrix products instead of three."""
    ignore_index, _, smoothing, z_loss, softcap, rows, backend = options
    acc = _accumulation_dtype(x)
    chunk = _Chunk(None if weight is None else weight.to(acc), ignore_index, smoothing, z_loss, softcap)
    gx = torch.empty_like(x) if need_x else None
    gw = _WeightGrad(w, acc) if need_w else None
    gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_b else None
    buffers = _Chunk.buffers(min(rows, x.shape[0]), w, acc, raw=backend == "triton")
    one = torch.ones((), dtype=acc, device=x.device)
    for start in range(0, x.shape[0], rows):
        xs, ts = x[start : start + rows], t[start : start + rows]
        z = chunk.logits(xs, w, b, buffers, raw=backend == "triton")
        _chunk_loss_and_grad(chunk, z, ts, one, upstream[start : start + rows], True, backend)
        _accumulate_param_grads(z, xs, w, gx, gw, gb, slice(start, start + len(xs)))
    return gx, None if gw is None else gw.result(), None if gb is None else gb.to(w.dtype)


def _losses(x, w, b, t, weight, options) -> torch.Tensor:
    """Per-row losses (N,) in the accumulation dtype, chunk by chunk, without gradients."""
    ignore_index, _, smoothing, z_loss, softcap, rows, backend = options
    acc = _accumulation_dtype(x)
    chunk = _Chunk(None if weight is None else weight.to(acc), ignore_index, smoothing, z_loss, softcap)
    losses = torch.empty(x.shape[0], dtype=acc, device=x.device)
    buffers = _Chunk.buffers(min(rows, x.shape[0]), w, acc, raw=backend == "triton")
    one = torch.ones((), dtype=acc, device=x.device)
    for start in range(0, x.shape[0], rows):
        xs, ts = x[start : start + rows], t[start : start + rows]
        z = chunk.logits(xs, w, b, buffers, raw=backend == "triton")
        losses[start : start + rows] = _chunk_loss_and_grad(chunk, z, ts, one, None, False, backend)[0]
    return losses


# ------------------------------------------------------------------------------------------- torch.compile
# Under torch.compile the chunk loop is one opaque operator for the forward and one for the backward,
# so the compiler neither unrolls the loop (compile time independent of the number of chunks) nor
# materialises the logits (memory as in eager). The forward op returns the per-row losses; the
# reduction is ordinary PyTorch arithmetic around it; the backward op recomputes each chunk with the
# per-row upstream gradient (four products instead of three, the price of a functional op).


@torch.library.custom_op("celib::linear_cross_entropy_rows", mutates_args=())
def _rows_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor,
             weight: torch.Tensor | None, ignore_index: int, smoothing: float, z_loss: float,
             softcap: float | None, rows: int, backend: str) -> torch.Tensor:
    """Per-row losses (N,) of cross_entropy(x @ w.T + b, t), float32 (float64 for float64 input)."""
    with torch.no_grad():
        return _losses(x, w, b, t, weight, (ignore_index, "none", smoothing, z_loss, softcap, rows, backend))


@_rows_op.register_fake
def _(x, w, b, t, weight, ignore_index, smoothing, z_loss, softcap, rows, backend):
    return x.new_empty(x.shape[0], dtype=_accumulation_dtype(x))


@torch.library.custom_op("celib::linear_cross_entropy_rows_backward", mutates_args=())
def _rows_backward_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor,
                      weight: torch.Tensor | None, ignore_index: int, smoothing: float, z_loss: float,
                      softcap: float | None, rows: int, backend: str, upstream: torch.Tensor, need_x: bool,
                      need_w: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dW, dB) of sum(losses * upstream); a 0-element tensor for a gradient not asked for."""
    options = (ignore_index, "none", smoothing, z_loss, softcap, rows, backend)
    with torch.no_grad():
        gx, gw, gb = _recompute(x, w, b, t, weight, options, upstream, need_x, need_w, need_b and b is not None)
    empty = x.new_empty(0)
    return (empty if gx is None else gx, empty if gw is None else gw, empty if gb is None else gb)


@_rows_backward_op.register_fake
def _(x, w, b, t, weight, ignore_index, smoothing, z_loss, softcap, rows, backend, upstream, need_x, need_w,
      need_b):
    empty = x.new_empty(0)
    return (torch.empty_like(x) if need_x else empty, torch.empty_like(w) if need_w else empty,
            torch.empty_like(b) if need_b and b is not None else empty)


def _rows_setup(ctx, inputs, output):
    x, w, b, t, weight, *options = inputs
    ctx.save_for_backward(x, w, b, t, weight)
    ctx.options = tuple(options)
    ctx.need = tuple(ctx.needs_input_grad[:3])


def _rows_backward(ctx, upstream):
    x, w, b, t, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.need
    gx, gw, gb = _rows_backward_op(x, w, b, t, weight, *ctx.options, upstream, need_x, need_w, need_b)
    return (gx if need_x else None, gw if need_w else None, gb if need_b and b is not None else None,
            None, None, None, None, None, None, None, None)


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


def _compiled(x, w, b, t, weight, ignore_index, reduction, smoothing, z_loss, softcap, rows, backend, out_dtype):
    """The loss under torch.compile: the per-row op, then the reduction in PyTorch operations."""
    losses = _rows_op(x, w, b, t, weight, ignore_index, smoothing, z_loss, softcap, rows, backend)
    den = _reduction.kept_weight(t, weight, ignore_index, losses.dtype).sum() if reduction == "mean" else None
    return _reduction.reduce(losses, reduction, den).to(out_dtype or x.dtype)


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


_OUT_DTYPE_ADDMM: dict[str, bool] = {}  # device type -> torch.addmm(..., out_dtype=float32) works there


def _accumulate_half(gw: torch.Tensor, g: torch.Tensor, gh: torch.Tensor, xs: torch.Tensor) -> None:
    """gw (V, H) float32 += g.T @ xs for half-precision chunks, with no (V, H) temporary.

    Where PyTorch has the mixed-precision product (CUDA: ``addmm`` with ``out_dtype``), the half
    operands ``gh`` and ``xs`` are multiplied on the tensor cores and added into ``gw`` in float32.
    Elsewhere the float32 gradient ``g`` and a float32 copy of ``xs`` (chunk-sized, not (V, H))
    are multiplied in float32, in place.
    """
    kind = gw.device.type
    if _OUT_DTYPE_ADDMM.get(kind, kind == "cuda"):
        try:
            torch.addmm(gw, gh.t(), xs, out_dtype=torch.float32, out=gw)
            _OUT_DTYPE_ADDMM[kind] = True
            return
        except (RuntimeError, NotImplementedError, TypeError):
            _OUT_DTYPE_ADDMM[kind] = False
    gw.addmm_(g.t() if g.dtype == gw.dtype else g.t().float(), xs.float())


class _WeightGrad:
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
        """+= gh.T @ xs, block by block (g: the chunk's gradient in float32, gh: in the weight's dtype)."""
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
            torch.mul(block, scale.to(block.dtype), out=part) if scale is not None else part.copy_(block)
            parts.append(part)
            del block  # its float32 memory is free before the next block is converted
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _accumulate_param_grads(g, xs, w, gx, gw, gb, rows: slice) -> None:
    """Fold one chunk's logit gradient g (n, V) into the gradients of the input (its ``rows``), the weight
    (a :class:`_WeightGrad`) and the bias, accumulating in place: no (V, H) temporary in any dtype."""
    gh = g.to(w.dtype)
    if gx is not None:
        if gx.dtype == gh.dtype:
            torch.mm(gh, w, out=gx[rows])
        else:  # a float32 accumulator (the vocabulary-parallel input gradient, all-reduced later)
            gx[rows] = torch.mm(gh, w).to(gx.dtype)
    if gw is not None:
        gw.add(g, gh, xs)
    if gb is not None:
        gb += g.sum(0).to(gb.dtype)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``. Under torch.compile the availability check is skipped
    (the traced devices have autocast): torch 2.9's Dynamo has no rule for the C function
    ``torch.amp.is_autocast_available`` calls (2.13 has), and would stop a ``fullgraph=True`` compile."""
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


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
            (see :func:`celib.linear.chunk_rows`: 1280 rows for bf16 on CUDA, 512 on a CPU).
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
    if backend not in _backend.BACKENDS:
        raise InputError(f"backend={backend!r} is not supported; use one of {', '.join(map(repr, _backend.BACKENDS))}.")
    device_type = input.device.type if isinstance(input, torch.Tensor) else "cpu"
    autocast = _autocast_on(device_type)
    if autocast:  # as F.linear under autocast: the products in the autocast dtype (casts are differentiable)
        dt = torch.get_autocast_dtype(device_type)
        input, linear_weight, linear_bias = (
            v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64 else v
            for v in (input, linear_weight, linear_bias))
        loss_dtype = loss_dtype or torch.float32  # autocast runs cross_entropy in float32
    _check(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing)
    validate.check_extras(z_loss, softcap)
    vocab, hidden = linear_weight.shape
    t = target.reshape(-1)
    if check_inputs:
        validate.check_target_range(t, vocab, ignore_index)
    t = t.long()
    use_kernel = _backend.use_kernel(backend, input)
    x, w, b = input.reshape(-1, hidden), linear_weight, linear_bias
    rows = chunk_rows(x.shape[0], vocab, chunk_size, dtype=x.dtype, device=x.device, memory=chunk_memory)
    args = (x, w, b, t, weight, ignore_index, reduction, float(label_smoothing), float(z_loss),
            None if softcap is None else float(softcap), rows, "triton" if use_kernel else "torch", loss_dtype)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if torch.compiler.is_compiling():
            loss = _compiled(*args)
        else:
            loss = _LinearCrossEntropyFunction.apply(*args)
    return loss.reshape(target.shape) if reduction == "none" else loss
