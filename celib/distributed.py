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

It uses ``torch.distributed`` as it is: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from celib import validate
from celib.errors import InputError


def _shard_offsets(local_classes: int, device: torch.device, group) -> tuple[int, int]:
    """(first class of this rank's shard, total number of classes), from one all-gather of the sizes."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local_classes], dtype=torch.int64, device=device), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


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
        count = kept.sum()
        ctx.save_for_backward(local_logits, lse, local_t, owned, kept, count)
        ctx.options = (reduction, smoothing, z_loss, num_classes)
        if reduction == "none":
            return loss.to(local_logits.dtype)
        if reduction == "sum":
            return loss.sum().to(local_logits.dtype)
        return (loss.sum() / count).to(local_logits.dtype)  # all ignored: 0 / 0 = nan, as PyTorch

    @staticmethod
    def backward(ctx, grad_out):
        local_logits, lse, local_t, owned, kept, count = ctx.saved_tensors
        reduction, smoothing, z_loss, num_classes = ctx.options
        scale = grad_out.to(lse.dtype).expand(lse.shape)
        if reduction == "mean":
            scale = scale / count.clamp_min(1)
        scale = scale * kept
        coef = 1.0 + 2 * z_loss * lse  # the target mass sums to 1 over the whole vocabulary
        p = torch.exp(local_logits.to(lse.dtype) - lse[:, None])
        grad = (coef[:, None] * p - smoothing / num_classes) * scale[:, None]
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
        ignore_index, reduction, label_smoothing, z_loss: as in :func:`celib.cross_entropy`.

    Raises:
        InputError: on every rank alike (each sees the same gathered sizes and targets, so none is
            left waiting in a collective): a target outside [0, V) for the total V of all shards,
            bad shapes or options.
    """
    validate.check_floating("local_logits", local_logits)
    if local_logits.dim() != 2:
        raise InputError(f"local_logits must be (N, V_r), got shape {tuple(local_logits.shape)}.")
    if not isinstance(target, torch.Tensor) or not validate.is_index_target(target) or target.dim() != 1:
        raise InputError("target must be a 1-D integer tensor of global class indices.")
    if target.shape[0] != local_logits.shape[0]:
        raise InputError(f"target has {target.shape[0]} rows but local_logits has {local_logits.shape[0]}.")
    validate.check_reduction(reduction)
    validate.check_label_smoothing(label_smoothing)
    validate.check_extras(z_loss, None)
    offset, num_classes = _shard_offsets(local_logits.shape[1], local_logits.device, group)
    validate.check_target_range(target, num_classes, ignore_index)
    return _VocabParallelCrossEntropy.apply(local_logits, target.long(), offset, num_classes, ignore_index, reduction,
                                            float(label_smoothing), float(z_loss), group)
