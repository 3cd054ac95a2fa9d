"""Name the usual mistakes in the inputs to a classification loss, and their fixes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from celib.errors import InputError

__all__ = ["Finding", "diagnose"]


@dataclass(frozen=True)
class Finding:
    """One problem found by :func:`diagnose`.

    Attributes:
        code: a short stable identifier, e.g. ``"softmax-before-cross-entropy"``.
        message: what looks wrong, with the numbers that show it.
        fix: what to change in the calling code.
    """

    code: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}\n    fix: {self.fix}"


def _is_binary_setup(input: torch.Tensor, target: torch.Tensor) -> bool:
    """Elementwise 0/1 targets of the input's shape that are not one-hot rows: a BCE-style call."""
    if target.shape != input.shape or not target.is_floating_point() or target.numel() == 0:
        return False
    if not bool(((target == 0) | (target == 1)).all()):
        return False
    if input.dim() == 1:
        return True
    return not bool((target.sum(dim=1) == 1).all())


def _looks_like_probabilities(x: torch.Tensor, class_dim: int | None) -> bool:
    """All values in [0, 1] and, when ``class_dim`` is given, summing to 1 along it."""
    if x.numel() == 0 or not bool(((x >= 0) & (x <= 1)).all()):
        return False
    if class_dim is None:
        return True
    return bool(torch.allclose(x.double().sum(dim=class_dim), torch.ones((), dtype=torch.float64), atol=1e-3))


def diagnose(input: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
             inputs: torch.Tensor | None = None) -> list[Finding]:
    """Check a (logits, target) pair for the mistakes learners make with cross-entropy losses.

    Args:
        input: what would be passed as ``input`` to :func:`celib.cross_entropy`
            (logits (N, C) or (N, C, d1, ..., dk)), or to
            :func:`celib.binary_cross_entropy_with_logits` (logits with a target
            of 0/1 values of the same shape).
        target: the matching target.
        ignore_index: the target value that marks positions to skip.
        inputs: for a language model, the token ids it was fed at the positions of
            ``target`` (the same shape). Targets equal to them mean labels that
            were not shifted to the next token.

    Returns:
        A list of :class:`Finding` (empty when the inputs look right). The
        checks read the data, so call this while debugging, not in every step.

    Example:
        >>> import torch, celib
        >>> probabilities = torch.softmax(torch.randn(4, 3), dim=1)
        >>> findings = celib.diagnose(probabilities, torch.tensor([0, 2, 1, 0]))
        >>> [f.code for f in findings]
        ['softmax-before-cross-entropy']
    """
    input, target = torch.as_tensor(input), torch.as_tensor(target)
    findings = _check_finite(input)
    if input.dim() > 0 and not input.is_floating_point():
        return [Finding(
            "input-dtype",
            f"input has dtype {input.dtype}: a loss takes floating-point logits (scores), and "
            "cross_entropy refuses an integer tensor.",
            "pass the model's floating-point output; an integer input is often predicted classes "
            "(an argmax) where the scores were meant.",
        )]
    if input.dim() == 0:
        return findings
    if input.numel() == 0:
        return findings + _check_empty(input, target)
    if _is_binary_setup(input, target):
        return findings + _check_binary(input)
    class_dim = 0 if input.dim() == 1 else 1
    findings += _check_logits(input, class_dim)
    if target.is_floating_point():
        return findings + _check_float_target(input, target, class_dim)
    findings += _check_index_target(input, target, class_dim, ignore_index)
    if inputs is not None and not any(f.code in _STOP for f in findings):
        findings += _labels_not_shifted(target, torch.as_tensor(inputs), ignore_index)
    return findings


# Findings after which the later checks would read the target wrongly (or not at all).
_STOP = {"one-hot-target", "class-dim-last", "target-shape", "all-ignored"}


def _check_finite(input: torch.Tensor) -> list[Finding]:
    if not input.is_floating_point():
        return []
    bad = int((torch.isnan(input) | (input == float("inf"))).sum())
    if not bad:
        return []
    return [Finding(
        "non-finite-input",
        f"input holds {bad} NaN or +Inf value(s): the gradient of the logits at their positions is NaN, "
        "ignored positions included, and so is that of every parameter those values depend on; at a kept "
        "position the loss is NaN too, and so is a mean or sum over the batch.",
        "find where they appear (torch.autograd.set_detect_anomaly(True), or check activations layer by layer); "
        "the usual causes are a learning rate that is too high, log(0) in a hand-written loss, or bad data.",
    )]


