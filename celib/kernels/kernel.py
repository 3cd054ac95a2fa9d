"""The Triton kernels of celib's fused softmax cross-entropy.

One program handles one row (one position's C logits). The forward kernel
streams the row in blocks of ``BLOCK`` logits keeping a running max ``m`` and a
rescaled running sum ``d`` of ``exp(z - m)`` (online softmax), plus the sums
the loss needs; it reads each logit once. What happens to the gradient depends
on the row's length:

- The row fits in one block (``SINGLE_BLOCK``): the forward kernel writes the
  gradient from the values still in registers, scaled as if the upstream
  gradient were 1. Backward is :func:`scale_kernel`, which multiplies it in
  place by the upstream gradient, read on the device, and moves no data when
  that is 1 (the usual ``loss.backward()``). Forward + backward: 1 read and
  1 write per logit.
- The row is streamed: the forward kernel writes only the loss and the row's
  statistics (m, log d, and the gradient's coefficient); :func:`backward_kernel`
  re-reads the logits and writes the gradient times the upstream gradient.
  Forward + backward: 2 reads and 1 write per logit, for any upstream gradient
  (the flash-attention design).

Notation (all float32): z logits (soft-capped if asked), lse = m + log d,
p = exp(z - lse), w class weights, a label smoothing, t the target class.
Index target:  loss = (1-a) w_t (lse - z_t) + (a/C) sum(w (lse - z)) + z_loss * lse^2
               grad = p * coef - (a/C) w - (1-a) w_t [c = t],  coef = (1-a) w_t + (a/C) sum(w) + 2 z_loss lse
Probability q: q' = (1-a) q + a/C,  loss = sum(w q' (lse - z)) + z_loss * lse^2,
               grad = p * coef - w q',  coef = sum(w q') + 2 z_loss lse
With soft-capping the gradient is multiplied by d(cap)/dz = 1 - (z/cap)^2.

Masked logits (-inf, e.g. a padded vocabulary) behave as in PyTorch: they get
probability 0 and gradient 0; a term of the loss whose factor is positive and
whose logit is -inf is +inf (a -inf target, or any -inf logit under label
smoothing), and a term whose factor is 0 is 0 (where PyTorch computes
0 * inf = nan). A row that is entirely -inf is nan, as in PyTorch. Ignored rows
get loss 0 and gradient 0. The target's logit is picked up while its block
streams by, and its weight is loaded only for a valid class, so a wrong target
cannot make a kernel read out of bounds.
"""

import triton
import triton.language as tl


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
    """softcap * tanh(z / softcap), written with exp (tanh(x) = 1 - 2 / (exp(2x) + 1)); -inf -> -softcap."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))


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
def _target(target_ptr, weight_ptr, row, stride_tn, ignore_index, n_cols,
            PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """(target class, kept, w_t) of an index-target row; (-1, True, 0) for probability targets."""
    if PROB_TARGET:
        target = -1
        kept = True
        w_t = 0.0
    else:
        target = tl.load(target_ptr + row * stride_tn).to(tl.int64)
        kept = target != ignore_index
        in_range = (target >= 0) & (target < n_cols)  # never read outside the row, whatever the target
        w_t = 1.0
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + target, mask=in_range & kept, other=0.0).to(tl.float32)
    return target, kept, w_t


@triton.jit
def _grad_block(z, w, offs, mask, m, log_d, coef, target, w_t, smoothing, n_cols, softcap, scale,
                PROB_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The gradient of one block: scale * (coef * p - target mass), times the soft-cap's derivative."""
    p = tl.exp((z - m) - log_d)  # 0 for a -inf logit
    if PROB_TARGET:
        g = coef * p - w
    else:
        g = coef * p - smoothing / n_cols * w
        g -= tl.where(offs == target, (1.0 - smoothing) * w_t, 0.0)  # p - 1 formed in float32
    if HAS_SOFTCAP:
        t = tl.where(mask, z, 0.0) / softcap
        g *= 1.0 - t * t  # d(softcap * tanh(x / softcap)) / dx
    return g * scale


