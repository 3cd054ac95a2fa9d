"""celib.distributed.vocab_parallel_cross_entropy on real gloo process groups (2 and 3 processes, this CPU).

Each test spawns the processes (a free port chosen at run time, a timeout so that a hung rank fails the
test instead of hanging CI); every rank builds the same full logits from a seed, takes its shard, and
checks its loss and its shard's gradient against F.cross_entropy on the full logits in one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = 120  # seconds for a whole run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, names: list[str], errors) -> None:
    """Runs the named scenarios in one process group (one spawn per world size keeps the suite fast)."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    except BaseException:  # noqa: BLE001 - report to the parent, which fails the test
        errors.put(("set-up", f"rank {rank}, set-up: {traceback.format_exc()}"))
        return
    try:
        for name in names:
            try:
                SCENARIOS[name](rank, world)
            except BaseException:  # noqa: BLE001 - the scenarios are written so that every rank fails alike
                errors.put((name, f"rank {rank}, {name}: {traceback.format_exc()}"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world: int, names: list[str]) -> dict[str, str]:
    """Run ``names`` on ``world`` gloo processes; the failures of each scenario ("" if none), and of
    the run itself under "set-up" (a rank that could not join, hung, or exited badly)."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, names, errors))
             for port in [_free_port()] for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    found = {name: "" for name in ["set-up", *names]}
    while not errors.empty():
        name, text = errors.get()
        found[name] += text + "\n"
    if hung:
        found["set-up"] += f"ranks {hung} did not finish within {TIMEOUT} s\n"
    if not all(p.exitcode == 0 for p in procs):
        found["set-up"] += f"exit codes {[p.exitcode for p in procs]}\n"
    return found


# ------------------------------------------------------------------------------------------- scenarios


def _shards(world: int, vocab: int) -> list[int]:
    """Uneven contiguous shards: rank r gets r + 1 parts of the vocabulary."""
    weights = list(range(1, world + 1))
    sizes = [vocab * w // sum(weights) for w in weights]
    sizes[-1] += vocab - sum(sizes)
    return sizes


def _compare(rank: int, world: int, full: torch.Tensor, target: torch.Tensor, sizes: list[int], rtol: float,
             **kwargs) -> None:
    import celib
    from celib.distributed import vocab_parallel_cross_entropy

    start = sum(sizes[:rank])
    local = full[:, start : start + sizes[rank]].clone().requires_grad_(True)
    reference = full.clone().requires_grad_(True)
    z_loss = kwargs.pop("z_loss", 0.0)
    expected = celib.cross_entropy(reference, target, z_loss=z_loss, backend="torch", **kwargs)
    got = vocab_parallel_cross_entropy(local, target, z_loss=z_loss, **kwargs)
    up = torch.rand(expected.shape, generator=torch.Generator().manual_seed(3), dtype=full.dtype)
    (expected * up).sum().backward()
    (got * up).sum().backward()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol, equal_nan=True)
    torch.testing.assert_close(local.grad, reference.grad[:, start : start + sizes[rank]], rtol=rtol, atol=rtol)


def scenario_values_and_gradients(rank: int, world: int) -> None:
    """float64 to 1e-12 over reductions, smoothing, ignore_index, z-loss, uneven shards."""
    g = torch.Generator().manual_seed(0)
    vocab = 37
    full = torch.randn(11, vocab, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, vocab, (11,), generator=g)
    target[[2, 7]] = -100
    for sizes in (_shards(world, vocab), [vocab - world + 1] + [1] * (world - 1)):
        for kwargs in (dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.2),
                       dict(label_smoothing=0.1, reduction="none", z_loss=1e-2)):
            _compare(rank, world, full, target, sizes, 1e-12, **kwargs)


def scenario_float32(rank: int, world: int) -> None:
    """float32 shards against the float64 single-process result: within 1e-5 relative, about 100 float32
    rounding units for O(1) values (each rank's sums, one more level of summation across ranks)."""
    g = torch.Generator().manual_seed(1)
    vocab = 1000
    full64 = (torch.randn(16, vocab, generator=g, dtype=torch.float64) * 3).float().double()
    target = torch.randint(0, vocab, (16,), generator=g)
    import celib
    from celib.distributed import vocab_parallel_cross_entropy

    sizes = _shards(world, vocab)
    start = sum(sizes[:rank])
    local = full64[:, start : start + sizes[rank]].float().requires_grad_(True)
    reference = full64.clone().requires_grad_(True)
    expected = celib.cross_entropy(reference, target, label_smoothing=0.1)
    got = vocab_parallel_cross_entropy(local, target, label_smoothing=0.1)
    expected.backward()
    got.backward()
    assert got.dtype == torch.float32
    assert abs(got.item() - expected.item()) <= 1e-5 * (1 + abs(expected.item()))
    err = (local.grad.double() - reference.grad[:, start : start + sizes[rank]]).abs().max().item()
    assert err <= 1e-5 * reference.grad.abs().max().item()


def scenario_edge_cases(rank: int, world: int) -> None:
    """All targets ignored; every target on rank 0 (the other ranks own none); an empty batch; -inf logits."""
    g = torch.Generator().manual_seed(2)
    vocab = 20
    full = torch.randn(6, vocab, generator=g, dtype=torch.float64)
    sizes = _shards(world, vocab)
    _compare(rank, world, full, torch.full((6,), -100), sizes, 1e-12)  # nan mean, zero gradient
    _compare(rank, world, full, torch.full((6,), -100), sizes, 1e-12, reduction="sum")
    _compare(rank, world, full, torch.randint(0, sizes[0], (6,), generator=g), sizes, 1e-12, label_smoothing=0.1)
    _compare(rank, world, full[:0], torch.zeros(0, dtype=torch.long), sizes, 1e-12, reduction="sum")
    import celib
    from celib.distributed import vocab_parallel_cross_entropy

    start = sum(sizes[:rank])
    shard = full[:, start : start + sizes[rank]].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(shard, torch.zeros(6, dtype=torch.long), label_smoothing=0.1)
    try:  # create_graph=True is refused, not answered without the second-order term through the lse
        torch.autograd.grad(loss, shard, create_graph=True)
    except celib.InputError as e:
        assert "create_graph=True" in str(e)
    else:
        raise AssertionError("create_graph=True was not refused")
    for reduction in ("mean", "sum"):  # an empty batch with label smoothing: PyTorch's nan / 0, no crash
        _compare(rank, world, full[:0], torch.zeros(0, dtype=torch.long), sizes, 1e-12, reduction=reduction,
                 label_smoothing=0.1)
    masked = full.clone()
    masked[:, [3, vocab - 1]] = -torch.inf  # a padded vocabulary: classes that no target uses
    used = torch.randint(4, vocab - 1, (6,), generator=g)
    for kwargs in (dict(), dict(reduction="none"), dict(z_loss=1e-2)):  # finite (was nan without smoothing)
        _compare(rank, world, masked, used, sizes, 1e-12, **kwargs)
    _compare(rank, world, masked, used, sizes, 1e-12, label_smoothing=0.1)  # inf, as PyTorch


def scenario_bad_target_raises_on_every_rank(rank: int, world: int) -> None:
    """A target past the end of the last shard: InputError on every rank, nobody left in a collective."""
    import celib
    from celib.distributed import vocab_parallel_cross_entropy

    sizes = _shards(world, 12)
    local = torch.randn(3, sizes[rank])
    with pytest.raises(celib.InputError, match="class index 12"):
        vocab_parallel_cross_entropy(local, torch.tensor([0, 12, 1]))
    dist.barrier()  # every rank got here: none is waiting in a collective


@contextlib.contextmanager
def _counting_collectives():
    """Records (collective, numbers sent) of every all_reduce and all_gather inside the block."""
    moved = []
    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *args, **kwargs):
        moved.append(("all_reduce", tensor.numel()))
        return real_all_reduce(tensor, *args, **kwargs)

    def all_gather(tensors, tensor, *args, **kwargs):
        moved.append(("all_gather", tensor.numel() * len(tensors)))
        return real_all_gather(tensors, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    try:
        yield moved
    finally:
        dist.all_reduce, dist.all_gather = real_all_reduce, real_all_gather


def scenario_communication_volume(rank: int, world: int) -> None:
    """O(N) numbers per rank, never the logits: 1 all-gather of P sizes, all-reduces of N and 3 N numbers."""
    from celib.distributed import vocab_parallel_cross_entropy

    with _counting_collectives() as moved:
        n, vocab = 64, 5000
        local = torch.randn(n, _shards(world, vocab)[rank], requires_grad=True)
        loss = vocab_parallel_cross_entropy(local, torch.randint(0, vocab, (n,)), label_smoothing=0.1)
        loss.backward()  # local: no communication
    assert moved == [("all_gather", world), ("all_reduce", n), ("all_reduce", 3 * n)], moved


def _linear_compare(rank, world, sizes, n=13, h=5, rows=4, seed=4, ignored=(2, 9), **kwargs) -> None:
    """The sharded output layer + loss against celib.linear_cross_entropy on the whole layer, float64:
    loss, dX, this rank's rows of dW and db, for an upstream of 1 and one per row."""
    import celib
    from celib.distributed import vocab_parallel_linear_cross_entropy

    g = torch.Generator().manual_seed(seed)
    vocab = sum(sizes)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, h, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[list(ignored)] = -100
    start = sum(sizes[:rank])
    shard = slice(start, start + sizes[rank])
    xa, wa, ba = x.clone().requires_grad_(True), w[shard].clone().requires_grad_(True), b[shard].clone()
    ba.requires_grad_(True)
    xr, wr, br = x.clone().requires_grad_(True), w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    got = vocab_parallel_linear_cross_entropy(xa, wa, t, bias_shard=ba, chunk_size=rows, **kwargs)
    expected = celib.linear_cross_entropy(xr, wr, t, linear_bias=br, **kwargs)
    up = torch.rand(expected.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (got * up).sum().backward()
    (expected * up).sum().backward()
    for what, a, e in (("loss", got, expected), ("dX", xa.grad, xr.grad), ("dW", wa.grad, wr.grad[shard]),
                       ("db", ba.grad, br.grad[shard])):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, equal_nan=True, msg=what)


def scenario_a_rank_without_classes(rank: int, world: int) -> None:
    """The last rank holds no class at all (a vocabulary split unevenly): both losses, every reduction."""
    g = torch.Generator().manual_seed(6)
    vocab = 21
    sizes = _shards(world - 1, vocab) + [0]
    full = torch.randn(7, vocab, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (7,), generator=g)
    target[3] = -100
    for kwargs in (dict(), dict(reduction="none", label_smoothing=0.1), dict(reduction="sum", z_loss=1e-2)):
        _compare(rank, world, full, target, sizes, 1e-12, **kwargs)
        _linear_compare(rank, world, sizes, rows=3, **kwargs)


def scenario_linear_values_and_gradients(rank: int, world: int) -> None:
    """Uneven shards, a rank with one class, chunks of 1, 4 and all rows, every reduction and option."""
    for sizes in (_shards(world, 29), [29 - world + 1] + [1] * (world - 1)):
        for rows in (1, 4, 100):
            for kwargs in (dict(), dict(reduction="sum"), dict(reduction="none"),
                           dict(label_smoothing=0.2, z_loss=1e-2), dict(reduction="none", label_smoothing=0.1)):
                _linear_compare(rank, world, sizes, rows=rows, **kwargs)


def scenario_linear_edge_cases(rank: int, world: int) -> None:
    """Every row ignored (nan mean, zero gradients), and an empty batch."""
    sizes = _shards(world, 17)
    _linear_compare(rank, world, sizes, n=5, ignored=range(5))
    _linear_compare(rank, world, sizes, n=5, ignored=range(5), reduction="sum")
    _linear_compare(rank, world, sizes, n=0, ignored=(), reduction="sum")
    import celib
    from celib.distributed import vocab_parallel_linear_cross_entropy

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)  # create_graph=True is refused
    w = torch.randn(sizes[rank], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    loss = vocab_parallel_linear_cross_entropy(x, w, torch.zeros(3, dtype=torch.long))
    try:
        torch.autograd.grad(loss, x, create_graph=True)
    except celib.InputError as e:
        assert "create_graph=True" in str(e)
    else:
        raise AssertionError("create_graph=True was not refused")


def scenario_linear_errors_on_every_rank(rank: int, world: int) -> None:
    import celib
    from celib.distributed import vocab_parallel_linear_cross_entropy

    sizes = _shards(world, 12)
    x, w = torch.randn(3, 4), torch.randn(sizes[rank], 4)
    with pytest.raises(celib.InputError, match="class index 12"):
        vocab_parallel_linear_cross_entropy(x, w, torch.tensor([0, 12, 1]))
    with pytest.raises(celib.InputError, match="hidden size"):
        vocab_parallel_linear_cross_entropy(torch.randn(3, 5), w, torch.tensor([0, 1, 1]))
    dist.barrier()  # every rank got here: none is waiting in a collective


def scenario_linear_without_gradients(rank: int, world: int) -> None:
    """Under torch.no_grad the forward forms no gradient (no accumulator is built), and the loss is the same."""
    from unittest import mock

    from celib import _chunks
    from celib.distributed import vocab_parallel_linear_cross_entropy

    torch.manual_seed(0)
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(_shards(world, 11)[rank], 4, requires_grad=True)
    t = torch.tensor([0, 3, 10, 5, -100, 7])
    with mock.patch.object(_chunks, "ParamGrads", wraps=_chunks.ParamGrads) as built:
        with torch.no_grad():
            quiet = vocab_parallel_linear_cross_entropy(x, w, t, chunk_size=4)
        assert built.call_count == 0
        loud = vocab_parallel_linear_cross_entropy(x, w, t, chunk_size=4)
        assert built.call_count == 1
    assert torch.equal(quiet, loud.detach())


def scenario_linear_errors_of_the_output_layer(rank: int, world: int) -> None:
    """A bias of another dtype is named, as the weight is (not a RuntimeError from the matrix product)."""
    import celib
    from celib.distributed import vocab_parallel_linear_cross_entropy

    local = _shards(world, 12)[rank]
    x, w = torch.randn(3, 4), torch.randn(local, 4)
    with pytest.raises(celib.InputError, match="bias_shard must be a floating-point tensor"):
        vocab_parallel_linear_cross_entropy(x, w, torch.tensor([0, 1, 1]), bias_shard=torch.arange(local))
    with pytest.raises(celib.InputError, match="bias_shard is torch.float64"):
        vocab_parallel_linear_cross_entropy(x, w, torch.tensor([0, 1, 1]), bias_shard=torch.zeros(local).double())
    dist.barrier()


def scenario_linear_communication_volume(rank: int, world: int) -> None:
    """Per chunk of n rows all-reduces of n and 3 n numbers; backward one all-reduce of dX, N x H numbers."""
    from celib.distributed import vocab_parallel_linear_cross_entropy

    with _counting_collectives() as moved:
        n, h, vocab, rows = 48, 16, 5000, 32
        x = torch.randn(n, h, requires_grad=True)
        w = torch.randn(_shards(world, vocab)[rank], h, requires_grad=True)
        loss = vocab_parallel_linear_cross_entropy(x, w, torch.randint(0, vocab, (n,)), chunk_size=rows)
        loss.backward()
    chunks = [("all_reduce", 32), ("all_reduce", 96), ("all_reduce", 16), ("all_reduce", 48)]
    assert moved == [("all_gather", world)] + chunks + [("all_reduce", n * h)], moved


def scenario_linear_default_chunks_on_uneven_shards(rank: int, world: int) -> None:
    """With the default chunk_size every rank chunks alike, from the largest shard, where each shard's own
    rule would give other chunks (each chunk is a collective: mismatched chunks abort gloo or hang)."""
    import celib
    from celib import _chunk_size
    from celib.distributed import vocab_parallel_linear_cross_entropy

    torch.manual_seed(0)
    n, h, vocab = 48, 8, 300
    sizes = _shards(world, vocab)
    x = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    w_full = torch.randn(vocab, h, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, vocab, (n,))
    start = sum(sizes[:rank])
    w = w_full.detach()[start:start + sizes[rank]].clone().requires_grad_()
    saved = _chunk_size.CHUNK_MEMORY["cpu"]
    _chunk_size.CHUNK_MEMORY["cpu"] = 8 * 400  # float64 rows of 100 and 200 classes: 4 and 2 rows a chunk
    try:
        own = {_chunk_size.chunk_rows(n, v, None, dtype=x.dtype, device=x.device, hidden=h) for v in sizes}
        assert len(own) == world, own  # each shard's own rule differs
        loss = vocab_parallel_linear_cross_entropy(x, w, t)
        loss.backward()
    finally:
        _chunk_size.CHUNK_MEMORY["cpu"] = saved
    x_ref = x.detach().clone().requires_grad_()
    want = celib.linear_cross_entropy(x_ref, w_full, t)
    want.backward()
    assert torch.allclose(loss, want, rtol=1e-12, atol=0)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-10, atol=1e-14)
    assert torch.allclose(w.grad, w_full.grad[start:start + sizes[rank]], rtol=1e-10, atol=1e-14)


SCENARIOS = {name.removeprefix("scenario_"): fn for name, fn in globals().items() if name.startswith("scenario_")}


WORLDS = (2, 3)


@pytest.fixture(scope="module")
def outcomes(request) -> dict[int, dict[str, str]]:
    """Each world size spawned once, running the scenarios this session selected (``-k`` picks them)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    chosen = {(item.callspec.params["world"], item.callspec.params["scenario"]) for item in request.session.items
              if getattr(item, "originalname", "") == "test_vocab_parallel" and hasattr(item, "callspec")}
    return {world: _run(world, [n for n in SCENARIOS if (world, n) in chosen])
            for world in WORLDS if any(w == world for w, _ in chosen)}


def test_every_scenario_is_collected():
    assert len(SCENARIOS) == 13


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel(outcomes, world, scenario):
    """One scenario above, on ``world`` gloo processes."""
    result = outcomes[world]
    assert result["set-up"] == "", result["set-up"]
    assert result[scenario] == "", result[scenario]
