"""The autograd Function around the kernel: the gradient is computed in the forward launch."""

from __future__ import annotations

import torch

from celib.kernels.launch import as_rows, launch


class CrossEntropyFunction(torch.autograd.Function):
    """Loss (and per-row lse) forward; the backward scales the gradient the forward wrote.

    The forward launch writes the gradient of the loss as if the upstream
    gradient were 1 (already divided by the mean's denominator); the backward
    multiplies it by the actual upstream gradient (a scalar, or one value per
    position for ``reduction="none"``), so a loss that is scaled or reused
    after the call gets the right gradient.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                inplace_backward, loss_dtype, max_block):
        x = as_rows(logits)
        n, c, s = x.shape
        batch_shape = logits.shape[:0] if logits.dim() == 1 else logits.shape[:1] + logits.shape[2:]
        prob = target.is_floating_point()
        t = as_rows(target) if prob else target.reshape(-1)
        if reduction == "mean":
            if prob:
                denominator = torch.tensor(float(n * s), dtype=torch.float32, device=logits.device)
            else:
                kept = t != ignore_index
                if weight is None:
                    denominator = kept.sum(dtype=torch.float32)
                else:  # clamp: a wrong target (check_inputs=False) must not index out of bounds here either
                    denominator = (weight.float()[t.clamp(0, c - 1).long()] * kept).sum()
            grad_scale = 1.0 / denominator
        else:
            denominator = None
            grad_scale = torch.ones((), dtype=torch.float32, device=logits.device)
        compute_grad = ctx.needs_input_grad[0]
        in_place = inplace_backward and compute_grad  # write the gradient over the logits' storage
        out = launch(x.detach(), t, weight, ignore_index, label_smoothing, z_loss, softcap, grad_scale,
                     compute_grad, grad_out=x.detach() if in_place else None, max_block=max_block)
        if reduction == "none":
            loss = out.loss.view(batch_shape)
        elif reduction == "sum":
            loss = out.loss.sum()
        else:
            loss = out.loss.sum() / denominator
        loss = loss.to(loss_dtype or logits.dtype)
        lse = out.lse.view(batch_shape)
        ctx.mark_non_differentiable(lse)
        ctx.reduction, ctx.rows_shape, ctx.input_shape, ctx.in_place = reduction, (n, 1, s), logits.shape, in_place
        ctx.save_for_backward(out.grad if compute_grad else None)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad_loss = grad_loss.reshape(ctx.rows_shape)
        if ctx.in_place:  # O(N) extra memory: scale the gradient where it lies (backward runs once)
            grad = grad.mul_(grad_loss.to(grad.dtype))
        else:
            grad = grad * grad_loss.to(grad.dtype)
        grad = grad.reshape(ctx.input_shape)
        return grad, None, None, None, None, None, None, None, None, None, None
