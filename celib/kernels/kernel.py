"""The Triton kernels of celib's fused softmax cross-entropy.

One program handles one row (one position's C logits). What happens to the
gradient depends on the row's length:

- The row fits in one block (``SINGLE_BLOCK``): :func:`forward_kernel` loads
  it once, and writes the loss, the row's statistics and the gradient from the
  values still in registers, scaled as if the upstream gradient were 1. In
  backward, :func:`backward_kernel` (``SKIP_UNIT_UPSTREAM``) reads the upstream
  gradient on the device and does nothing where it is exactly 1 (the usual
  ``loss.backward()``); elsewhere it recomputes the row's gradient from the
  logits and the statistics, so the gradient is rounded once. Forward +
  backward: 1 read and 1 write per logit at upstream 1, 2 reads and 2 writes
  otherwise.
- The row is streamed in blocks of ``BLOCK`` logits: the forward kernel keeps
  a running max ``m`` and a rescaled running sum ``d`` of ``exp(z - m)``
  (online softmax) and writes only the loss and the statistics (m, log d, and
  the gradient's coefficient); the backward kernel re-reads the logits and
  writes the gradient times the upstream gradient. Forward + backward: 2 reads
  and 1 write per logit, for any upstream gradient (the flash-attention design).
- ``TWO_SWEEPS`` (the same-program design, Liger-Kernel's): the forward program
  sweeps a streamed row a second time right away and writes the gradient at
  upstream 1, as for one-block rows, on a persistent grid (rows pid, pid + P,
  ...) small enough for the rows in flight to stay in L2, so that the second
  read can come from L2 instead of memory. Which design is faster, and where
  the one-block limit should be, only a GPU can tell:
  ``celib.kernels.launch.Tuning`` holds both choices, provisional until
  ``benchmarks/gpu_check.py`` has timed them.

Every option is a compile-time flag (``tl.constexpr``), derived from the call's
options in one place (``celib._options.LossOptions.kernel_flags``) and passed to
the helpers by keyword; ``HAS_CLASS_MASS`` (probability targets or smoothing: per-class
factors w in the loss) is one of them. The plain case (index
targets, no weights, smoothing, z-loss or soft-capping) carries none of their
arithmetic. Exponentials are ``exp2((z - m) * log2 e)``: one subtraction (exact
for z near m), one multiplication and the hardware's ``ex2``, without the
range fix-up of ``tl.exp``. The target's logit is one scalar load, not a search
of the row. A launch with contiguous rows specialises the class stride to 1, so
per-element addresses are 32-bit offsets from one 64-bit row pointer.

Notation (all float32): z logits (soft-capped if asked), lse = m + log d,
p = exp(z - lse), w class weights, a label smoothing, t the target class.
Index target:  loss = (1-a) w_t (lse - z_t) + (a/C) sum(w (lse - z)) + z_loss * lse^2
               grad = p * coef - (a/C) w - (1-a) w_t [c = t],  coef = (1-a) w_t + (a/C) sum(w) + 2 z_loss lse
Probability q: q' = (1-a) q + a/C,  loss = sum(w q' (lse - z)) + z_loss * lse^2,
               grad = p * coef - w q',  coef = sum(w q') + 2 z_loss lse
With soft-capping the gradient is multiplied by d(cap)/dz = 1 - (z/cap)^2.
Class weights may be negative (PyTorch accepts them): every term keeps its sign.

Masked logits (-inf, e.g. a padded vocabulary) behave as in PyTorch: they get
probability 0 and gradient 0; a term of the loss whose factor is nonzero and
whose logit is -inf is infinite with the factor's sign (a -inf target, or any
-inf logit under label smoothing), and a term whose factor is 0 is 0 (where
PyTorch computes 0 * inf = nan). A row that is entirely -inf is nan, as in
PyTorch. Ignored rows get loss 0 and gradient 0 (nan if every logit of the
row is -inf, as in PyTorch). A class index outside
[0, C-1] (only possible with ``check_inputs=False``) is never read through: its
row's loss and gradient are nan, never a finite wrong number.
"""

import triton
import triton.language as tl

