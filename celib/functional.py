"""Differentiable losses with the names, arguments and semantics of ``torch.nn.functional``.

Each function checks its arguments (raising :class:`celib.InputError` with a
fix instead of a device-side assert), then computes the loss with PyTorch
operations, so autograd provides the gradient. :func:`cross_entropy` can
instead run celib's fused Triton kernel (``backend="triton"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from celib import _backend, _reduction, kernels, validate
from celib.errors import InputError

__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy", "focal_loss",
           "kl_div", "nll_loss", "sigmoid_focal_loss"]

def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    backend: str = "auto",
    check_inputs: bool = True,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Cross-entropy between logits and class indices or class probabilities.

    A drop-in for :func:`torch.nn.functional.cross_entropy`: the same
    arguments in the same positions (the deprecated ``size_average`` and
    ``reduce`` included, mapped as PyTorch maps them, with its warning), and,
    with the default keyword-only options, PyTorch's result and gradient.

    Args:
        input: logits (unnormalised scores), float16/bfloat16/float32/float64, of
            shape (C,), (N, C) or (N, C, d1, ..., dk). The class dimension is
            dim 1 (dim 0 for a 1-D input).
        target: either class indices, an integer tensor of shape (), (N,) or
            (N, d1, ..., dk) with values in [0, C-1] or ``ignore_index``
            (int64 as PyTorch wants; other integer dtypes are accepted and
            cast); or class probabilities, a float tensor of the input's shape.
        weight: optional float tensor of shape (C,), a rescaling per class
            (negative values allowed, as in PyTorch). A dtype other than the
            input's is accepted: the torch backend casts it to the input's
            dtype, the kernel reads it in float32.
        size_average: PyTorch's deprecated argument (bool or None); when it or
            ``reduce`` is set, the pair overrides ``reduction``, as in PyTorch.
        reduce: PyTorch's deprecated argument (bool or None), with ``size_average``.
        ignore_index: a target value whose positions contribute no loss and no
            gradient (index targets only).
        reduction: ``"none"`` (loss per position, shape of the batch),
            ``"sum"``, or ``"mean"``: the sum divided by the summed weights of
            the kept targets (by the number of positions for probability
            targets). If every target is ignored the mean is nan, as in PyTorch.
        label_smoothing: in [0, 1]; the target becomes
            :math:`(1-\alpha)\,y + \alpha/C`, with PyTorch's exact treatment of
            weights and ignored positions.
        backend: ``"torch"`` (PyTorch operations), ``"triton"`` (celib's fused
            kernel; on CPU tensors it runs under Triton's interpreter, slowly),
            or ``"auto"``: the kernel for CUDA tensors when triton is installed
            and the kernel applies, PyTorch otherwise. ``"auto"`` never picks the
            interpreter, nor the kernel for a probability target that requires
            a gradient (the kernel gives the target none). One known
            difference: where a class with a ``-inf`` logit gets target mass 0
            or class weight 0 (a probability target, or label smoothing),
            PyTorch forms 0 * -inf = nan; the kernel counts the term as 0 and
            gives the finite loss.
        check_inputs: validate target values (a class index outside [0, C-1]
            raises :class:`celib.InputError`). This reads the target and
            synchronises with the GPU once per call; ``False`` skips it (the
            Triton kernel then gives a wrong index's row a nan loss). Under
            ``torch.compile`` it is skipped too (a host read would break the
            graph; see :func:`celib.validate.check_target_range`).
        z_loss: coefficient ``c`` of the z-loss (PaLM): ``c * lse**2`` is added
            to the loss of every kept position, not multiplied by ``weight``,
            and divided by the same denominator as the cross-entropy under
            ``"mean"``.
        softcap: if set to ``s``, logits become ``s * tanh(logits / s)``
            (Gemma 2's soft-capping) before anything else.
        return_lse: also return the per-position log-sum-exp (float32, the batch
            shape, detached: no gradient flows through it on any backend), as a
            tuple ``(loss, lse)``.
        inplace_backward: Triton kernel only: write the gradient over the
            logits' storage to save memory; the input's values are destroyed
            (and on a leaf tensor its ``.grad`` is that same memory: pass a
            model's output, not a parameter). Logits whose elements overlap
            (``expand``) raise ``InputError``; logits that the op producing them
            saved for its own backward (``exp``, ``softmax``, ...) make that
            backward raise autograd's in-place error. The PyTorch path ignores it.
            The kernel's backward has no double backward: ``create_graph=True``
            raises ``InputError`` (use ``backend="torch"`` there).
        loss_dtype: dtype of the returned loss; ``None`` gives PyTorch's: the
            input's dtype, promoted with a probability target's.
            ``torch.float32`` returns a float32 loss for half inputs,
            computed in float32 on every backend: the kernel always computes in
            float32; the torch backend then works on a float32 copy of the
            logits (N x C x 4 bytes more memory, and its gradient). Under ``torch.autocast``
            half-precision logits give a float32 loss, as autocast's ``cross_entropy`` does, with the
            class weights kept in float32, on every backend.

    Returns:
        The loss (0-dim unless ``reduction="none"``), and the lse if asked.

    Raises:
        InputError: on any invalid argument, with the fix in the message.

    Example:
        >>> import torch, celib
        >>> logits = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.0]])
        >>> target = torch.tensor([0, 1])
        >>> round(celib.cross_entropy(logits, target).item(), 4)
        0.3069
        >>> torch.allclose(celib.cross_entropy(logits, target),
        ...                torch.nn.functional.cross_entropy(logits, target))
        True
        >>> celib.cross_entropy(logits, torch.tensor([0, 3]))
        Traceback (most recent call last):
        ...
        celib.errors.InputError: ...
    """
    _backend.check(backend)  # here: a probability target that requires a gradient skips use_kernel
    validate.check_loss_dtype(loss_dtype)
    reduction = validate.legacy_reduction(size_average, reduce, reduction)
    options = validate.cross_entropy_options(input, target, weight, ignore_index, reduction, label_smoothing,
                                             z_loss, softcap)
    index_target = validate.is_index_target(target)
    if index_target and check_inputs:
        validate.check_target_range(target, validate.num_classes(input), ignore_index)
    if input.dtype in (torch.float16, torch.bfloat16) and _backend.autocast_on(input.device.type):
        loss_dtype = loss_dtype or torch.float32  # autocast runs cross_entropy in float32, on every backend
    soft_target_grad = torch.is_grad_enabled() and target.requires_grad
    if soft_target_grad and backend == "triton":
        raise InputError("the Triton kernel gives no gradient to a probability target, and this target requires "
                         "one; use backend='torch' (or 'auto', which then uses it), or pass target.detach().")
    if not soft_target_grad and _backend.use_kernel(backend, input):
        return kernels._cross_entropy(input, target, options, return_lse=return_lse,
                                      inplace_backward=inplace_backward, loss_dtype=loss_dtype)
    if index_target and target.dtype != torch.int64:
        target = target.long()
    if loss_dtype is not None and loss_dtype.is_floating_point and torch.finfo(loss_dtype).bits > torch.finfo(
            input.dtype).bits:
        input = input.to(loss_dtype)  # computed in loss_dtype, as the kernel computes in float32
    if weight is not None and weight.dtype != input.dtype:
        weight = weight.to(input.dtype)  # PyTorch wants one dtype; the kernel takes any (it computes in float32)
    logits = input if softcap is None else softcap * torch.tanh(input / softcap)
    loss = F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    lse = None
    if z_loss or return_lse:
        # float32 for half inputs, float64 for float64 (the z-loss is computed in it; return_lse gives float32)
        lse = torch.logsumexp(logits.to(_reduction.accumulator(logits.dtype)), dim=0 if input.dim() == 1 else 1)
    if z_loss:
        loss = loss + _z_term(z_loss, lse, target, weight, ignore_index, reduction).to(loss.dtype)
    if loss_dtype is not None:
        loss = loss.to(loss_dtype)
    return (loss, lse.float().detach()) if return_lse else loss