def _check_empty(input: torch.Tensor, target: torch.Tensor) -> list[Finding]:
    """An input with no elements: no positions (an empty batch) or no classes."""
    class_dim = 0 if input.dim() == 1 else 1
    if input.shape[class_dim] == 0 and target.numel() > 0:
        return [Finding(
            "no-classes",
            f"input {tuple(input.shape)} has no classes (C = 0) for {target.numel()} target(s): there is "
            "nothing to take a softmax over, and every class index is out of range.",
            "check the model's output layer (its number of outputs) and which dimension holds the classes.",
        )]
    if target.numel() == 0:
        return [Finding(
            "empty-batch",
            "the batch has no positions: a mean over it divides 0 by 0 and is NaN.",
            "skip empty batches, or sum the loss (reduction='sum') and divide by max(number of targets, 1).",
        )]
    return [Finding(
        "target-shape",
        f"target shape {tuple(target.shape)} does not fit input shape {tuple(input.shape)}, which has no "
        "positions.",
        "give one class index per position: the input's shape without its class dimension.",
    )]


def _check_binary(input: torch.Tensor) -> list[Finding]:
    """A BCE-style call (0/1 targets of the input's shape)."""
    if not (_looks_like_probabilities(input, None) and input.numel() > 1):
        return []
    return [Finding(
        "probabilities-to-bce-with-logits",
        "every input value lies in [0, 1]: these look like probabilities (sigmoid already applied), "
        "but binary_cross_entropy_with_logits applies the sigmoid itself.",
        "pass the raw logits (remove the final torch.sigmoid), or use binary_cross_entropy on probabilities.",
    )]


def _check_logits(input: torch.Tensor, class_dim: int) -> list[Finding]:
    """Logits that cannot be logits: one class, or rows that are already probabilities."""
    if input.shape[class_dim] == 1:
        return [Finding(
            "single-logit",
            "input has a single class (C = 1): softmax over one logit is always 1, so cross-entropy is always 0 "
            "and nothing is learned.",
            "for a binary problem use binary_cross_entropy_with_logits(input.squeeze(1), target.float()); "
            "or give the model 2 outputs and keep cross_entropy.",
        )]
    if _looks_like_probabilities(input, class_dim):
        return [Finding(
            "softmax-before-cross-entropy",
            "every row of input lies in [0, 1] and sums to 1: softmax was applied before cross_entropy, which "
            "applies log_softmax itself. The loss is squashed and gradients shrink.",
            "pass the raw logits (remove the softmax); use log_softmax + nll_loss only if you need log-probabilities.",
        )]
    return []


def _check_float_target(input: torch.Tensor, target: torch.Tensor, class_dim: int) -> list[Finding]:
    """A float target: class probabilities of the input's shape, or a mistake."""
    if target.shape == input.shape:
        return []  # probability targets: valid
    indices_shape = input.shape[:class_dim] + input.shape[class_dim + 1:]
    if target.shape == indices_shape:
        return [Finding(
            "target-dtype",
            f"target has dtype {target.dtype} and the shape of class indices; cross_entropy reads a float "
            "target as class probabilities, which must have the input's shape.",
            "convert the class indices with target.long().",
        )]
    return [Finding(
        "target-shape",
        f"target has dtype {target.dtype} and shape {tuple(target.shape)}, which fits neither input "
        f"shape {tuple(input.shape)} (class probabilities) nor {tuple(indices_shape)} (class indices).",
        "give probabilities of the input's shape, or class indices (target.long()) of the input's shape "
        "without its class dimension.",
    )]


def _check_index_target(input: torch.Tensor, target: torch.Tensor, class_dim: int,
                        ignore_index: int) -> list[Finding]:
    """An integer target: its dtype, its layout, then its values against the logits."""
    findings = []
    if target.dtype != torch.int64:
        findings.append(Finding(
            "target-dtype",
            f"target has dtype {target.dtype}; torch.nn.functional.cross_entropy wants int64 (long) class indices "
            "(uint8 only for (N, C) input).",
            "convert with target.long().",
        ))
    layout = _check_layout(input, target, class_dim)
    if layout:
        return findings + layout
    kept = target != ignore_index
    if not bool(kept.any()):
        return findings + [Finding(
            "all-ignored",
            f"every target is ignore_index={ignore_index}: reduction='mean' divides 0 by 0 and gives NaN (the "
            "gradient is 0), as in PyTorch.",
            "skip batches with nothing to learn from, or sum the loss (reduction='sum') and divide by "
            "max(number of kept targets, 1); check that the masking (padding, prompt tokens) is not too wide.",
        )]
    return findings + _check_masks(input, target, class_dim, kept) + _check_range(input, target, class_dim, kept,
                                                                               ignore_index)


