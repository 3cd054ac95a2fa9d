"""Tiny transformers models, the float64 truth of their loss, and a Trainer run with gradient accumulation.

Shared by ``hf_equality.py``, ``hf_trainer_accumulation.py`` and ``tests/test_transformers_integration.py``:
models built from configs (random weights, no download), small enough to run in seconds on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers as tf
from transformers.loss.loss_utils import LOSS_MAPPING

from celib.integrations.transformers import apply_celib, causal_lm_loss

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SMALL),
    "mistral": lambda: tf.MistralConfig(**SMALL),
    "qwen2": lambda: tf.Qwen2Config(**SMALL),
    "qwen3": lambda: tf.Qwen3Config(**SMALL, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**SMALL, head_dim=8),  # soft-caps its logits at 30
    "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0,
                                  bos_token_id=0),
}

#: How Trainer's loss is computed: transformers' own, celib's on the logits, celib's fused, and
#: celib's registered in LOSS_MAPPING under a new loss_type (the route that miscounts tokens).
ROUTES = ("stock", "apply_celib", "apply_celib fused_linear=True", "registered loss_type")


def model(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[kind]()).to(dtype)


def truth(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, num_items=None):
    """The causal-LM loss written out independently of transformers' loss code: logits at positions
    0..T-2 against labels 1..T-1, in the model's dtype (run it on a float64 model). Returns the loss
    and every parameter's gradient, by name."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    flat, target = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    loss = (F.cross_entropy(flat, target) if num_items is None
            else F.cross_entropy(flat, target, reduction="sum") / num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def accumulation_rows() -> list[dict[str, torch.Tensor]]:
    """Eight sequences of 12 tokens, row i with its last i labels -100: the micro-batches hold different
    numbers of targets, and position 0 is labelled (without either, a wrong token count goes unseen)."""
    rows = []
    for i in range(8):
        ids = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(10 + i))
        labels = ids.clone()
        labels[12 - i:] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def train_with_accumulation(kind: str, route: str, folder: str):
    """Two optimizer steps of plain SGD (an update is the learning rate times the gradient),
    gradient_accumulation_steps=2, on ``accumulation_rows``. Returns the logged losses and the
    parameters after training, by name; the parameters before are ``model(kind, torch.float32, 1)``'s."""
    m = model(kind, torch.float32, seed=1)
    if route.startswith("apply_celib"):
        apply_celib(m, fused_linear=route.endswith("fused_linear=True"), chunk_size=8)
    elif route == "registered loss_type":
        LOSS_MAPPING["celib"] = causal_lm_loss
        m.loss_type = "celib"
    args = tf.TrainingArguments(output_dir=f"{folder}/{route}", per_device_train_batch_size=2,
                                gradient_accumulation_steps=2, max_steps=2, learning_rate=0.5, optim="sgd",
                                lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
                                use_cpu=True, seed=0, disable_tqdm=True, weight_decay=0.0, max_grad_norm=0.0)
    trainer = tf.Trainer(model=m, args=args, train_dataset=accumulation_rows())
    trainer.train()  # prints its log lines
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {n: p.detach().clone() for n, p in m.named_parameters()}