def _z_term(
    z_loss: float,
    lse: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    """``z_loss * lse**2`` over kept positions, reduced like the cross-entropy it is added to."""
    if validate.is_index_target(target):
        kept = target != ignore_index
        denominator = _reduction.kept_weight(target, weight, ignore_index, lse.dtype).sum()
    else:
        kept = torch.ones_like(lse, dtype=torch.bool)
        denominator = torch.tensor(float(lse.numel()), dtype=lse.dtype, device=lse.device)
    lse = torch.where(kept, lse, torch.zeros_like(lse))  # an ignored row's lse may be -inf: 0, not inf * 0
    return _reduction.reduce(z_loss * lse.square(), reduction, denominator)


def nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of class indices, given log-probabilities.

    A drop-in for :func:`torch.nn.functional.nll_loss` (its arguments in its
    positions, the deprecated ``size_average``/``reduce`` included): ``input`` holds
    log-probabilities (e.g. from ``log_softmax``) of shape (C,), (N, C) or
    (N, C, d1, ..., dk); ``target`` holds class indices of shape (), (N,) or
    (N, d1, ..., dk). The loss of a position is ``-weight[t] * input[t]``;
    ``"mean"`` divides by the summed weights of the kept targets.

    Raises:
        InputError: on any invalid argument, including a class index outside
            [0, C-1] that is not ``ignore_index``.
    """
    reduction = validate.legacy_reduction(size_average, reduce, reduction)
    validate.check_classification_args(input, target, weight, reduction, allow_probabilities=False)
    validate.check_target_range(target, validate.num_classes(input), ignore_index)
    if weight is not None and weight.dtype != input.dtype:
        weight = weight.to(input.dtype)  # as cross_entropy: PyTorch wants the input's dtype
    return F.nll_loss(input, target.long(), weight, ignore_index=ignore_index, reduction=reduction)


def _check_elementwise(input: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
    validate.check_floating("input", input)
    if not isinstance(target, torch.Tensor):
        raise InputError(f"target must be a torch.Tensor, got {type(target).__name__}.")
    if not target.is_floating_point():
        raise InputError(f"target must be a float tensor of 0s and 1s (or soft labels), got {target.dtype}; use target.float().")
    validate.check_same_shape(input, target)
    validate.check_reduction(reduction)


def _check_broadcast(name: str, tensor: torch.Tensor | None, shape: torch.Size) -> None:
    if tensor is None:
        return
    validate.check_floating(name, tensor)
    try:
        torch.broadcast_shapes(tensor.shape, shape)
    except RuntimeError:
        raise InputError(f"{name} of shape {tuple(tensor.shape)} does not broadcast to the input's shape {tuple(shape)}.") from None


def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary cross-entropy between predicted probabilities and targets.

    A drop-in for :func:`torch.nn.functional.binary_cross_entropy` (its
    arguments in its positions, the deprecated ``size_average``/``reduce``
    included). ``input``
    holds probabilities in [0, 1] (any shape, float); ``target`` has the same
    shape, values in [0, 1]. Each log is clamped at -100, as PyTorch does, so a
    probability of exactly 0 or 1 on the wrong side costs 100, not infinity.
    Prefer :func:`binary_cross_entropy_with_logits`, which never rounds a
    probability: it is accurate to rounding in absolute terms (a tiny loss, as
    for a confident correct negative, may come out as 0).

    Raises:
        InputError: input outside [0, 1] (it names ``..._with_logits`` as the
            fix), target outside [0, 1] (it names the conversion of -1/1
            labels), shape mismatch, bad reduction.
    """
    reduction = validate.legacy_reduction(size_average, reduce, reduction)
    _check_elementwise(input, target, reduction)
    _check_broadcast("weight", weight, input.shape)
    validate.check_probabilities("input", input, "If these are logits, use binary_cross_entropy_with_logits instead.")
    validate.check_probabilities(
        "target", target, "Labels of -1 and 1? Convert them with (s + 1) / 2 (the logits version does not check targets)."
    )
    return F.binary_cross_entropy(input, target, weight, reduction=reduction)


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Sigmoid and binary cross-entropy in one numerically stable step.

    A drop-in for :func:`torch.nn.functional.binary_cross_entropy_with_logits`
    (its arguments in its positions, the deprecated ``size_average``/``reduce``
    included). ``input`` holds logits (any shape, float); ``target`` the same shape, in
    [0, 1]. The loss of an element is

    .. math::

        -w\,[\,p_c\,y \log\sigma(x) + (1-y)\log(1-\sigma(x))],

    with ``pos_weight`` (:math:`p_c`, broadcast over the last dimension: one entry
    per class for multi-label) scaling the positive term.
    """
    reduction = validate.legacy_reduction(size_average, reduce, reduction)
    _check_elementwise(input, target, reduction)
    _check_broadcast("weight", weight, input.shape)
    _check_broadcast("pos_weight", pos_weight, input.shape)
    return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    log_target: bool = False,
) -> torch.Tensor:
    """Kullback-Leibler divergence KL(target || exp(input)), pointwise then reduced.

    A drop-in for :func:`torch.nn.functional.kl_div` (its arguments in its
    positions, the deprecated ``size_average``/``reduce`` included). ``input`` holds
    log-probabilities of the model (any shape); ``target`` the same shape,
    probabilities (or log-probabilities when ``log_target=True``).
    ``reduction="batchmean"`` (sum divided by ``input.shape[0]``) is the true KL
    per example; ``"mean"`` divides by the number of elements, as PyTorch does
    (and warns about).
    """
    reduction = validate.legacy_reduction(size_average, reduce, reduction)
    validate.check_floating("input", input)
    validate.check_floating("target", target)
    validate.check_same_shape(input, target)
    validate.check_reduction(reduction, ("none", "mean", "sum", "batchmean"))
    return F.kl_div(input, target, reduction=reduction, log_target=log_target)


def _check_gamma(gamma: float) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise InputError(f"gamma must be a number >= 0, got {type(gamma).__name__}.")
    if gamma < 0:
        raise InputError(f"gamma must be >= 0, got {gamma}.")


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> torch.Tensor:
    r"""Focal loss on independent sigmoids (RetinaNet; Lin et al. 2017).

    The semantics of :func:`torchvision.ops.sigmoid_focal_loss`: per element
    :math:`\alpha_t (1-p_t)^\gamma \cdot \mathrm{BCE}(x, y)` with
    :math:`p_t = p y + (1-p)(1-y)` and :math:`\alpha_t = \alpha y + (1-\alpha)(1-y)`;
    ``alpha < 0`` drops the alpha factor. Note the default ``reduction="none"``.

    The modulating factor is computed as :math:`\exp(\gamma \log(1 - p_t))` with
    :math:`\log(1 - p_t)` from log-sigmoids, so the loss and its gradient stay
    finite at any finite logit, for every ``gamma >= 0`` (torchvision's literal
    ``(1 - p_t) ** gamma`` gives a nan gradient once :math:`p_t` rounds to 1 with
    ``gamma < 1``). Targets get a gradient through the BCE term and
    :math:`\alpha_t`, not through the modulating factor.

    Args:
        inputs: logits, float, any shape.
        targets: same shape, 0/1 (or soft) labels in [0, 1] (checked: reads
            the targets, so a device synchronisation, skipped under
            ``torch.compile``).
    """
    _check_elementwise(inputs, targets, reduction)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise InputError(f"alpha must be a number (a negative one drops the alpha factor), got {type(alpha).__name__}; "
                         f"the positions are torchvision's: sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction).")
    _check_gamma(gamma)
    validate.check_probabilities("targets", targets, "Labels in {-1, 1} map to {0, 1} with (targets + 1) / 2.")
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    # (1 - p_t)^gamma as exp(gamma * log(1 - p_t)), with 1 - p_t = y sigma(-x) + (1 - y) sigma(x) in log
    # form: finite, with a finite gradient, for every finite logit. The literal (1 - p_t) ** gamma is 0 when
    # p_t rounds to 1, and its derivative gamma (1 - p_t)^(gamma - 1) is then inf for gamma < 1: 0 * inf = nan.
    with torch.no_grad():
        log_y, log_1my = torch.log(targets), torch.log1p(-targets)  # -inf for hard 0/1 labels: fine in logaddexp
    log_1m_pt = torch.logaddexp(log_y + F.logsigmoid(-inputs), log_1my + F.logsigmoid(inputs))
    loss = ce * torch.exp(gamma * log_1m_pt) if gamma else ce
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    count = torch.tensor(float(loss.numel()), dtype=_reduction.accumulator(loss.dtype), device=loss.device)
    return _reduction.reduce(loss, reduction, count)


def focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    gamma: float = 2.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Multi-class (softmax) focal loss: :math:`-w_t\,(1-p_t)^\gamma \log p_t`.

    It has no PyTorch counterpart. Like :func:`cross_entropy` it takes ``input``
    logits (C,), (N, C) or (N, C, d1, ..., dk), ``target`` int class indices of
    the batch shape (no probability targets) and the class ``weight`` third, so
    ``focal_loss(x, t, w)`` means what ``cross_entropy(x, t, w)`` means; every
    other argument, ``gamma`` first, is keyword-only. ``weight`` plays the role
    of the paper's :math:`\alpha_t`.
    ``"mean"`` divides by the summed weights of the kept targets, so with
    ``gamma=0`` this is :func:`cross_entropy`, weights and ignore_index
    included.

    Example:
        >>> import torch, celib
        >>> logits, target = torch.tensor([[3.0, 0.0, -1.0]]), torch.tensor([0])
        >>> plain = celib.cross_entropy(logits, target)
        >>> bool(celib.focal_loss(logits, target, gamma=0.0) == plain)
        True
        >>> round(celib.focal_loss(logits, target, gamma=2.0).item(), 6)
        0.000268
    """
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise InputError(f"weight must be a tensor of shape (C,) or None, got {weight!r}; gamma is keyword-only: "
                         f"focal_loss(input, target, gamma={weight!r}).")
    validate.check_classification_args(input, target, weight, reduction, allow_probabilities=False)
    _check_gamma(gamma)
    class_dim = 0 if input.dim() == 1 else 1
    validate.check_target_range(target, input.shape[class_dim], ignore_index)
    target = target.long()
    kept = target != ignore_index
    safe = torch.where(kept, target, torch.zeros_like(target))
    logp_t = F.log_softmax(input, dim=class_dim).gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    # an ignored row reads the placeholder class 0: 0 there, so that a -inf logit gives no 0 * inf = nan
    logp_t = torch.where(kept, logp_t, torch.zeros_like(logp_t))
    w_t = _reduction.kept_weight(target, weight, ignore_index, input.dtype)
    loss = -w_t * logp_t
    if gamma:
        # 1 - p_t as -expm1(log p_t): no cancellation of its own (log p_t's absolute error, ~eps from rounding the
        # normaliser near 1, limits its relative accuracy when 1 - p_t is tiny); clamped so (1 - p_t)**gamma stays
        # differentiable at p_t = 1.
        one_minus_p = (-torch.expm1(logp_t)).clamp_min(torch.finfo(input.dtype).tiny)
        loss = loss * one_minus_p**gamma
    loss = torch.where(kept, loss, torch.zeros_like(loss))
    return _reduction.reduce(loss, reduction, w_t.sum(dtype=_reduction.accumulator(w_t.dtype)))