__all__ = ["LOG2E", "backward_kernel", "forward_kernel", "row_offset", "scale_kernel"]

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def row_offset(row, n_inner, stride_n, stride_s):
    """Element offset of row ``row`` = n * n_inner + s of an (N, S, C) layout, in 64-bit integers.

    Triton passes integer arguments below 2**31 as 32-bit, so without the cast
    ``n * stride_n`` wraps around once N * C reaches 2**31 (e.g. 32768 tokens x 128256 classes).
    A launch with S = 1 specialises ``n_inner`` to the constant 1, and the division folds away.
    """
    row = row.to(tl.int64)
    return (row // n_inner) * stride_n + (row % n_inner) * stride_s


@triton.jit
def _softcap(z, softcap):
    """softcap * tanh(z / softcap), written with exp2 (tanh(x) = 1 - 2 / (exp(2x) + 1)); -inf -> -softcap."""
    return softcap * (1.0 - 2.0 / (tl.exp2((z / softcap) * (2.0 * LOG2E)) + 1.0))


@triton.jit
def _load_block(x_row, q_row, weight_ptr, offs, mask, stride_lc, stride_tc, n_cols, smoothing, softcap,
                PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_CLASS_MASS: tl.constexpr, BLOCK: tl.constexpr):
    """One block of a row: logits z in float32 (-inf past the row's end) and the per-class factors
    w that multiply (lse - z) in the loss, without the target's own term: the class weights times the
    smoothed probability target, or times a/C under label smoothing (0 past the end; 0 everywhere
    when neither applies, and then never computed)."""
    z = tl.load(x_row + offs * stride_lc, mask=mask, other=-float("inf")).to(tl.float32)
    if HAS_SOFTCAP:
        z = tl.where(mask, _softcap(z, softcap), -float("inf"))
    w = tl.zeros([BLOCK], tl.float32)
    if HAS_CLASS_MASS:
        w = tl.full([BLOCK], 1.0, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if PROB_TARGET:
            q = tl.load(q_row + offs * stride_tc, mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTHING:
                q = (1.0 - smoothing) * q + smoothing / n_cols
            w = w * q
        else:
            w = w * (smoothing / n_cols)
        w = tl.where(mask, w, 0.0)
    return z, w


@triton.jit
def _target(target_ptr, weight_ptr, row, stride_tn, ignore_index, n_cols, smoothing,
            PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """(target class, kept, valid, c_t) of a row: c_t = (1 - a) w_t is the factor of the target's own
    term. ``valid`` is False for a kept index outside [0, C-1]. Probability targets: (-1, True, True, 0)."""
    if PROB_TARGET:
        target = -1
        kept = True
        valid = True
        c_t = 0.0
    else:
        t64 = tl.load(target_ptr + row * stride_tn).to(tl.int64)
        kept = t64 != ignore_index
        valid = (t64 >= 0) & (t64 < n_cols)  # never read outside the row, whatever the target
        target = t64.to(tl.int32)  # compared with 32-bit column offsets
        c_t = 1.0
        if HAS_WEIGHT:
            c_t = tl.load(weight_ptr + target, mask=valid & kept, other=0.0).to(tl.float32)
        if HAS_SMOOTHING:
            c_t = (1.0 - smoothing) * c_t
        valid = valid | ~kept
    return target, kept, valid, c_t


@triton.jit
def _target_logit(x_row, target, kept, valid, stride_lc, softcap, PROB_TARGET: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr):
    """The target's logit z_t (soft-capped), one scalar load, only for a kept class inside the row
    (0 for probability targets)."""
    z_t = 0.0
    if not PROB_TARGET:
        z_t = tl.load(x_row + target * stride_lc, mask=valid & kept, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z_t = _softcap(z_t, softcap)
    return z_t


@triton.jit
def _sums(z, w, m):
    """sum of w (z - m) over finite z, and the counts of -inf logits with w > 0 and w < 0."""
    finite = z > -float("inf")
    sum_wz = tl.sum(tl.where(finite, w * (z - m), 0.0), axis=0)
    n_pos = tl.sum(tl.where(~finite & (w > 0), 1.0, 0.0), axis=0)
    n_neg = tl.sum(tl.where(~finite & (w < 0), 1.0, 0.0), axis=0)
    return sum_wz, n_pos, n_neg


@triton.jit
def _loss(m, log_d, z_t, c_t, sum_w, sum_wz, n_pos, n_neg, z_loss, kept, valid,
          PROB_TARGET: tl.constexpr, HAS_CLASS_MASS: tl.constexpr, HAS_Z_LOSS: tl.constexpr):
    """(loss, coef, lse) of a row from its statistics; sum_wz = sum w (z - m) over finite z."""
    lse = m + log_d
    if PROB_TARGET:
        loss = 0.0
        coef = 0.0
    else:
        loss = tl.where(c_t != 0, c_t * ((m - z_t) + log_d), 0.0)  # a zero factor times inf is 0
        coef = c_t
    if HAS_CLASS_MASS:
        # sum_c w_c (lse - z_c) = sum(w) log d - sum w (z - m): no large |z| is subtracted from another
        weighted = sum_w * log_d - sum_wz
        inf = float("inf")
        weighted = tl.where(n_pos > 0, tl.where(n_neg > 0, float("nan"), inf), tl.where(n_neg > 0, -inf, weighted))
        loss += weighted
        coef += sum_w
    if HAS_Z_LOSS:
        loss += z_loss * lse * lse
        coef += 2.0 * z_loss * lse
    loss = tl.where(log_d == -float("inf"), float("nan"), loss)  # every logit -inf: nan, as in PyTorch
    loss = tl.where(valid, loss, float("nan"))  # a class index outside the row: nan, never a finite number
    coef = tl.where(valid, coef, float("nan"))
    return tl.where(kept, loss, 0.0), tl.where(kept, coef, 0.0), lse


@triton.jit
def _gradient(e, z, w, offs, mask, k, target, c_t, scale, softcap, HAS_CLASS_MASS: tl.constexpr,
              PROB_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """scale (k e - w - c_t [c = t]), times the soft-cap's derivative, where k e = coef p: k = coef / d with
    e = exp(z - m), or k = coef with e = p. Without per-class factors (``HAS_CLASS_MASS`` off) the scale is folded
    into the row's two scalars, so each element costs one multiplication and the target's select."""
    if HAS_CLASS_MASS:
        g = e * k - w
        if not PROB_TARGET:
            g = tl.where(offs == target, g - c_t, g)  # p - 1 formed in float32
        g = g * scale
    else:
        g = e * (k * scale)
        g = tl.where(offs == target, g - c_t * scale, g)
    if HAS_SOFTCAP:
        t = tl.where(mask, z, 0.0) / softcap
        g *= 1.0 - t * t  # d(softcap * tanh(x / softcap)) / dx
    return g


@triton.jit
def _sweep_gradient(x_row, q_row, g_row, weight_ptr, m, log_d, coef, target, c_t, scale, stride_lc, stride_tc,
                    stride_gc, n_cols, smoothing, softcap, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_CLASS_MASS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """One sweep over a streamed row: re-reads its logits in blocks and writes scale * dloss/dz from the
    row's statistics (m, log d, coef). The backward kernel's loop, and the forward kernel's second sweep
    with ``TWO_SWEEPS``."""
    cols = tl.arange(0, BLOCK)
    log2_d = log_d * LOG2E
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        z, w = _load_block(x_row, q_row, weight_ptr, offs, mask, stride_lc, stride_tc, n_cols, smoothing,
                           softcap, PROB_TARGET=PROB_TARGET, HAS_WEIGHT=HAS_WEIGHT, HAS_SMOOTHING=HAS_SMOOTHING,
                           HAS_SOFTCAP=HAS_SOFTCAP, HAS_CLASS_MASS=HAS_CLASS_MASS, BLOCK=BLOCK)
        p = tl.exp2((z - m) * LOG2E - log2_d)  # 0 for a -inf logit
        g = _gradient(p, z, w, offs, mask, coef, target, c_t, scale, softcap, HAS_CLASS_MASS=HAS_CLASS_MASS,
                      PROB_TARGET=PROB_TARGET, HAS_SOFTCAP=HAS_SOFTCAP)
        tl.store(g_row + offs * stride_gc, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _streamed_stats(x_row, q_row, weight_ptr, cols, stride_lc, stride_tc, n_cols, smoothing, softcap,
                    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_CLASS_MASS: tl.constexpr, BLOCK: tl.constexpr):
    """(m, d, sum w, sum w (z - m), n_pos, n_neg) of a row too long for one block, in one sweep of
    blocks: the online softmax's running max m and sum d of exp(z - m), and the sums of :func:`_sums`
    (HAS_CLASS_MASS), taken about r, the first finite block max, so that no large |z| is lost."""
    m = -float("inf")  # running max
    d = 0.0  # running sum of exp(z - m)
    r = -float("inf")
    sum_w = 0.0
    sum_wz = 0.0
    n_pos = 0.0
    n_neg = 0.0
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        z, w = _load_block(x_row, q_row, weight_ptr, offs, mask, stride_lc, stride_tc, n_cols, smoothing,
                           softcap, PROB_TARGET=PROB_TARGET, HAS_WEIGHT=HAS_WEIGHT, HAS_SMOOTHING=HAS_SMOOTHING,
                           HAS_SOFTCAP=HAS_SOFTCAP, HAS_CLASS_MASS=HAS_CLASS_MASS, BLOCK=BLOCK)
        block_max = tl.max(z, axis=0)
        m_new = tl.maximum(m, block_max)
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = d * tl.exp2((m - shift) * LOG2E) + tl.sum(tl.exp2((z - shift) * LOG2E), axis=0)
        m = m_new
        if HAS_CLASS_MASS:
            r = tl.where(r == -float("inf"), block_max, r)
            r0 = tl.where(r == -float("inf"), 0.0, r)
            b_wz, b_pos, b_neg = _sums(z, w, r0)
            sum_wz += b_wz
            n_pos += b_pos
            n_neg += b_neg
            sum_w += tl.sum(w, axis=0)
    m = tl.where(m == -float("inf"), 0.0, m)
    if HAS_CLASS_MASS:  # sum w (z - m) from sum w (z - r)
        sum_wz -= sum_w * (m - tl.where(r == -float("inf"), 0.0, r))
    return m, d, sum_w, sum_wz, n_pos, n_neg


@triton.jit
def _forward_row(
    row,  # int64, so that row * stride never overflows
    # logits as (N, S, C): batch, inner position, class
    logits_ptr, stride_ln, stride_ls, stride_lc,
    # index targets (N*S,) or probabilities (N, S, C)
    target_ptr, stride_tn, stride_ts, stride_tc,
    weight_ptr,  # (C,) float32 class weights, read only if HAS_WEIGHT
    # gradient (COMPUTE_GRAD: one block or TWO_SWEEPS); may alias logits
    grad_ptr, stride_gn, stride_gs, stride_gc,
    # (N*S,) float32 loss and lse; (3, N*S) float32 m, log d, coef
    loss_ptr, lse_ptr, stats_ptr,
    grad_scale_ptr,  # () float32: 1 / the mean's denominator, or 1
    n_rows, n_inner, n_cols, ignore_index, smoothing, z_loss, softcap,
    # the options, each a compile-time flag
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_CLASS_MASS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, TWO_SWEEPS: tl.constexpr,
):
    """One row's forward: its loss, lse and statistics (m, log d, coef),
    and with COMPUTE_GRAD its gradient at upstream 1 (one-block rows, or
    streamed rows under TWO_SWEEPS)."""
    x_row = logits_ptr + row_offset(row, n_inner, stride_ln, stride_ls)
    q_row = target_ptr + row_offset(row, n_inner, stride_tn, stride_ts)
    cols = tl.arange(0, BLOCK)
    target, kept, valid, c_t = _target(
        target_ptr, weight_ptr, row, stride_tn, ignore_index, n_cols,
        smoothing, PROB_TARGET=PROB_TARGET, HAS_WEIGHT=HAS_WEIGHT,
        HAS_SMOOTHING=HAS_SMOOTHING)
    z_t = _target_logit(x_row, target, kept, valid, stride_lc, softcap,
                        PROB_TARGET=PROB_TARGET, HAS_SOFTCAP=HAS_SOFTCAP)
    # the row's sums over the per-class factors w (see _sums)
    sum_w = 0.0
    sum_wz = 0.0
    n_pos = 0.0
    n_neg = 0.0
    if SINGLE_BLOCK:
        mask = cols < n_cols
        z, w = _load_block(x_row, q_row, weight_ptr, cols, mask,
                           stride_lc, stride_tc, n_cols, smoothing,
                           softcap, PROB_TARGET=PROB_TARGET,
                           HAS_WEIGHT=HAS_WEIGHT,
                           HAS_SMOOTHING=HAS_SMOOTHING,
                           HAS_SOFTCAP=HAS_SOFTCAP,
                           HAS_CLASS_MASS=HAS_CLASS_MASS, BLOCK=BLOCK)
        m = tl.max(z, axis=0)
        # no (-inf) - (-inf) in a row of -inf
        m = tl.where(m == -float("inf"), 0.0, m)
        e = tl.exp2((z - m) * LOG2E)  # exp(z - m), kept for the gradient
        d = tl.sum(e, axis=0)
        if HAS_CLASS_MASS:
            sum_w = tl.sum(w, axis=0)
            sum_wz, n_pos, n_neg = _sums(z, w, m)
    else:
        m, d, sum_w, sum_wz, n_pos, n_neg = _streamed_stats(
            x_row, q_row, weight_ptr, cols, stride_lc, stride_tc, n_cols,
            smoothing, softcap, PROB_TARGET=PROB_TARGET,
            HAS_WEIGHT=HAS_WEIGHT, HAS_SMOOTHING=HAS_SMOOTHING,
            HAS_SOFTCAP=HAS_SOFTCAP, HAS_CLASS_MASS=HAS_CLASS_MASS,
            BLOCK=BLOCK)
    log_d = tl.log(d)
    loss, coef, lse = _loss(m, log_d, z_t, c_t, sum_w, sum_wz, n_pos,
                            n_neg, z_loss, kept, valid,
                            PROB_TARGET=PROB_TARGET,
                            HAS_CLASS_MASS=HAS_CLASS_MASS,
                            HAS_Z_LOSS=HAS_Z_LOSS)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + n_rows + row, log_d)
    tl.store(stats_ptr + 2 * n_rows + row, coef)

    if COMPUTE_GRAD:
        # scale 0: an ignored row's gradient is 0 (nan if all its
        # logits are -inf, as in PyTorch)
        scale = tl.where(kept, tl.load(grad_scale_ptr), 0.0)
        g_row = grad_ptr + row_offset(row, n_inner, stride_gn, stride_gs)
    if COMPUTE_GRAD and SINGLE_BLOCK:  # from the block still in registers
        g = _gradient(e, z, w, cols, mask, coef / d, target, c_t, scale,
                      softcap, HAS_CLASS_MASS=HAS_CLASS_MASS,
                      PROB_TARGET=PROB_TARGET, HAS_SOFTCAP=HAS_SOFTCAP)
        g_out = g.to(grad_ptr.dtype.element_ty)
        tl.store(g_row + cols * stride_gc, g_out, mask=mask)
    if COMPUTE_GRAD and TWO_SWEEPS:  # a streamed row, swept again now
        _sweep_gradient(x_row, q_row, g_row, weight_ptr, m, log_d, coef,
                        target, c_t, scale, stride_lc, stride_tc,
                        stride_gc, n_cols, smoothing, softcap,
                        PROB_TARGET=PROB_TARGET, HAS_WEIGHT=HAS_WEIGHT,
                        HAS_SMOOTHING=HAS_SMOOTHING,
                        HAS_SOFTCAP=HAS_SOFTCAP,
                        HAS_CLASS_MASS=HAS_CLASS_MASS, BLOCK=BLOCK)


@triton.jit
def forward_kernel(
    # logits as (N, S, C): batch, inner position, class
    logits_ptr, stride_ln, stride_ls, stride_lc,
    # index targets (N*S,) or probabilities (N, S, C)
    target_ptr, stride_tn, stride_ts, stride_tc,
    weight_ptr,  # (C,) float32 class weights, read only if HAS_WEIGHT
    # gradient (COMPUTE_GRAD: one block or TWO_SWEEPS); may alias logits
    grad_ptr, stride_gn, stride_gs, stride_gc,
    # (N*S,) float32 loss and lse; (3, N*S) float32 m, log d, coef
    loss_ptr, lse_ptr, stats_ptr,
    grad_scale_ptr,  # () float32: 1 / the mean's denominator, or 1
    n_rows, n_inner, n_cols, ignore_index, smoothing, z_loss, softcap,
    # the options, each a compile-time flag
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_CLASS_MASS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, TWO_SWEEPS: tl.constexpr,
):
    """Loss and row statistics of every row; the gradient at upstream 1 of one-block rows, and, with
    ``TWO_SWEEPS`` (the same-program design for streamed rows), of streamed rows in a second sweep.

    One program per row; with ``TWO_SWEEPS`` a persistent grid whose programs take rows pid, pid + P,
    ... so that the rows in flight, read again at once, can still be in L2.
    """
    # One row per program, or, on a persistent grid, rows pid, pid + P, ...: the trip count is the constant
    # 1 without TWO_SWEEPS, so the compiler drops the loop (one it cannot drop doubles a one-block row's
    # registers).
    pid = tl.program_id(0).to(tl.int64)
    n_mine = tl.cdiv(n_rows - pid, tl.num_programs(0)) if TWO_SWEEPS else 1
    for i in range(n_mine):
        _forward_row(pid + i * tl.num_programs(0), logits_ptr, stride_ln, stride_ls, stride_lc,
                     target_ptr, stride_tn, stride_ts, stride_tc, weight_ptr,
                     grad_ptr, stride_gn, stride_gs, stride_gc,
                     loss_ptr, lse_ptr, stats_ptr, grad_scale_ptr,
                     n_rows, n_inner, n_cols, ignore_index, smoothing, z_loss, softcap,
                     PROB_TARGET=PROB_TARGET, HAS_WEIGHT=HAS_WEIGHT, HAS_SMOOTHING=HAS_SMOOTHING,
                     HAS_Z_LOSS=HAS_Z_LOSS, HAS_SOFTCAP=HAS_SOFTCAP, HAS_CLASS_MASS=HAS_CLASS_MASS,
                     COMPUTE_GRAD=COMPUTE_GRAD, BLOCK=BLOCK, SINGLE_BLOCK=SINGLE_BLOCK, TWO_SWEEPS=TWO_SWEEPS)


@triton.jit
def backward_kernel(
    logits_ptr, stride_ln, stride_ls, stride_lc,
    target_ptr, stride_tn, stride_ts, stride_tc,
    weight_ptr,
    grad_ptr, stride_gn, stride_gs, stride_gc,  # the gradient, written (may alias the logits)
    stats_ptr,  # (3, N*S) float32 from the forward kernel: m, log d, coef (0 for ignored rows)
    grad_scale_ptr,  # () float32: 1 / the mean's denominator, or 1
    upstream_ptr, stride_un, stride_us,  # the upstream gradient as (N, S); strides 0 for a scalar
    n_rows, n_inner, n_cols, ignore_index, smoothing, softcap,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_CLASS_MASS: tl.constexpr, SKIP_UNIT_UPSTREAM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Writes scale * upstream * dloss/dz of a row, re-reading its logits once.

    With ``SKIP_UNIT_UPSTREAM`` (rows whose gradient the forward kernel already wrote at upstream 1), a row
    whose upstream gradient is exactly 1 is left alone: no load, no store.
    """
    row = tl.program_id(0).to(tl.int64)
    up = tl.load(upstream_ptr + row_offset(row, n_inner, stride_un, stride_us)).to(tl.float32)
    run = True
    if SKIP_UNIT_UPSTREAM:
        run = up != 1.0
    if run:
        x_row = logits_ptr + row_offset(row, n_inner, stride_ln, stride_ls)
        q_row = target_ptr + row_offset(row, n_inner, stride_tn, stride_ts)
        g_row = grad_ptr + row_offset(row, n_inner, stride_gn, stride_gs)
        target, kept, _, c_t = _target(target_ptr, weight_ptr, row, stride_tn, ignore_index, n_cols, smoothing,
                                       PROB_TARGET=PROB_TARGET, HAS_WEIGHT=HAS_WEIGHT, HAS_SMOOTHING=HAS_SMOOTHING)
        m = tl.load(stats_ptr + row)
        log_d = tl.load(stats_ptr + n_rows + row)
        scale = tl.where(kept, tl.load(grad_scale_ptr) * up, 0.0)
        coef = tl.load(stats_ptr + 2 * n_rows + row)
        _sweep_gradient(x_row, q_row, g_row, weight_ptr, m, log_d, coef, target, c_t, scale, stride_lc, stride_tc,
                        stride_gc, n_cols, smoothing, softcap, PROB_TARGET=PROB_TARGET, HAS_WEIGHT=HAS_WEIGHT,
                        HAS_SMOOTHING=HAS_SMOOTHING, HAS_SOFTCAP=HAS_SOFTCAP, HAS_CLASS_MASS=HAS_CLASS_MASS,
                        BLOCK=BLOCK)


@triton.jit
def scale_kernel(grad_ptr, stride_gn, stride_gs, stride_gc, upstream_ptr, stride_un, stride_us, n_inner, n_cols,
                 BLOCK: tl.constexpr):
    """grad[row] *= upstream[row] in place, for ``inplace_backward`` (the logits are gone, so the gradient the
    forward kernel wrote over them is rescaled: a second rounding in half precision).

    The upstream value is read on the device; where it is exactly 1 nothing is loaded or stored.
    """
    row = tl.program_id(0).to(tl.int64)
    up = tl.load(upstream_ptr + row_offset(row, n_inner, stride_un, stride_us)).to(tl.float32)
    if up != 1.0:
        g_row = grad_ptr + row_offset(row, n_inner, stride_gn, stride_gs)
        cols = tl.arange(0, BLOCK)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            g = tl.load(g_row + offs * stride_gc, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + offs * stride_gc, (g * up).to(grad_ptr.dtype.element_ty), mask=mask)