@triton.jit
def forward_kernel(
    # logits as (N, S, C): batch, inner position, class
    logits_ptr, stride_ln, stride_ls, stride_lc,
    # index targets (N*S,) or probabilities (N, S, C)
    target_ptr, stride_tn, stride_ts, stride_tc,
    weight_ptr,  # (C,) class weights, read only if HAS_WEIGHT
    # gradient (SINGLE_BLOCK only), may alias the logits
    grad_ptr, stride_gn, stride_gs, stride_gc,
    # (N*S,) float32 loss and lse; (3, N*S) float32 m, log d, coef
    loss_ptr, lse_ptr, stats_ptr,
    grad_scale_ptr,  # () float32: 1 / the mean's denominator, or 1
    n_rows, n_inner, n_cols, ignore_index, smoothing, z_loss, softcap,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    # 64-bit from here on: row * stride never overflows
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row_offset(row, n_inner, stride_ln, stride_ls)
    q_row = target_ptr + row_offset(row, n_inner, stride_tn, stride_ts)
    cols = tl.arange(0, BLOCK)
    target, kept, w_t = _target(target_ptr, weight_ptr, row, stride_tn,
                                ignore_index, n_cols, PROB_TARGET,
                                HAS_WEIGHT)

    m = -float("inf")  # running max
    d = 0.0  # running sum of exp(z - m)
    # r: a reference, the first finite block max; sums of w (z - r) lose
    # nothing to large |z|
    r = -float("inf")
    sum_wz = 0.0  # sum of w_c (z_c - r) over finite z_c with w_c > 0
    # count of -inf logits with w_c > 0: each makes the smoothing term +inf
    n_inf = 0.0
    sum_w = 0.0  # sum_c w_c
    z_t = 0.0  # the target's logit, picked up when its block goes by
    # defined before the loop so that, for a single block, the gradient can
    # reuse them after it
    z = tl.full([BLOCK], -float("inf"), tl.float32)
    w = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        z, w = _load_block(x_row, q_row, weight_ptr, offs, mask, stride_lc,
                           stride_tc, n_cols, smoothing, softcap,
                           PROB_TARGET, HAS_WEIGHT, HAS_SOFTCAP, BLOCK)
        block_max = tl.max(z, axis=0)
        m_new = tl.maximum(m, block_max)
        # no (-inf) - (-inf) while everything so far is -inf
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
        r = tl.where(r == -float("inf"), block_max, r)
        finite = (w > 0) & (z > -float("inf"))
        sum_wz += tl.sum(tl.where(finite, w * (z - r), 0.0), axis=0)
        masked = (w > 0) & (z == -float("inf"))
        n_inf += tl.sum(tl.where(masked, 1.0, 0.0), axis=0)
        sum_w += tl.sum(w, axis=0)
        if not PROB_TARGET:
            z_t += tl.sum(tl.where(offs == target, z, 0.0), axis=0)
    log_d = tl.log(d)
    lse = m + log_d
    # sum_c w_c (lse - z_c), so that no large |z| is subtracted from
    # another; +inf if any weighted logit is -inf
    weighted = sum_w * ((m - r) + log_d) - sum_wz
    weighted = tl.where(n_inf > 0, float("inf"), weighted)

    if PROB_TARGET:
        loss = weighted
        coef = sum_w
    else:
        c_t = (1.0 - smoothing) * w_t
        # a zero factor times inf is 0
        loss = tl.where(c_t > 0, c_t * ((m - z_t) + log_d), 0.0)
        loss += tl.where(smoothing > 0, smoothing / n_cols * weighted, 0.0)
        coef = c_t + smoothing / n_cols * sum_w
    loss += tl.where(z_loss > 0, z_loss * lse * lse, 0.0)
    coef += 2.0 * z_loss * lse
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + n_rows + row, log_d)
    tl.store(stats_ptr + 2 * n_rows + row, tl.where(kept, coef, 0.0))

    # the gradient, from the block still in registers
    if COMPUTE_GRAD and SINGLE_BLOCK:
        scale = tl.where(kept, tl.load(grad_scale_ptr), 0.0)
        g = _grad_block(z, w, cols, cols < n_cols, m, log_d, coef, target,
                        w_t, smoothing, n_cols, softcap, scale, PROB_TARGET,
                        HAS_SOFTCAP)
        # an ignored row gets 0, even if its logits are all -inf
        g = tl.where(kept, g, 0.0)
        g_row = grad_ptr + row_offset(row, n_inner, stride_gn, stride_gs)
        g_out = g.to(grad_ptr.dtype.element_ty)
        tl.store(g_row + cols * stride_gc, g_out, mask=cols < n_cols)


