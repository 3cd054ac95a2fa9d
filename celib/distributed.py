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

from celib import _reduction, validate
from celib.errors import InputError
from celib.linear import _accumulate_param_grads, _accumulation_dtype, _WeightGrad, chunk_rows

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]


def _shard_offsets(local_classes: int, device: torch.device, group) -> tuple[int, int]:
    """(first class of this rank's shard, total number of classes), from one all-gather of the sizes."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local_classes], dtype=torch.int64, device=device), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def _check_and_locate(target, rows_of, name, local_classes, group, ignore_index, reduction, label_smoothing,
                      z_loss) -> tuple[int, int]:
    """Check the target and options alike on every rank, then (offset of this shard, total classes)."""
    if not isinstance(target, torch.Tensor) or not validate.is_index_target(target) or target.dim() != 1:
        raise InputError("target must be a 1-D integer tensor of global class indices.")
    if target.shape[0] != rows_of.shape[0]:
        raise InputError(f"target has {target.shape[0]} rows but {name} has {rows_of.shape[0]}.")
    validate.check_reduction(reduction)
    validate.check_label_smoothing(label_smoothing)
    validate.check_extras(z_loss, None)
    offset, num_classes = _shard_offsets(local_classes, rows_of.device, group)
    validate.check_target_range(target, num_classes, ignore_index)
    return offset, num_classes


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, target, offset, num_classes, ignore_index, reduction, smoothing, z_loss, group):
        z = local_logits if local_logits.dtype == torch.float64 else local_logits.float()
        n, local = z.shape
        kept = target != ignore_index
        owned = kept & (target >= offset) & (target < offset + local)
        local_t = torch.where(owned, target - offset, torch.zeros_like(target))

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
        lse = m + total.log()
        loss = (1 - smoothing) * (lse - z_t) + smoothing * (lse - z_sum / num_classes) + z_loss * lse.square()
        loss = torch.where(kept, loss, torch.zeros_like(loss))
        den = _reduction.kept_weight(target, None, ignore_index, z.dtype).sum()
        ctx.save_for_backward(local_logits, lse, local_t, owned, kept, den)
        ctx.options = (reduction, smoothing, z_loss, num_classes)
        return _reduction.reduce(loss, reduction, den).to(local_logits.dtype)  # all ignored: nan, as PyTorch

    @staticmethod
    def backward(ctx, grad_out):
        local_logits, lse, local_t, owned, kept, den = ctx.saved_tensors
        reduction, smoothing, z_loss, num_classes = ctx.options
        scale = grad_out.to(lse.dtype).expand(lse.shape)
        if reduction == "mean":
            scale = scale * _reduction.grad_scale(den)
        scale = scale * kept
        coef = 1.0 + 2 * z_loss * lse  # the target mass sums to 1 over the whole vocabulary
        p = torch.exp(local_logits.to(lse.dtype) - lse[:, None])
        grad = (coef[:, None] * p - smoothing / num_classes) * scale[:, None]
        if grad.shape[1]:  # a rank may hold no classes
            rows = torch.arange(len(lse), device=lse.device)
            grad[rows, local_t] -= torch.where(owned, (1 - smoothing) * scale, torch.zeros_like(scale))
        return grad.to(local_logits.dtype), None, None, None, None, None, None, None, None


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
        InputError: on every rank alike (each sees the same gathered sizes and targets, so none is
            left waiting in a collective): a target outside [0, V) for the total V of all shards,
            bad shapes or options.
    """
    validate.check_floating("local_logits", local_logits)
    if local_logits.dim() != 2:
        raise InputError(f"local_logits must be (N, V_r), got shape {tuple(local_logits.shape)}.")
    offset, num_classes = _check_and_locate(target, local_logits, "local_logits", local_logits.shape[1], group,
                                            ignore_index, reduction, label_smoothing, z_loss)
    return _VocabParallelCrossEntropy.apply(local_logits, target.long(), offset, num_classes, ignore_index, reduction,
                                            float(label_smoothing), float(z_loss), group)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """The output layer and the loss, the layer's weight split by vocabulary rows; chunked over rows."""

    @staticmethod
    def forward(ctx, x, w, b, target, offset, num_classes, ignore_index, reduction, smoothing, z_loss, rows, group):
        acc = _accumulation_dtype(x)
        n, local = x.shape[0], w.shape[0]
        kept = target != ignore_index
        owned = kept & (target >= offset) & (target < offset + local)
        local_t = torch.where(owned, target - offset, torch.zeros_like(target))
        den = _reduction.kept_weight(target, None, ignore_index, acc).sum()
        lse = torch.empty(n, dtype=acc, device=x.device)
        losses = torch.empty(n, dtype=acc, device=x.device)
        need = ctx.needs_input_grad[:3]
        now = reduction != "none" and any(need)  # the upstream gradient is a scalar: form the gradients now
        scale = torch.ones((), dtype=acc, device=x.device)
        if reduction == "mean":
            scale = _reduction.grad_scale(den)
        gx = torch.zeros(x.shape, dtype=acc, device=x.device) if now and need[0] else None
        gw = _WeightGrad(w, acc) if now and need[1] else None
        gb = torch.zeros(local, dtype=acc, device=x.device) if now and need[2] else None
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            z = _shard_logits(x[sl], w, b, acc)
            m = z.amax(1) if local else torch.full((z.shape[0],), -torch.inf, dtype=acc, device=x.device)
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            z_t = z.gather(1, local_t[sl, None]).squeeze(1) if local else torch.zeros_like(m)
            packed = torch.stack([torch.exp(z - m[:, None]).sum(1), torch.where(owned[sl], z_t, 0.0), z.sum(1)])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            total, z_t, z_sum = packed
            lse[sl] = m + total.log()
            loss = (1 - smoothing) * (lse[sl] - z_t) + smoothing * (lse[sl] - z_sum / num_classes)
            losses[sl] = torch.where(kept[sl], loss + z_loss * lse[sl].square(), 0.0)
            if now:
                g = _shard_grad(z, lse[sl], local_t[sl], owned[sl], kept[sl] * scale, smoothing, z_loss, num_classes)
                _accumulate_param_grads(g, x[sl], w, gx, gw, gb, sl)
        ctx.save_for_backward(x, w, b, target, lse, local_t, owned, kept, scale)
        ctx.grads = (gx, gw, gb) if now else None
        ctx.options = (reduction, smoothing, z_loss, num_classes, rows, group)
        return _reduction.reduce(losses, reduction, den).to(x.dtype)  # all ignored: nan mean

    @staticmethod
    def backward(ctx, grad_out):
        x, w, b, target, lse, local_t, owned, kept, scale = ctx.saved_tensors
        reduction, smoothing, z_loss, num_classes, rows, group = ctx.options
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        if ctx.grads is not None:
            gx, gw, gb = ctx.grads
            ctx.grads = None
            up = grad_out.to(acc)
            gx = None if gx is None else gx.mul_(up)
            gw = None if gw is None else gw.result(up)
            gb = None if gb is None else gb.mul_(up)
        else:  # reduction="none", or a second backward: recompute each chunk, with the saved lse
            per_row = grad_out.to(acc).expand(x.shape[0]) * kept * (scale if reduction != "none" else 1)
            gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
            gw = _WeightGrad(w, acc) if need_w else None
            gb = torch.zeros(w.shape[0], dtype=acc, device=x.device) if need_b else None
            for start in range(0, x.shape[0], rows):
                sl = slice(start, start + rows)
                z = _shard_logits(x[sl], w, b, acc)
                g = _shard_grad(z, lse[sl], local_t[sl], owned[sl], per_row[sl], smoothing, z_loss, num_classes)
                _accumulate_param_grads(g, x[sl], w, gx, gw, gb, sl)
            gw = None if gw is None else gw.result()
        if gx is not None:  # every rank holds a part of dX = sum over shards of G_r W_r: N x H numbers
            dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=group)
            gx = gx.to(x.dtype)
        return (gx, gw, None if gb is None else gb.to(w.dtype), None, None, None, None, None, None, None, None,
                None)


