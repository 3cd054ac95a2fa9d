"""Chapter 6's two-process run of celib.distributed.vocab_parallel_cross_entropy (gloo, on the CPU).

Launched by the chapter as ``torchrun --standalone --nproc-per-node 2 chapters/vocab_parallel_demo.py``.
Every rank builds the same logits from a seed, keeps its half of the vocabulary, and computes the loss;
rank 0 prints it, the single-process loss on the full logits, and the numbers each rank exchanged.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from celib.distributed import vocab_parallel_cross_entropy

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
n, vocab = 8, 1000
logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
target = torch.randint(0, vocab, (n,), generator=g)
target[3] = -100  # a padding position
shard = vocab // world
local = logits[:, rank * shard : (rank + 1) * shard].clone().requires_grad_(True)

sent = []
all_reduce = dist.all_reduce
dist.all_reduce = lambda t, *a, **k: (sent.append(t.numel()), all_reduce(t, *a, **k))[1]
loss = vocab_parallel_cross_entropy(local, target, label_smoothing=0.1)
dist.all_reduce = all_reduce
loss.backward()

full = logits.clone().requires_grad_(True)
reference = F.cross_entropy(full, target, label_smoothing=0.1)
reference.backward()
grad_error = (local.grad - full.grad[:, rank * shard : (rank + 1) * shard]).abs().max().item()
errors = [None] * world
dist.all_gather_object(errors, grad_error)
if rank == 0:
    print(f"ranks: {world}, vocabulary per rank: {shard}, rows: {n}")
    print(f"vocab-parallel loss: {loss.item():.12f}")
    print(f"single process:      {reference.item():.12f}")
    print(f"numbers all-reduced per rank: {sum(sent)} (= 4 x {n} rows)")
    print(f"every shard's gradient within 1e-14 of the full one: {max(errors) < 1e-14}")
dist.destroy_process_group()
