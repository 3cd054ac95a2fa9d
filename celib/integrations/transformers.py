"""Hugging Face transformers: causal language models that compute their loss with celib.

One call, on a model built or loaded as usual::

    from celib.integrations.transformers import apply_celib

    model = AutoModelForCausalLM.from_pretrained(...)
    model = apply_celib(model)  # the loss on the logits
    # or on the hidden states, without the (B, T, V) logits:
    model = apply_celib(model, fused_linear=True)

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
from dataclasses import dataclass
from typing import Any

import torch

from celib._reduction import accumulator
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


def _per_item(loss_sum_or_mean: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """The summed loss over transformers' ``num_items_in_batch``; without it, the mean as it is."""
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
    targets = _targets(labels, shift_labels, logits.shape[:-1], ignore_index)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                         ignore_index=ignore_index, reduction=reduction, backend=backend,
                         loss_dtype=accumulator(logits.dtype))  # float32 as transformers; float64 kept
    return _per_item(loss, num_items_in_batch)


def _targets(labels: torch.Tensor, shifted: torch.Tensor | None, positions: torch.Size,
             ignore_index: int) -> torch.Tensor:
    """The shifted labels, or ``shifted`` when the batch brought them, for the positions scored."""
    if shifted is not None:
        return shifted
    if labels.shape != positions:
        raise InputError(f"labels of shape {tuple(labels.shape)} do not match the {tuple(positions)} "
                         f"positions scored: labels must be (B, T) for (B, T, V) logits (with "
                         f"logits_to_keep, pass shift_labels of the kept positions).")
    return shift_labels(labels, ignore_index)


def _check_causal_lm(model: torch.nn.Module) -> None:
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model, transformers.PreTrainedModel):
        raise InputError(f"apply_celib takes a transformers PreTrainedModel, got {type(model).__name__}.")
    # the classes AutoModelForCausalLM builds: their forward computes the loss with self.loss_function
    if type(model).__name__ not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise InputError(f"{type(model).__name__} is not one of transformers' causal language models (the "
                         f"classes AutoModelForCausalLM builds); apply_celib handles those only.")
    # apply_celib replaces self.loss_function; a forward that computes its loss itself would ignore it
    try:
        source = inspect.getsource(inspect.unwrap(type(model).forward))
    except (OSError, TypeError):  # no source to read: trust the mapping
        source = None
    if source is not None and "self.loss_function" not in source:
        raise InputError(f"{type(model).__name__} computes its loss itself, not with self.loss_function, so "
                         f"apply_celib would change nothing; compute the loss from its logits with "
                         f"celib.integrations.transformers.causal_lm_loss (or celib.cross_entropy) instead.")


@dataclass
class _Fused:
    """What the fused forward of one model needs; stored on the model, so copies of it have their own."""

    return_logits: bool | None
    backend: str
    chunk_size: int | None
    softcap: float | None
    previous_forward: Any  # an instance forward set before apply_celib (accelerate's hooks), or None


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
    ``copy.deepcopy`` of the model keeps the change, acting on the copy's own weights.

    Args:
        model: one of transformers' causal language models (a class ``AutoModelForCausalLM``
            builds: ``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...).
        fused_linear: ``False``: the model computes its logits as usual and celib the loss on them
            (:func:`causal_lm_loss`). ``True``: when ``labels`` are passed, the loss is
            :func:`celib.linear_cross_entropy` on the output layer's input and weight, and the
            (B, T, V) logits and their gradient are not computed (model types in
            :data:`FUSED_MODEL_TYPES` only). Without labels the model runs as before.
        return_logits: with ``fused_linear=True`` and labels: whether the output also carries the
            logits (computed for it, which costs the memory the fusion saves). ``None``: only when
            gradients are off (``torch.no_grad()``, as in evaluation), so that a training step,
            in train or eval mode, skips them.
        backend: as in :func:`celib.cross_entropy` (``"auto"``: the Triton kernel on CUDA).
        chunk_size: rows per chunk of the fused loss (default: :func:`celib.linear.chunk_rows`).

    Returns:
        ``model``, whose ``loss`` output is now celib's. :func:`remove_celib` undoes it.

    Raises:
        InputError: not a causal LM, or one whose forward computes its loss without
            ``self.loss_function`` (BartForCausalLM, WhisperForCausalLM, ...); ``fused_linear=True``
            for a model type it is not tested on;
            at the call, an output layer whose weight is not there to use (offloaded to the meta
            device by accelerate, or a DTensor shard: FSDP2 applied to the output layer on its
            own, tensor parallelism), for which ``fused_linear=False`` works.
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
    _output_layer(model)
    previous = vars(model).get("forward")
    model._celib_fused = _Fused(return_logits, backend, chunk_size,
                                getattr(model.config, "final_logit_softcapping", None), previous)
    forward = functools.partial(_fused_forward, model)  # deepcopy rebinds it to the copy
    functools.update_wrapper(forward, model.forward)  # Trainer reads the signature (**kwargs) via __wrapped__
    model.forward = forward
    return model