def _check_layout(input: torch.Tensor, target: torch.Tensor, class_dim: int) -> list[Finding]:
    """A one-hot target, classes in the last dimension, or a shape that fits nothing."""
    expected = tuple(input.shape[:class_dim] + input.shape[class_dim + 1:])
    if (target.shape == input.shape and input.dim() >= 2 and bool(((target == 0) | (target == 1)).all())
            and bool((target.sum(dim=class_dim) == 1).all())):
        return [Finding(
            "one-hot-target",
            f"target has the input's shape {tuple(input.shape)} and holds one 1 per row: a one-hot encoding, "
            "where cross_entropy expects class indices.",
            "pass target.argmax(dim=1); or target.float() if you really mean class probabilities.",
        )]
    if input.dim() >= 3 and tuple(target.shape) == tuple(input.shape[:-1]) and tuple(target.shape) != expected:
        return [Finding(
            "class-dim-last",
            f"input {tuple(input.shape)} with target {tuple(target.shape)}: the classes are in the last dimension, "
            "but cross_entropy reads them from dim 1.",
            f"use input.movedim(-1, 1), or flatten: input.reshape(-1, {input.shape[-1]}) with target.reshape(-1). "
            "Do not use input.reshape(N, C, T): that scrambles the values.",
        )]
    if tuple(target.shape) != expected:
        return [Finding(
            "target-shape",
            f"target shape {tuple(target.shape)} does not fit input shape {tuple(input.shape)}: expected {expected}.",
            "give one class index per position: the input's shape without its class dimension.",
        )]
    return []


def _check_masks(input: torch.Tensor, target: torch.Tensor, class_dim: int, kept: torch.Tensor) -> list[Finding]:
    """Positions whose every logit is -inf, and kept positions whose target's logit is -inf."""
    findings = []
    logits = input.movedim(class_dim, -1)
    masked = (logits == float("-inf")).all(dim=-1)
    if bool(masked.any()):
        findings.append(Finding(
            "all-masked-position",
            f"{int(masked.sum())} position(s) have every logit -Inf ({int((masked & kept).sum())} of them kept): "
            "softmax there is 0/0, so their logit gradient is NaN, ignored or not, and a kept one's loss too.",
            "keep a finite logit at every position, ignored ones included: fill a padded position's logits "
            "with 0 (or mask with a large finite negative number instead of -inf) and give it ignore_index.",
        ))
    safe = torch.where(kept, target, 0).long().clamp(0, logits.shape[-1] - 1)
    masked_target = (logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) == float("-inf")) & kept & ~masked
    if bool(masked_target.any()):
        findings.append(Finding(
            "masked-target",
            f"{int(masked_target.sum())} kept position(s) have a -Inf logit at their target class: their loss "
            "is +Inf (the model is told the right answer is impossible).",
            "do not mask a class that a target names (check the vocabulary mask and the labels), or give those "
            "positions ignore_index.",
        ))
    return findings


def _check_range(input: torch.Tensor, target: torch.Tensor, class_dim: int, kept: torch.Tensor,
                 ignore_index: int) -> list[Finding]:
    num_classes = input.shape[class_dim]
    out_of_range = ((target < 0) | (target >= num_classes)) & kept
    if not bool(out_of_range.any()):
        return []
    values = sorted({int(v) for v in target[out_of_range].unique()[:5]})
    return [Finding(
        "target-out-of-range",
        f"target holds class indices {values} outside [0, {num_classes - 1}] for {num_classes} classes.",
        "check the label encoding (labels starting at 1 need target - 1), the model's number of outputs, and "
        f"that padding uses ignore_index={ignore_index}.",
    )]


def _labels_not_shifted(target: torch.Tensor, inputs: torch.Tensor, ignore_index: int) -> list[Finding]:
    if inputs.shape != target.shape:
        raise InputError(f"inputs of shape {tuple(inputs.shape)} must have the target's shape "
                         f"{tuple(target.shape)}: the token ids fed at the target's positions.")
    kept = target != ignore_index
    copies, total = int(((target == inputs.to(target.device)) & kept).sum()), int(kept.sum())
    # natural text repeats a token at the next position rarely; a majority of copies is a missing shift
    if total < 4 or 2 * copies < total:
        return []
    return [Finding(
        "labels-not-shifted",
        f"target equals the input token at the same position at {copies} of {total} kept positions: the "
        "labels were not shifted, so the model learns to copy its input (the loss falls towards 0) instead "
        "of predicting the next token.",
        "score position t against token t + 1: logits[:, :-1] with labels[:, 1:], or targets = "
        "celib.integrations.transformers.shift_labels(labels); transformers models (and apply_celib) "
        "shift labels themselves, so pass them labels=input_ids unshifted.",
    )]
