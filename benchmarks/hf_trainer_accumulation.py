"""Trainer with gradient accumulation: the stock loss, apply_celib, and a loss registered by loss_type.

Two optimizer steps of plain SGD (so an update is the learning rate times the gradient), two
micro-batches per step whose rows hold different numbers of padded (-100) labels, on a tiny Llama
built from a config. Printed: the logged losses and, per route, the largest relative difference of
any parameter's update from the stock loss's. ``apply_celib`` leaves the model's ``loss_type`` alone;
the third route registers celib's loss in transformers' ``LOSS_MAPPING`` under a new ``loss_type``,
after which ``Trainer`` counts ``num_items_in_batch`` over the unshifted labels. Measured.

    python benchmarks/hf_trainer_accumulation.py
"""

from __future__ import annotations

import tempfile
import warnings

import torch

warnings.filterwarnings("ignore")

import transformers as tf  # noqa: E402
from transformers.loss.loss_utils import LOSS_MAPPING  # noqa: E402

from celib.integrations.transformers import apply_celib, causal_lm_loss  # noqa: E402

V, T = 97, 12
ROUTES = ("stock", "apply_celib", "apply_celib fused_linear=True", "registered loss_type")


def model():
    torch.manual_seed(1)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def rows():
    out = []
    for i in range(8):
        ids = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(10 + i))
        labels = ids.clone()
        labels[T - i:] = -100  # i padded positions
        out.append({"input_ids": ids, "labels": labels})
    return out


def train(route: str, folder: str):
    m = model()
    if route.startswith("apply_celib"):
        apply_celib(m, fused_linear=route.endswith("fused_linear=True"))
    elif route == "registered loss_type":
        LOSS_MAPPING["celib"] = causal_lm_loss
        m.loss_type = "celib"
    args = tf.TrainingArguments(output_dir=f"{folder}/{route}", per_device_train_batch_size=2,
                                gradient_accumulation_steps=2, max_steps=2, learning_rate=0.5, optim="sgd",
                                lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
                                use_cpu=True, seed=0, disable_tqdm=True, weight_decay=0.0, max_grad_norm=0.0)
    trainer = tf.Trainer(model=m, args=args, train_dataset=rows())
    trainer.train()  # prints its log lines
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return losses, {n: p.detach().clone() for n, p in m.named_parameters()}


def main() -> None:
    start = dict(model().named_parameters())
    with tempfile.TemporaryDirectory() as folder:
        results = {route: train(route, folder) for route in ROUTES}
    _, stock = results["stock"]
    print(f"transformers {tf.__version__}; Trainer, SGD, gradient_accumulation_steps=2, 2 steps")
    print()
    print("| loss computed by | logged losses | largest relative update difference vs stock |")
    print("|---|---|---|")
    for route, (losses, params) in results.items():
        worst = max(float(((params[n] - start[n]) - (stock[n] - start[n])).norm() / (stock[n] - start[n]).norm())
                    for n in stock)
        print(f"| {route} | {', '.join(f'{x:.4f}' for x in losses)} | {worst:.1e} |")


if __name__ == "__main__":
    main()
