"""Peak memory of one forward + backward of a transformers causal LM: stock loss vs celib's.

Each variant runs in a fresh Python process (so no allocator cache or earlier peak is shared):
the stock model, ``apply_celib(model)`` (the loss on the logits) and
``apply_celib(model, fused_linear=True)`` (no (B, T, V) logits). The model is a Llama built from a
config with random weights (no download), at a vocabulary and batch where the logits dominate.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` during the step, above what was allocated
before it. On a CPU it is the growth of the process's peak resident set (``ru_maxrss``) during the
step: a coarser measure (it counts pages, and glibc may keep freed memory), but what the machine
pays. Measured, not derived; the logits' own size is printed beside it for scale.

    python benchmarks/hf_memory.py                    # CPU, float32
    python benchmarks/hf_memory.py --dtype bfloat16   # the dtype models train in on GPUs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANTS = ("stock", "celib", "celib fused_linear")


def one(variant: str, args: argparse.Namespace) -> dict:
    import resource

    import torch
    import transformers as tf

    from celib.integrations.transformers import apply_celib

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=args.seq)
    model = tf.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if variant != "stock":
        apply_celib(model, fused_linear=variant.endswith("fused_linear"))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"variant": variant, "loss": float(loss), "peak": peak, "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one(args.variant, args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    size = {"float32": 4, "bfloat16": 2}[args.dtype]
    logits = args.batch * args.seq * args.vocab * size
    how = "max_memory_allocated" if rows[0]["device"] == "cuda" else "peak RSS growth"
    print(f"Llama from a config: V={args.vocab}, H={args.hidden}, {args.layers} layers, B={args.batch}, "
          f"T={args.seq}, {args.dtype}, {rows[0]['device']}; one forward + backward, each in a fresh process.")
    print(f"The (B, T, V) logits alone: {logits / 2**20:.0f} MiB. Measured: {how} during the step.")
    print()
    print("| loss computed by | loss | peak memory of the step (MiB) | vs stock |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['loss']:.5f} | {row['peak'] / 2**20:.0f} | "
              f"{row['peak'] / rows[0]['peak']:.2f} |")


if __name__ == "__main__":
    main()