@triton.jit
def backward_kernel(
    logits_ptr, stride_ln, stride_ls, stride_lc,
    target_ptr, stride_tn, stride_ts, stride_tc,
    weight_ptr,
    grad_ptr, stride_gn, stride_gs, stride_gc,  # the gradient, written (may alias the logits)
    stats_ptr,  # (3, N*S) float32 from the forward kernel: m, log d, coef (0 for ignored rows)
    grad_scale_ptr,  # () float32: 1 / the mean's denominator, or 1
    upstream_ptr, stride_up,  # the upstream gradient: one value per row, or stride 0 for a scalar
    n_rows, n_inner, n_cols, ignore_index, smoothing, softcap,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    """The gradient of a streamed row: re-reads its logits once, writes scale * upstream * dloss/dz."""
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row_offset(row, n_inner, stride_ln, stride_ls)
    q_row = target_ptr + row_offset(row, n_inner, stride_tn, stride_ts)
    g_row = grad_ptr + row_offset(row, n_inner, stride_gn, stride_gs)
    cols = tl.arange(0, BLOCK)
    target, kept, w_t = _target(target_ptr, weight_ptr, row, stride_tn, ignore_index, n_cols,
                                PROB_TARGET, HAS_WEIGHT)
    m = tl.load(stats_ptr + row)
    log_d = tl.load(stats_ptr + n_rows + row)
    coef = tl.load(stats_ptr + 2 * n_rows + row)
    scale = tl.where(kept, tl.load(grad_scale_ptr) * tl.load(upstream_ptr + row * stride_up).to(tl.float32), 0.0)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        z, w = _load_block(x_row, q_row, weight_ptr, offs, mask, stride_lc, stride_tc, n_cols, smoothing, softcap,
                           PROB_TARGET, HAS_WEIGHT, HAS_SOFTCAP, BLOCK)
        g = _grad_block(z, w, offs, mask, m, log_d, coef, target, w_t, smoothing, n_cols, softcap, scale,
                        PROB_TARGET, HAS_SOFTCAP)
        g = tl.where(kept, g, 0.0)
        tl.store(g_row + offs * stride_gc, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_kernel(grad_ptr, stride_gn, stride_gs, stride_gc, upstream_ptr, stride_up, n_inner, n_cols,
                 BLOCK: tl.constexpr):
    """grad[row] *= upstream[row] in place, for a row whose gradient the forward kernel wrote.

    The upstream value is read on the device; where it is exactly 1 every load and store is masked
    off, so the usual ``loss.backward()`` moves no gradient data at all.
    """
    row = tl.program_id(0).to(tl.int64)
    g_row = grad_ptr + row_offset(row, n_inner, stride_gn, stride_gs)
    up = tl.load(upstream_ptr + row * stride_up).to(tl.float32)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = (offs < n_cols) & (tl.full([BLOCK], 1.0, tl.float32) * up != 1.0)
        g = tl.load(g_row + offs * stride_gc, mask=mask, other=0.0).to(tl.float32)
        tl.store(g_row + offs * stride_gc, (g * up).to(grad_ptr.dtype.element_ty), mask=mask)