def _output_layer(model: torch.nn.Module) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise InputError(f"the output layer is a {type(head).__name__}, not an nn.Linear; "
                         f"use fused_linear=False.")
    return head


def _fused_forward(model: torch.nn.Module, *args: Any, **kwargs: Any):
    options: _Fused = model._celib_fused
    forward = options.previous_forward or type(model).forward.__get__(model)
    kwargs = _as_keywords(inspect.signature(type(model).forward.__get__(model)), args, kwargs)
    labels = kwargs.pop("labels", None)
    if labels is None:  # as the stock model: no labels, no loss (shift_labels alone are ignored)
        return forward(**kwargs)
    targets = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    keep_logits = (not torch.is_grad_enabled()) if options.return_logits is None else options.return_logits
    head = _output_layer(model)  # looked up per call: the layer may have been replaced (resized vocabulary)
    captured: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, inputs: tuple) -> tuple | None:
        captured.append(inputs[0])
        # the layer still runs (with every hook others put on it), on no rows unless the logits are kept
        return None if keep_logits else (inputs[0].narrow(-2, 0, 0), *inputs[1:])

    handle = head.register_forward_pre_hook(grab)  # for this call only
    try:
        output = forward(**kwargs, return_dict=True)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise InputError(f"the model's forward called its output layer {len(captured)} times, not once; "
                         f"use fused_linear=False.")
    weight, bias = head.weight, head.bias
    if weight.is_meta or _is_dtensor(weight):
        raise InputError("the output layer's weight is not on a device here (offloaded by accelerate, or a "
                         "DTensor shard: FSDP2 on the output layer alone, tensor parallelism); shard it with "
                         "the rest of the model, or use fused_linear=False.")
    hidden = captured[0].to(weight.device)  # accelerate's device maps move it inside the layer's call
    targets = _targets(labels, targets, hidden.shape[:-1], ignore_index)
    loss = linear_cross_entropy(
        hidden, weight, targets.to(weight.device), linear_bias=bias, ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum", softcap=options.softcap,
        chunk_size=options.chunk_size, backend=options.backend, loss_dtype=accumulator(hidden.dtype))
    fields = dict(output.items())  # a new output: ModelOutput keeps a key set to None in its tuple view
    fields["loss"] = _per_item(loss, num_items)
    if not keep_logits:
        fields.pop("logits", None)
    output = type(output)(**fields)
    return output if return_dict else output.to_tuple()


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _as_keywords(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (positional ones included), the **kwargs flattened into them."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    extra = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    return {**{k: v for k, v in bound.items() if k != extra}, **bound.get(extra, {})}


def remove_celib(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_celib`: the model computes its stock loss again. Returns ``model``."""
    state = vars(model)
    state.pop("_loss_function", None)
    fused = state.pop("_celib_fused", None)
    if fused is not None:
        if fused.previous_forward is not None:
            state["forward"] = fused.previous_forward  # accelerate's, as it was
        else:
            state.pop("forward", None)
    return model
