"""The fused softmax-cross-entropy Triton kernel: loss, log-sum-exp and gradient in one launch.

One program handles one row (one position's C logits). It streams the row in
blocks of ``BLOCK`` logits keeping a running max ``m`` and a rescaled running
sum ``d`` of ``exp(z - m)`` (online softmax), plus the sums the loss needs. If
the row fits in one block (``SINGLE_BLOCK``) the gradient is written from the
values already loaded: one read and one write per logit. Otherwise a second
sweep re-reads each block and writes its gradient: two reads, one write.

Notation (all float32): z logits (soft-capped if asked), lse = log-sum-exp,
p = exp(z - lse), w class weights, a label smoothing, t the target class.
Index target:  loss = (1-a) w_t (lse - z_t) + (a/C) sum(w (lse - z)) + z_loss * lse^2
               grad = p * ((1-a) w_t + (a/C) sum(w) + 2 z_loss lse) - (a/C) w - (1-a) w_t [c = t]
Probability q: q' = (1-a) q + a/C,  S = sum(w q')
               loss = sum(w q' (lse - z)) + z_loss * lse^2
               grad = p * (S + 2 z_loss lse) - w q'
The gradient is multiplied by ``grad_scale`` (1 / the mean's denominator, read
from device memory, or 1) and, with soft-capping, by d(cap)/dz = 1 - (z/cap)^2.
Ignored rows get loss 0 and gradient 0. The target's logit is picked up while
its block streams by, and its weight is loaded only for a valid class, so a
wrong target cannot make the kernel read out of bounds.
"""

import triton
import triton.language as tl


@triton.jit
def _load_block(x_row, q_row, weight_ptr, offs, mask, stride_lc, stride_tc, n_cols, smoothing, softcap,
                PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """One block of a row: logits z in float32 (-inf past the row's end) and per-class factors w
    (the class weights, times the smoothed target q' for probability targets; 0 past the end)."""
    z = tl.load(x_row + offs * stride_lc, mask=mask, other=-float("inf")).to(tl.float32)
    if HAS_SOFTCAP:
        z = tl.where(mask, _softcap(z, softcap), -float("inf"))
    w = tl.full([BLOCK], 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PROB_TARGET:
        q = tl.load(q_row + offs * stride_tc, mask=mask, other=0.0).to(tl.float32)
        w = w * ((1.0 - smoothing) * q + smoothing / n_cols)
    return z, tl.where(mask, w, 0.0)


@triton.jit
def row_offset(row, n_inner, stride_n, stride_s):
    """Element offset of row ``row`` = n * n_inner + s of an (N, S, C) layout, in 64-bit integers.

    Triton passes integer arguments below 2**31 as 32-bit, so without the cast
    ``n * stride_n`` wraps around once N * C reaches 2**31 (e.g. 32768 tokens x 128256 classes).
    """
    row = row.to(tl.int64)
    return (row // n_inner) * stride_n + (row % n_inner) * stride_s


@triton.jit
def _softcap(z, softcap):
    """softcap * tanh(z / softcap), written with exp (tanh(x) = 1 - 2 / (exp(2x) + 1))."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))


@triton.jit
def cross_entropy_kernel(
    logits_ptr, stride_ln, stride_ls, stride_lc,  # logits as (N, S, C): batch, inner position, class
    target_ptr, stride_tn, stride_ts, stride_tc,  # index targets (N*S,) or probabilities (N, S, C)
    weight_ptr,  # (C,) class weights, read only if HAS_WEIGHT
    grad_ptr, stride_gn, stride_gs, stride_gc,  # gradient, same layout as the logits (may alias them)
    loss_ptr, lse_ptr,  # (N*S,) float32 outputs
    grad_scale_ptr,  # () float32 on the device: 1 / the mean's denominator, or 1
    n_inner, n_cols, ignore_index, smoothing, z_loss, softcap,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit from here on: row * stride never overflows
    x_row = logits_ptr + row_offset(row, n_inner, stride_ln, stride_ls)
    g_row = grad_ptr + row_offset(row, n_inner, stride_gn, stride_gs)
    q_row = target_ptr + row_offset(row, n_inner, stride_tn, stride_ts)
    cols = tl.arange(0, BLOCK)

    if PROB_TARGET:
        kept = True
        target = -1
        w_t = 0.0
    else:
        target = tl.load(target_ptr + row * stride_tn).to(tl.int64)
        kept = target != ignore_index
        in_range = (target >= 0) & (target < n_cols)  # never read outside the row, whatever the target
        w_t = 1.0
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + target, mask=in_range & kept, other=0.0).to(tl.float32)

    # Pass 1: running max m, running sum d of exp(z - m), and the weighted sums the loss needs.
    m = -float("inf")
    d = 0.0
    r = 0.0  # a reference logit (the first block's max): sums of w * (z - r) lose no precision to large |z|
    sum_wz = 0.0  # sum_c w_c (z_c - r)
    sum_w = 0.0  # sum_c w_c
    z_t = 0.0  # the target's logit, picked up when its block goes by
    z = tl.full([BLOCK], -float("inf"), tl.float32)  # defined before the loop so that, for a single
    w = tl.zeros([BLOCK], tl.float32)  # block, the gradient can reuse them after it
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        z, w = _load_block(x_row, q_row, weight_ptr, offs, mask, stride_lc, stride_tc, n_cols, smoothing, softcap,
                           PROB_TARGET, HAS_WEIGHT, HAS_SOFTCAP, BLOCK)
        block_max = tl.max(z, axis=0)
        m_new = tl.maximum(m, block_max)
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)  # rescale the old sum, add the block
        m = m_new
        r = tl.where(start == 0, block_max, r)
        sum_wz += tl.sum(w * tl.where(mask, z - r, 0.0), axis=0)
        sum_w += tl.sum(w, axis=0)
        if not PROB_TARGET:
            z_t += tl.sum(tl.where(offs == target, z, 0.0), axis=0)
    log_d = tl.log(d)
    lse = m + log_d
    # sum_c w_c (lse - z_c), written so that no large |z| is subtracted from another
    weighted = sum_w * ((m - r) + log_d) - sum_wz

    if PROB_TARGET:
        loss = weighted
        coef = sum_w
    else:
        loss = (1.0 - smoothing) * w_t * ((m - z_t) + log_d) + smoothing / n_cols * weighted
        coef = (1.0 - smoothing) * w_t + smoothing / n_cols * sum_w
    loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    tl.store(lse_ptr + row, lse)

    if COMPUTE_GRAD:
        # Gradient: from the block still in registers (SINGLE_BLOCK), or a second sweep over the row.
        scale = tl.where(kept, tl.load(grad_scale_ptr), 0.0)
        coef += 2.0 * z_loss * lse
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            if not SINGLE_BLOCK:
                z, w = _load_block(x_row, q_row, weight_ptr, offs, mask, stride_lc, stride_tc, n_cols, smoothing,
                                   softcap, PROB_TARGET, HAS_WEIGHT, HAS_SOFTCAP, BLOCK)
            p = tl.exp((z - m) - log_d)
            if PROB_TARGET:
                g = coef * p - w
            else:
                g = coef * p - smoothing / n_cols * w
                g -= tl.where(offs == target, (1.0 - smoothing) * w_t, 0.0)  # p - 1 formed in float32
            if HAS_SOFTCAP:
                t = tl.where(mask, z, 0.0) / softcap
                g *= 1.0 - t * t  # d(softcap * tanh(x / softcap)) / dx
            g *= scale
            tl.store(g_row + offs * stride_gc, g.to(grad_ptr.dtype.element_ty), mask=mask)
