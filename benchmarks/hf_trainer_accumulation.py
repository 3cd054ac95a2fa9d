"""Trainer with gradient accumulation: the stock loss, apply_celib, and a loss registered by loss_type.

Two optimizer steps of plain SGD (so an update is the learning rate times the gradient), two
micro-batches per step whose rows hold different numbers of padded (-100) labels, on a tiny Llama
built from a config (``hf_tiny.py``). Printed: the logged losses and, per route, the largest relative
difference of any parameter's update from the stock loss's. ``apply_celib`` leaves the model's
``loss_type`` alone; the last route registers celib's loss in transformers' ``LOSS_MAPPING`` under a
new ``loss_type``, after which ``Trainer`` counts ``num_items_in_batch`` over the unshifted labels.
Measured.

    python benchmarks/hf_trainer_accumulation.py
"""

from __future__ import annotations

import tempfile
import warnings

import torch

warnings.filterwarnings("ignore")

import transformers as tf  # noqa: E402

import hf_tiny  # noqa: E402


def main() -> None:
    start = dict(hf_tiny.model("llama", torch.float32, seed=1).named_parameters())
    with tempfile.TemporaryDirectory() as folder:
        results = {route: hf_tiny.train_with_accumulation("llama", route, folder) for route in hf_tiny.ROUTES}
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
