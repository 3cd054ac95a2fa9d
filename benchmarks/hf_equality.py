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
import torch.nn.functional as F

warnings.filterwarnings("ignore")

import transformers as tf  # noqa: E402

from celib.integrations.transformers import apply_celib, remove_celib  # noqa: E402

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SMALL),
    "gemma2": lambda: tf.Gemma2Config(**SMALL, head_dim=8),
    "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
}


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (4, 32), generator=g)
    labels = ids.clone()
    labels[0, :8] = -100
    labels[-1, -5:] = -100
    return ids, labels


def grads(model, ids, labels, by_hand=False):
    model.zero_grad(set_to_none=True)
    if by_hand:
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    else:
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.item(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def errors(result, truth):
    loss, g = result
    want_loss, want = truth
    worst = max(float((g[n] - want[n]).norm() / want[n].norm()) for n in want)
    return abs(loss - want_loss) / want_loss, worst


def main() -> None:
    ids, labels = batch()
    print(f"transformers {tf.__version__}, torch {torch.__version__}; batch 4 x 32, -100 on 13 labels")
    print()
    print("| model | dtype | loss by | loss rel. error | worst gradient rel. error |")
    print("|---|---|---|---|---|")
    for kind, config in CONFIGS.items():
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(config()).to(dtype)
            truth = grads(copy.deepcopy(model).double(), ids, labels, by_hand=True)
            rows = [("stock", grads(model, ids, labels))]
            for fused in (False, True):
                apply_celib(model, fused_linear=fused, chunk_size=16)
                rows.append(("celib fused" if fused else "celib logits", grads(model, ids, labels)))
                remove_celib(model)
            for name, result in rows:
                loss_err, grad_err = errors(result, truth)
                print(f"| {kind} | {str(dtype).split('.')[1]} | {name} | {loss_err:.1e} | {grad_err:.1e} |")


if __name__ == "__main__":
    main()
