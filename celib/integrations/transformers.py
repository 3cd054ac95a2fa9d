"""Hugging Face transformers: causal language models that compute their loss with celib.

One call, on a model built or loaded as usual::

    from celib.integrations.transformers import apply_celib
    model = apply_celib(AutoModelForCausalLM.from_pretrained(...))  # the loss on the logits
    model = apply_celib(model, fused_linear=True)  # on the hidden states: no (B, T, V) logits

With the same semantics as the model's own loss (transformers' ``ForCausalLMLoss``): the labels are
shifted (position t predicts label t + 1) unless the batch carries ``shift_labels``; -100 marks
positions to skip; ``num_items_in_batch`` (passed by ``Trainer`` under gradient accumulation) makes
the loss a sum divided by that count. The model's ``loss_type`` is left as it is, which matters:
``Trainer`` counts ``num_items_in_batch`` over the shifted labels only while ``loss_type`` names
transformers' causal-LM loss, so registering another loss there silently changes the normalisation.

transformers is imported only when a model is adapted (install celib with its extra:
``pip install ".[transformers]"``); it needs transformers >= 5.0 and is tested with 5.24.0.
``benchmarks/hf_equality.py``, ``hf_trainer_accumulation.py`` and ``hf_memory.py`` measure it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from celib.errors import InputError
from celib.functional import cross_entropy
from celib.linear import linear_cross_entropy

MIN_TRANSFORMERS = (5, 0)

#: Model types whose causal-LM ``forward`` applies nothing to the logits after the output layer
#: but (Gemma 2) a soft-cap, which the fused loss applies itself. Each one is tested against the
#: stock model; ``fused_linear=True`` refuses other types, whose heads may scale the logits.
FUSED_MODEL_TYPES = ("gemma2", "gpt2", "llama", "mistral", "qwen2", "qwen3")

__all__ = ["FUSED_MODEL_TYPES", "apply_celib", "causal_lm_loss", "remove_celib", "shift_labels"]


def _transformers():
    import transformers

    from celib._versions import require

    require("transformers", transformers.__version__, MIN_TRANSFORMERS)
    return transformers


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The targets of a causal language model: ``labels`` moved one position left.

    Position t of the result is ``labels[..., t + 1]``; the last position, which has no next
    token, is ``ignore_index``. This is what transformers' ``ForCausalLMLoss`` does.

    Args:
        labels: integer tensor (B, T) (or any shape whose last dimension is the sequence).
        ignore_index: the value written at the last position.

    Returns:
        An integer tensor of the shape and dtype of ``labels``.

    Example:
        >>> import torch
        >>> from celib.integrations.transformers import shift_labels
        >>> shift_labels(torch.tensor([[5, 6, 7, -100]]))
        tensor([[   6,    7, -100, -100]])
    """
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    # transformers upcasts the logits to float32; float64 stays float64 here (stock casts it down)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(loss_sum_or_mean: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss_sum_or_mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum_or_mean.device)
    return loss_sum_or_mean / num_items_in_batch


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    **kwargs: Any,
) -> torch.Tensor:
    """The loss of a causal language model, computed by :func:`celib.cross_entropy`.

    A drop-in for transformers' ``ForCausalLMLoss`` (same arguments, same result): the labels are
    shifted here, so an adapter built on it cannot forget the shift.

    Args:
        logits: (B, T, V), any floating dtype; the loss is computed in float32 (float64 for float64
            logits, where transformers would compute in float32).
        labels: (B, T) token ids, -100 (``ignore_index``) where there is nothing to predict; ignored
            when ``shift_labels`` is given.
        vocab_size: V, checked against the logits when given.
        num_items_in_batch: if given, the summed loss is divided by it (the number of target tokens in
            all micro-batches of an accumulated step) instead of averaged over this batch's targets.
        ignore_index: the label value that contributes nothing.
        shift_labels: (B, T) targets already shifted (a padding-free collator's), used as they are.
        backend: as in :func:`celib.cross_entropy`.
        **kwargs: other keywords transformers passes to loss functions; ignored, as the stock loss
            ignores them.

    Returns:
        A 0-dim tensor in float32 (float64 for float64 logits).
    """
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise InputError(f"logits have {logits.shape[-1]} classes in their last dimension but "
                         f"vocab_size is {vocab_size}.")
    if shift_labels is None:
        if labels.shape != logits.shape[:-1]:
            raise InputError(f"labels of shape {tuple(labels.shape)} do not match logits of shape "
                             f"{tuple(logits.shape)}: labels must be (B, T) for (B, T, V) logits "
                             f"(with logits_to_keep, pass shift_labels of the kept positions).")
        targets = _shift(labels, ignore_index)
    else:
        targets = shift_labels
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                         ignore_index=ignore_index, reduction=reduction, backend=backend,
                         loss_dtype=_loss_dtype(logits.dtype))
    return _reduce(loss, num_items_in_batch)


_shift = shift_labels  # the module-level function, which causal_lm_loss's argument hides