def _shard_logits(xs, w, b, acc):
    z = xs @ w.t() if b is None else torch.addmm(b, xs, w.t())
    return z.to(acc)


def _shard_grad(z, lse, local_t, owned, scale, smoothing, z_loss, num_classes):
    """d(loss * scale)/dz on this shard: (coef p - a/C) scale, minus (1 - a) scale at an owned target."""
    coef = 1.0 + 2 * z_loss * lse
    g = torch.exp(z - lse[:, None]).mul_((coef * scale)[:, None])
    if smoothing:
        g.sub_((smoothing / num_classes * scale)[:, None])
    if g.shape[1]:  # a rank may hold no class at all
        rows = torch.arange(len(lse), device=z.device)
        g[rows, local_t] -= torch.where(owned, (1 - smoothing) * scale, torch.zeros_like(scale))
    return g


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
        chunk_size: rows per chunk (default: :func:`celib.linear.chunk_rows` for the shard).

    Raises:
        InputError: on every rank alike (each checks the same gathered sizes, shapes and targets):
            a target outside [0, V), shapes that do not fit, bad options.
    """
    validate.check_floating("input", input)
    validate.check_floating("weight_shard", weight_shard)
    if input.dim() != 2 or weight_shard.dim() != 2:
        raise InputError(f"input must be (N, H) and weight_shard (V_r, H); got {tuple(input.shape)} and "
                         f"{tuple(weight_shard.shape)}.")
    if input.shape[1] != weight_shard.shape[1]:
        raise InputError(f"input's hidden size {input.shape[1]} does not match weight_shard of shape "
                         f"{tuple(weight_shard.shape)}.")
    if input.dtype != weight_shard.dtype:
        raise InputError(f"input is {input.dtype} but weight_shard is {weight_shard.dtype}; cast one of them.")
    if bias_shard is not None and tuple(bias_shard.shape) != (weight_shard.shape[0],):
        raise InputError(f"bias_shard must have shape ({weight_shard.shape[0]},), one entry per row of "
                         f"weight_shard; got {tuple(bias_shard.shape)}.")
    offset, num_classes = _check_and_locate(target, input, "input", weight_shard.shape[0], group, ignore_index,
                                            reduction, label_smoothing, z_loss)
    rows = chunk_rows(input.shape[0], weight_shard.shape[0], chunk_size, dtype=input.dtype, device=input.device)
    return _VocabParallelLinearCrossEntropy.apply(input, weight_shard, bias_shard, target.long(), offset, num_classes,
                                                  ignore_index, reduction, float(label_smoothing), float(z_loss),
                                                  rows, group)
