"""How far the losses and gradients of celib's transformers adapter are from a float64 truth.

Tiny models built from configs (random weights, no download), one batch with a prompt and padding
masked by -100. The truth is the causal-LM loss written out by hand (logits at positions 0..T-2
against labels 1..T-1) in float64, on the same weights. For each model type and dtype the table gives
the relative error of the loss and the largest relative error (in norm) of any parameter's gradient,
for the stock model and for ``apply_celib`` on the logits and with ``fused_linear=True``. Measured, on
whatever machine runs it.

    python benchmarks/hf_equality.py
"""

from __future__ import annotations

import copy
import warnings

import torch

warnings.filterwarnings("ignore")

import transformers as tf  # noqa: E402

import hf_tiny  # noqa: E402
from celib.integrations.transformers import apply_celib, remove_celib  # noqa: E402

KINDS = ("llama", "gemma2", "gpt2")  # a plain head, a soft-capped one, one with biases and dropout off


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf_tiny.V, (4, 32), generator=g)
    labels = ids.clone()
    labels[0, :8] = -100
    labels[-1, -5:] = -100
    return ids, labels


def stock_or_celib(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def errors(result, truth):
    loss, g = result
    want_loss, want = float(truth[0]), truth[1]
    worst = max(float((g[n].double() - want[n]).norm() / want[n].norm()) for n in want)
    return abs(loss - want_loss) / want_loss, worst


def main() -> None:
    ids, labels = batch()
    print(f"transformers {tf.__version__}, torch {torch.__version__}; batch 4 x 32, -100 on 13 labels")
    print()
    print("| model | dtype | loss by | loss rel. error | worst gradient rel. error |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            model = hf_tiny.model(kind, dtype)
            truth = hf_tiny.truth(copy.deepcopy(model).double(), ids, labels)
            rows = [("stock", stock_or_celib(model, ids, labels))]
            for fused in (False, True):
                apply_celib(model, fused_linear=fused, chunk_size=16)
                rows.append(("celib fused" if fused else "celib logits", stock_or_celib(model, ids, labels)))
                remove_celib(model)
            for name, result in rows:
                loss_err, grad_err = errors(result, truth)
                print(f"| {kind} | {str(dtype).split('.')[1]} | {name} | {loss_err:.1e} | {grad_err:.1e} |")


if __name__ == "__main__":
    main()