def _check_causal_lm(model: torch.nn.Module) -> None:
    transformers = _transformers()
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if not isinstance(model, transformers.PreTrainedModel):
        raise InputError(f"apply_celib takes a transformers PreTrainedModel, got {type(model).__name__}.")
    loss_type = getattr(model, "loss_type", None)
    # an unknown or missing loss_type falls back to the causal-LM loss (PreTrainedModel.loss_function)
    stock = LOSS_MAPPING.get(loss_type, ForCausalLMLoss) if loss_type is not None else ForCausalLMLoss
    if stock is not ForCausalLMLoss or model.get_output_embeddings() is None:
        raise InputError(f"{type(model).__name__} is not a causal language model with transformers' "
                         f"causal-LM loss (loss_type={loss_type!r}); apply_celib handles those only.")
    if getattr(model.config, "is_encoder_decoder", False):
        raise InputError("apply_celib handles decoder-only causal language models, not encoder-decoders.")


def apply_celib(
    model: torch.nn.Module,
    *,
    fused_linear: bool = False,
    return_logits: bool | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.nn.Module:
    """Make a transformers causal language model compute its loss with celib.

    Changes this model object only (not its class, not other models), and returns it.

    Args:
        model: a transformers ``PreTrainedModel`` whose loss is the causal-LM loss
            (``...ForCausalLM``, ``GPT2LMHeadModel``, ...).
        fused_linear: ``False``: the model computes its logits as usual and celib the loss on them
            (:func:`causal_lm_loss`; any causal LM). ``True``: when ``labels`` are passed, the loss is
            :func:`celib.linear_cross_entropy` on the output layer's input and weight, and the
            (B, T, V) logits and their gradient never exist (model types in
            :data:`FUSED_MODEL_TYPES` only). Without labels the model runs as before.
        return_logits: with ``fused_linear=True`` and labels: whether the output also carries the
            logits (computed once more for it, which costs the memory the fusion saves). ``None``:
            only when the model is in eval mode, so training skips them and evaluation keeps them.
        backend: as in :func:`celib.cross_entropy` (``"auto"``: the Triton kernel on CUDA).
        chunk_size: rows per chunk of the fused loss (default: :func:`celib.linear.chunk_rows`).

    Returns:
        ``model``, whose ``loss`` output is now celib's. :func:`remove_celib` undoes it.

    Raises:
        InputError: not a causal LM; ``fused_linear=True`` for a model type it is not tested on.
        ImportError: transformers missing or older than 5.0.
    """
    _check_causal_lm(model)
    remove_celib(model)
    model.loss_function = functools.partial(causal_lm_loss, backend=backend)  # loss_type stays as it was
    if not fused_linear:
        return model
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        raise InputError(f"fused_linear=True is tested on model types {', '.join(FUSED_MODEL_TYPES)}, not "
                         f"{model_type!r}, whose forward may change the logits after the output layer; "
                         f"use fused_linear=False (the loss on the logits works for every causal LM).")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise InputError(f"the output layer is a {type(head).__name__}, not an nn.Linear; "
                         f"use fused_linear=False.")
    forward = model.forward
    softcap = getattr(model.config, "final_logit_softcapping", None)

    signature = inspect.signature(forward)

    @functools.wraps(forward)  # Trainer reads the signature (its **kwargs) through __wrapped__
    def fused_forward(*args: Any, **kwargs: Any):
        kwargs = _as_keywords(signature, args, kwargs)
        labels = kwargs.pop("labels", None)
        if labels is None:  # as the stock model: no labels, no loss (shift_labels alone are ignored)
            return forward(**kwargs)
        targets = kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "use_return_dict", getattr(model.config, "return_dict", True))
        keep_logits = (not model.training) if return_logits is None else return_logits
        captured: dict[str, torch.Tensor] = {}

        def capture(hidden: torch.Tensor) -> torch.Tensor:
            captured["hidden"] = hidden
            return head.__class__.forward(head, hidden) if keep_logits else hidden[..., :0]

        head.forward = capture  # for this call only: the model's forward gives the head's input here
        try:
            output = forward(**kwargs, return_dict=True)
        finally:
            del head.forward
        hidden = captured["hidden"]
        if targets is None:
            if labels.shape != hidden.shape[:-1]:
                raise InputError(f"labels of shape {tuple(labels.shape)} do not match the "
                                 f"{tuple(hidden.shape[:-1])} positions the output layer sees "
                                 f"(logits_to_keep with labels needs shift_labels of the kept positions).")
            targets = _shift(labels, ignore_index)
        loss = linear_cross_entropy(
            hidden, head.weight, targets.to(hidden.device), linear_bias=head.bias, ignore_index=ignore_index,
            reduction="mean" if num_items is None else "sum", softcap=softcap, chunk_size=chunk_size,
            backend=backend, loss_dtype=_loss_dtype(hidden.dtype))
        fields = dict(output.items())  # a new output: ModelOutput keeps a key set to None in its tuple view
        fields["loss"] = _reduce(loss, num_items)
        if not keep_logits:
            fields.pop("logits", None)
        output = type(output)(**fields)
        return output if return_dict else output.to_tuple()

    fused_forward._celib_original = forward  # type: ignore[attr-defined]
    model.forward = fused_forward
    return model


def _as_keywords(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (positional ones included), the **kwargs flattened into them."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    extra = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    return {**{k: v for k, v in bound.items() if k != extra}, **bound.get(extra, {})}


def remove_celib(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_celib`: the model computes its stock loss again. Returns ``model``."""
    if "_loss_function" in vars(model):
        del model._loss_function
    forward = vars(model).get("forward")
    if forward is not None and hasattr(forward, "_celib_original"):
        del model.forward
    return model
