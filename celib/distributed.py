"""Cross-entropy over a vocabulary sharded across processes (Megatron-LM's vocabulary-parallel loss).

When the output layer is split by vocabulary rows over P ranks, each rank holds
the logits of its contiguous shard of classes, (N, V_r), and no rank has a
whole row. The loss still needs only three numbers per row from the whole
vocabulary: the row's maximum, the sum of exponentials below it, and the
target's logit (owned by exactly one rank); label smoothing adds the sum of the
row's logits. So the ranks exchange O(N) numbers, never the logits:

1. all-gather the shard sizes (P integers), to know which classes each rank owns;
2. all-reduce (max) the local row maxima: m (N,);
3. all-reduce (sum) one packed (3, N) tensor: sum of exp(z - m), the target
   logit (0 on ranks that do not own the target) and the sum of the logits.

Per rank and call that is 4 N + P numbers (2 all-reduces and 1 all-gather),
whatever V is. The backward pass is local: the gradient of a shard is
``coef * softmax - target mass`` restricted to the shard, from the saved lse.

:func:`vocab_parallel_linear_cross_entropy` goes one step earlier, to the sharded output layer
itself: each rank multiplies the hidden states by its rows of the weight a chunk of rows at a time,
so no rank ever holds its (N, V_r) logits, with the same two all-reduces per chunk, and the backward
all-reduces the input's gradient (N x H numbers).

It uses ``torch.distributed`` as it is: NCCL on GPUs, gloo on CPUs (tested on gloo only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from celib import _chunks, _reduction, validate
from celib._chunk_size import chunk_rows
from celib._options import LossOptions
from celib.errors import InputError, refuse_double_backward

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]


def _shard_offsets(local_classes: int, device: torch.device, group) -> tuple[int, int, int]:
    """(first class of this rank's shard, total number of classes, largest shard), from one all-gather of
    the sizes."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local_classes], dtype=torch.int64, device=device), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes), max(sizes)


def _check_and_locate(target, rows_of, name, local_classes, group, ignore_index, reduction, label_smoothing,
                      z_loss) -> tuple[LossOptions, int, int, int]:
    """Check the target and options alike on every rank; the options, the offset of this shard, the
    total number of classes and the largest shard's."""
    if not isinstance(target, torch.Tensor) or not validate.is_index_target(target) or target.dim() != 1:
        raise InputError("target must be a 1-D integer tensor of global class indices.")
    if target.shape[0] != rows_of.shape[0]:
        raise InputError(f"target has {target.shape[0]} rows but {name} has {rows_of.shape[0]}.")
    if target.device != rows_of.device:
        raise InputError(f"target is on {target.device} but {name} is on {rows_of.device}; move it with "
                         f"target.to({name}.device).")
    options = validate.loss_options(None, ignore_index, reduction, label_smoothing, z_loss)
    offset, num_classes, largest = _shard_offsets(local_classes, rows_of.device, group)
    validate.check_target_range(target, num_classes, ignore_index)
    return options, offset, num_classes, largest


def _whole_row_stats(z, owned, local_t, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, target logit, sum of the logits) per row of the whole vocabulary, from this rank's shard z
    (n, V_r): two all-reduces, of n numbers (the maxima) and of 3 n (the rest)."""
    n, local = z.shape
    m = z.amax(1) if local else torch.full((n,), -torch.inf, dtype=z.dtype, device=z.device)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    z_t = z.gather(1, local_t[:, None]).squeeze(1) if local else torch.zeros_like(m)
    packed = torch.stack([
        torch.exp(z - m[:, None]).sum(1),  # sum of exp(z - m) over the shard
        torch.where(owned, z_t, torch.zeros_like(z_t)),  # the target's logit, on the rank that owns it
        z.sum(1),  # sum of the logits, for label smoothing
    ])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    total, z_t, z_sum = packed
    return m + total.log(), z_t, z_sum


class _ShardRowLoss:
    """The row loss (see :mod:`celib._chunks`) of this rank's shard of the vocabulary.

    In forward (``lse`` to be filled) the row statistics come from :func:`_whole_row_stats`'s two
    all-reduces per chunk, and each row's lse is stored in ``lse``; in backward (``lse_known``) the
    saved lse is read and nothing is communicated. The gradient is local either way.
    """

    raw = False

    def __init__(self, options: LossOptions, target, offset: int, num_classes: int, group, lse: torch.Tensor,
                 lse_known: bool = False) -> None:
        self.options, self.target, self.offset, self.num_classes = options, target, offset, num_classes
        self.group, self.lse, self.lse_known = group, lse, lse_known

    def loss_and_grad(self, z, rows, scale, upstream, want_grad):
        """Per-row loss (None with ``lse_known``) of the shard's logits z (n, V_r) of ``rows``; with
        ``want_grad`` z is overwritten by d(loss * scale * upstream)/dz on the shard."""
        o, t = self.options, self.target[rows]
        a = o.label_smoothing
        kept = (t != o.ignore_index).to(z.dtype)
        owned = (t != o.ignore_index) & (t >= self.offset) & (t < self.offset + z.shape[1])
        local_t = torch.where(owned, t - self.offset, torch.zeros_like(t))
        loss = None
        if self.lse_known:
            lse = self.lse[rows]
        else:
            lse, z_t, z_sum = _whole_row_stats(z, owned, local_t, self.group)
            self.lse[rows] = lse
            loss = (1 - a) * (lse - z_t) + o.z_loss * lse.square()
            if a:  # only then: with a -inf logit z_sum is -inf, and 0 * inf would make the loss nan
                loss = loss + a * (lse - z_sum / self.num_classes)
            loss = torch.where(kept != 0, loss, torch.zeros_like(loss))
        if want_grad:
            s = scale.to(z.dtype) * kept
            if upstream is not None:
                s = s * upstream.to(z.dtype)
            e = z.sub_(lse[:, None]).exp_()  # the softmax over the whole vocabulary, on the shard
            g = _chunks.softmax_grad_(e, torch.ones_like(lse), lse, kept, kept, s, o, self.num_classes,
                                      float(self.num_classes))
            if z.shape[1]:  # a rank may hold no class at all
                g[torch.arange(len(t), device=z.device), local_t] -= torch.where(owned, (1 - a) * s,
                                                                                 torch.zeros_like(s))
        return loss


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, target, options: LossOptions, offset, num_classes, group):
        z = local_logits.to(_reduction.accumulator(local_logits.dtype))
        lse = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
        one = torch.ones((), dtype=z.dtype, device=z.device)
        loss = _ShardRowLoss(options, target, offset, num_classes, group, lse).loss_and_grad(
            z, slice(None), one, None, False)
        den, scale = _reduction.mean_scale(target, options, z.dtype)
        ctx.save_for_backward(local_logits, target, lse, scale)
        ctx.options, ctx.offset, ctx.num_classes = options, offset, num_classes
        return _reduction.reduce(loss, options.reduction, den).to(local_logits.dtype)  # all ignored: nan

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("celib.vocab_parallel_cross_entropy", "Gather the logits and use "
                               "celib.cross_entropy(..., backend='torch') where you need create_graph=True.")
        local_logits, target, lse, scale = ctx.saved_tensors
        z = local_logits.to(lse.dtype, copy=True)  # overwritten by the gradient
        shard = _ShardRowLoss(ctx.options, target, ctx.offset, ctx.num_classes, None, lse, lse_known=True)
        shard.loss_and_grad(z, slice(None), scale, grad_out.to(lse.dtype).expand(lse.shape), True)
        return z.to(local_logits.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of logits whose vocabulary is split across the ranks of ``group``.

    Rank r holds the logits of a contiguous block of classes, ranks in order (rank 0 the first
    classes); shards may be of different sizes. The result, and the gradient of this rank's
    shard, equal those of ``F.cross_entropy`` on the full (N, V) logits, with label smoothing over
    the full vocabulary and celib's z-loss (``z_loss * lse**2`` per kept row).

    Communication per rank and call: one all-gather of P shard sizes and two all-reduces of N and
    3 N numbers (see the module docstring), never the logits. Backward is local.

    Args:
        local_logits: (N, V_r) logits of this rank's shard, float (computed in float32 or float64).
        target: (N,) global class indices in [0, V), or ``ignore_index``; the same on every rank.
        group: the process group (default: the world).
        ignore_index: as in :func:`celib.cross_entropy`.
        reduction: as in :func:`celib.cross_entropy`.
        label_smoothing: as in :func:`celib.cross_entropy`.
        z_loss: as in :func:`celib.cross_entropy`.

    Raises:
        InputError: a target outside [0, V) for the total V of all shards, or bad options, on every
            rank alike (each sees the same gathered sizes and targets, so none is left waiting in a
            collective); a malformed shard on the rank that holds it, before the collectives, so
            check the shards' shapes alike on every rank.
    """
    validate.check_floating("local_logits", local_logits)
    if local_logits.dim() != 2:
        raise InputError(f"local_logits must be (N, V_r), got shape {tuple(local_logits.shape)}.")
    options, offset, num_classes, _ = _check_and_locate(target, local_logits, "local_logits", local_logits.shape[1],
                                                        group, ignore_index, reduction, label_smoothing, z_loss)
    return _VocabParallelCrossEntropy.apply(local_logits, target.long(), options, offset, num_classes, group)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """The output layer and the loss, the layer's weight split by vocabulary rows, eagerly:
    :func:`celib._chunks.eager_forward` and ``eager_backward`` with the shard's row loss, and the
    input's gradient summed over the ranks."""

    @staticmethod
    def forward(ctx, x, w, b, target, options: LossOptions, offset, num_classes, rows, group, grad_enabled):
        acc = _reduction.accumulator(x.dtype)
        den, scale = _reduction.mean_scale(target, options, acc)
        lse = torch.empty(x.shape[0], dtype=acc, device=x.device)
        shard = _ShardRowLoss(options, target, offset, num_classes, group, lse)
        # dX in acc: it is all-reduced in backward
        losses = _chunks.eager_forward(ctx, x, w, b, shard, rows, scale, grad_enabled, input_dtype=acc)
        ctx.save_for_backward(x, w, b, target, lse, scale)
        ctx.options, ctx.offset, ctx.num_classes, ctx.rows, ctx.group = options, offset, num_classes, rows, group
        return _reduction.reduce(losses, options.reduction, den).to(x.dtype)  # all ignored: nan mean

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("celib.vocab_parallel_linear_cross_entropy", "Compute the logits and the "
                               "loss unfused where you need create_graph=True.")
        x, w, b, target, lse, scale = ctx.saved_tensors
        shard = _ShardRowLoss(ctx.options, target, ctx.offset, ctx.num_classes, None, lse, lse_known=True)
        gx, gw, gb = _chunks.eager_backward(ctx, grad_out, x, w, b, shard, ctx.rows, scale, input_dtype=lse.dtype)
        if gx is not None:  # every rank holds a part of dX = sum over shards of G_r W_r: N x H numbers
            dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=ctx.group)
            gx = gx.to(x.dtype)
        return gx, gw, gb, None, None, None, None, None, None, None


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    weight_shard: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    bias_shard: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The output layer and cross-entropy, the layer's weight split by vocabulary rows over ``group``.

    Rank r holds rows of the (V, H) output weight for a contiguous block of classes, ranks in order
    (shards may differ in size), and the same hidden states ``input`` on every rank (a Megatron-style
    column-parallel output layer). The loss equals ``celib.linear_cross_entropy(input, W, target,
    linear_bias=b, ...)`` on the whole W and b; the gradient of ``weight_shard`` (and ``bias_shard``)
    is this rank's rows of the whole gradient, and the gradient of ``input`` is the whole one. No
    rank holds more than one chunk of its shard's logits, (rows, V_r), at a time.

    Communication per rank and call: an all-gather of P shard sizes; per chunk of n rows, two
    all-reduces of n and 3 n numbers (the row maxima; the sums of exponentials, target logits and
    sums of logits); in backward one all-reduce of N x H numbers, the input's gradient
    (``dX = sum_r G_r W_r``), as the backward of any column-parallel linear layer makes. The logits
    never move.

    Args:
        input: (N, H) hidden states, the same on every rank, float.
        weight_shard: (V_r, H), this rank's rows of the output weight, input's dtype.
        target: (N,) global class indices in [0, V) or ``ignore_index``, the same on every rank.
        group: the process group (default: the world).
        bias_shard: optional (V_r,).
        ignore_index: as in :func:`celib.cross_entropy`.
        reduction: as in :func:`celib.cross_entropy`.
        label_smoothing: as in :func:`celib.cross_entropy`.
        z_loss: as in :func:`celib.cross_entropy`.
        chunk_size: rows per chunk, the same on every rank (default: :func:`celib.linear.chunk_rows`
            for the largest shard, so that every rank makes the same collectives).

    Raises:
        InputError: a target outside [0, V) or bad options on every rank alike (each checks the same
            gathered sizes and targets); a shard or input that does not fit on the rank that holds it,
            before the collectives.
    """
    validate.check_output_layer(input, weight_shard, bias_shard, names=("weight_shard", "bias_shard"),
                                sequences=False)
    options, offset, num_classes, largest = _check_and_locate(target, input, "input", weight_shard.shape[0], group,
                                                              ignore_index, reduction, label_smoothing, z_loss)
    # The same rows on every rank, from the largest shard: each chunk is a collective, so ranks whose
    # shard sizes would give different chunks would call mismatched all-reduces.
    rows = chunk_rows(input.shape[0], largest, chunk_size, dtype=input.dtype, device=input.device,
                      hidden=input.shape[1])
    return _VocabParallelLinearCrossEntropy.apply(input, weight_shard, bias_shard, target.long(), options, offset,
                                                  num_classes, rows, group, torch.is_grad_enabled())
