"""celib.linear_cross_entropy against F.linear_cross_entropy's reference path (and a float64 truth)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import celib
from celib import InputError, kernels
from celib.linear import chunk_rows
from tests import bounds

V, H = 23, 6
W64 = torch.Generator().manual_seed(7)


def _inputs(n=17, dtype=torch.float64, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = -100
    return x, w, b, t


def _grads(fn, x, w, b, upstream_seed=1):
    """Loss and gradients of sum(loss * upstream) w.r.t. input, weight, bias."""
    x, w, b = (v.detach().clone().requires_grad_(True) for v in (x, w, b))
    loss = fn(x, w, b)
    up = bounds.upstream_like(loss, upstream_seed)
    (loss * up.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad, w.grad, b.grad


GRID = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.2),
    dict(weight="w"),
    dict(weight="w", label_smoothing=0.1, reduction="sum"),
    dict(weight="w", label_smoothing=0.3, reduction="none"),
    dict(ignore_index=3),
]


@pytest.mark.parametrize("kwargs", GRID, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("chunk", [1, 4, 17, 100])
def test_matches_torch_reference_float64(kwargs, chunk):
    x, w, b, t = _inputs()
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(V, dtype=torch.float64, generator=W64) + 0.1
    if "ignore_index" in kw:
        t = torch.where(t == -100, torch.tensor(3), t)
    theirs = _grads(lambda x, w, b: F.linear_cross_entropy(x, w, t, linear_bias=b, **kw), x, w, b)
    ours = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk, **kw), x, w, b)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_gradcheck_float64():
    x, w, b, t = _inputs(n=7)
    x, w, b = (v.requires_grad_(True) for v in (x, w, b))
    weight = torch.rand(V, dtype=torch.float64) + 0.5
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: celib.linear_cross_entropy(x, w, t, linear_bias=b, weight=weight, reduction=reduction,
                                                       label_smoothing=0.1, z_loss=1e-2, softcap=4.0, chunk_size=3),
            (x, w, b))


def test_extras_match_cross_entropy_of_the_logits():
    x, w, b, t = _inputs()
    kw = dict(z_loss=1e-2, softcap=2.5, label_smoothing=0.1)
    for reduction in ("mean", "sum", "none"):
        theirs = _grads(lambda x, w, b: celib.cross_entropy(F.linear(x, w, b), t, reduction=reduction, **kw), x, w, b)
        ours = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                                                 chunk_size=5, **kw), x, w, b)
        for a, e in zip(ours, theirs):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_language_model_shapes_and_no_bias():
    x, w, _, t = _inputs(n=12)
    x3, t3 = x.reshape(3, 4, H), t.reshape(3, 4)
    loss = celib.linear_cross_entropy(x3, w, t3, reduction="none", chunk_size=5)
    assert loss.shape == (3, 4)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.t(), t, reduction="none").reshape(3, 4), rtol=1e-12, atol=0)
    x3.requires_grad_(True)
    celib.linear_cross_entropy(x3, w, t3).backward()
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(xr @ w.t(), t).backward()
    torch.testing.assert_close(x3.grad.reshape(12, H), xr.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_and_empty_batches(reduction):
    x, w, b, t = _inputs(n=5)
    ignored = torch.full((5,), -100)
    theirs = _grads(lambda x, w, b: F.linear_cross_entropy(x, w, ignored, linear_bias=b, reduction=reduction), x, w, b)
    ours = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, ignored, linear_bias=b, reduction=reduction,
                                                             chunk_size=2), x, w, b)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
    empty_x, empty_t = x[:0], t[:0]
    theirs = _grads(lambda x, w, b: F.linear_cross_entropy(x, w, empty_t, linear_bias=b, reduction=reduction),
                    empty_x, w, b)
    ours = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, empty_t, linear_bias=b, reduction=reduction),
                  empty_x, w, b)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_head_with_no_classes_gives_pytorchs_answer(reduction):
    x, _, _, _ = _inputs(n=5)
    w, b = x.new_zeros(0, x.shape[1], requires_grad=True), x.new_zeros(0, requires_grad=True)
    ignored = torch.full((5,), -100)
    theirs = _grads(lambda x, w, b: F.linear_cross_entropy(x, w, ignored, linear_bias=b, reduction=reduction), x, w, b)
    ours = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, ignored, linear_bias=b, reduction=reduction),
                  x, w, b)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(InputError, match="outside"):  # a kept target has no class to point to
        celib.linear_cross_entropy(x, w, torch.zeros(5, dtype=torch.long), linear_bias=b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_raises_instead_of_dropping_the_second_order_term(backend):
    if backend == "triton" and not kernels.available():
        pytest.skip("triton is not installed")
    x, w, b, t = _inputs(n=5, dtype=torch.float32)
    x = x.clone().requires_grad_(True)
    loss = celib.linear_cross_entropy(x, w.requires_grad_(True), t, linear_bias=b, backend=backend)
    with pytest.raises(InputError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)

def test_float32_within_the_float32_bound_of_the_float64_truth():
    """float32 results against the float64 truth, within a bound built from tests/bounds.py.

    The float32 logits z = x W^T + b are off by at most e = (H + 2) u (|x| |W|^T + |b|) (a sum of H + 1
    terms). The loss then moves by at most sum |dL/dz| max e, and the logit gradient
    g = (p - y') / den by at most 2 p max_row(e) / den (the softmax Jacobian diag(p) - p p^T), on top of
    the bound for exact logits. The products g W and g^T x add a relative (H + 2) u and (N + 2) u.
    """
    x, w, b, t = _inputs(n=40, ignored=0.2)
    truth = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1), x, w, b)
    ours = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1,
                                                             chunk_size=16),
                  x.float(), w.float(), b.float())
    logits = x @ w.t() + b
    tr = bounds.truth(logits, t, bounds.upstream_like(ours[0], 1), block=32, label_smoothing=0.1)
    e = (H + 2) * bounds.U32 * (x.abs() @ w.abs().t() + b.abs())
    loss_bound = tr.loss_bound + tr.grad.abs().sum() * e.max()
    bounds.assert_within(ours[0], truth[0], loss_bound, "loss")
    kept = (t != -100).double()
    den = kept.sum()
    up = float(bounds.upstream_like(ours[0], 1))
    g_err = tr.grad_bound + 2 * up * torch.softmax(logits, 1) * e.amax(1, keepdim=True) * kept[:, None] / den
    gx_bound = g_err @ w.abs() + (H + 2) * bounds.U32 * (tr.grad.abs() @ w.abs())
    bounds.assert_within(ours[1], truth[1], gx_bound, "input gradient")
    gw_bound = g_err.t() @ x.abs() + (len(x) + 2) * bounds.U32 * (tr.grad.abs().t() @ x.abs())
    bounds.assert_within(ours[2], truth[2], gw_bound, "weight gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_the_unfused_version(dtype):
    """Half-precision inputs: the loss and gradients against the float64 truth are no worse than those
    of F.cross_entropy(F.linear(...)) in the same dtype (celib accumulates over chunks in float32)."""
    x, w, b, t = _inputs(n=64, ignored=0.1, seed=3)
    x, w, b = x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double()  # representable in dtype
    truth = _grads(lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t), x, w, b)
    ours = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=8),
                  x.to(dtype), w.to(dtype), b.to(dtype))
    unfused = _grads(lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t), x.to(dtype), w.to(dtype), b.to(dtype))
    for what, a, u, e in zip(("loss", "input grad", "weight grad", "bias grad"), ours, unfused, truth):
        assert a.dtype == dtype
        err, err_unfused = bounds.max_error(a, e), bounds.max_error(u, e)
        scale = float(e.abs().max())
        eps = torch.finfo(dtype).eps
        assert err <= err_unfused + 2 * eps * scale, f"{what}: {err:.3g} vs unfused {err_unfused:.3g}"


@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
@pytest.mark.parametrize("kwargs", [dict(), dict(reduction="none"), dict(weight="w", label_smoothing=0.1, reduction="sum"),
                                    dict(z_loss=1e-3, softcap=3.0)], ids=str)
def test_triton_backend_matches_the_torch_backend(kwargs):
    x, w, b, t = _inputs(n=19, dtype=torch.float32)
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(V) + 0.1
    ref = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=8, **kw),
                 x.double(), w.double(), b.double())
    tri = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=8, backend="triton",
                                                            **kw), x, w, b)
    for a, e in zip(tri, ref):
        # float32 against float64: every quantity here is O(1) and goes through ~10 + H roundings
        torch.testing.assert_close(a.double(), e, rtol=0, atol=64 * bounds.U32 * max(1.0, float(e.abs().max())))


def test_chunk_rule():
    from celib._chunk_size import _roofline_rows as roofline_rows

    # CUDA: four times an H100's machine balance (989e12 / 3.35e12 = 295 FLOP/byte) in rows, in 128s
    assert roofline_rows(torch.bfloat16) == 1280 and roofline_rows(torch.float32) == 640
    # with the chunk's operands counted: n >= 4 beta / (1 - beta (1/H + 1/V)) in bf16, in 128s
    assert roofline_rows(torch.bfloat16, 4096, 128256) == 1280  # 1276 rows
    assert roofline_rows(torch.bfloat16, 2048, 32000) == 1408  # 1395
    assert roofline_rows(torch.bfloat16, 1024, 32000) == 1792  # 1681
    assert roofline_rows(torch.bfloat16, 256, 32000) is None  # H below beta: never compute-bound
    assert chunk_rows(4096, 32000, hidden=2048, dtype=torch.bfloat16, device="cuda") == 1408
    assert chunk_rows(8192, 32000, hidden=256, dtype=torch.bfloat16, device="cuda") == 8192  # memory decides
    assert chunk_rows(10**5, 32000, hidden=256, dtype=torch.bfloat16, device="cuda") == 2 * 2**30 // (32000 * 6)
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    assert chunk_rows(8192, 128256, **bf16) == 1280  # 1280 x 128256 x (2 + 4) bytes = 985 MB < 2 GiB
    assert chunk_rows(16384, 256000, **bf16) == 1280  # 1.97 GB
    assert chunk_rows(16384, 10**6, **bf16) == 2 * 2**30 // (10**6 * 6) == 357  # the memory cap binds
    assert chunk_rows(8192, 128256, memory=2**28, **bf16) == 2**28 // (128256 * 6)
    # CPU: a quarter of the batch, 128 to 512 rows, capped at 256 MiB of logits
    assert chunk_rows(4096, 32000) == 512
    assert chunk_rows(1024, 32000) == 256 and chunk_rows(512, 32000) == 128 and chunk_rows(200, 50) == 128
    assert chunk_rows(4096, 256000) == 256 * 2**20 // (256000 * 4) == 262
    assert chunk_rows(10, 32000) == 10
    assert chunk_rows(4096, 10**9) == 1
    assert chunk_rows(5, 7, chunk_size=2) == 2
    with pytest.raises(celib.InputError, match="chunk_size"):
        chunk_rows(5, 7, chunk_size=0)
    with pytest.raises(celib.InputError, match="budget"):
        chunk_rows(5, 7, memory=0)


def test_loss_dtype_float32_for_half_inputs():
    x, w, b, t = _inputs(dtype=torch.bfloat16)
    loss32 = celib.linear_cross_entropy(x, w, t, linear_bias=b, loss_dtype=torch.float32)
    loss16 = celib.linear_cross_entropy(x, w, t, linear_bias=b)
    assert loss32.dtype == torch.float32 and loss16.dtype == torch.bfloat16
    # the logits are the bf16 products, as F.linear's; from there on float32, and not rounded to bf16
    exact = F.cross_entropy(F.linear(x, w, b).double(), t)
    assert abs(loss32.double() - exact) < 1e-5 * abs(exact)
    assert loss16 == loss32.to(torch.bfloat16)


def test_autocast_runs_the_products_in_the_autocast_dtype():
    x, w, b, t = (v.float() if v.is_floating_point() else v for v in _inputs())
    x, w = x.requires_grad_(True), w.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = celib.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4)
        ref = F.cross_entropy(F.linear(x, w, b), t)  # what autocast makes of the unfused version
    assert loss.dtype == torch.float32 == ref.dtype  # autocast's cross_entropy runs in float32
    as_bf16 = celib.linear_cross_entropy(x.bfloat16(), w.bfloat16(), t, linear_bias=b.bfloat16(), chunk_size=4,
                                         loss_dtype=torch.float32)
    assert loss == as_bf16  # products in bf16, as F.linear's under autocast
    assert loss != celib.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4)  # not the float32 products
    assert abs(loss - ref) <= 1e-5 * abs(ref)
    loss.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32  # leaves keep their dtype
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(F.linear(xr, wr, b), t).backward()
    for ours, theirs in ((x.grad, xr.grad), (w.grad, wr.grad)):
        assert (ours - theirs).abs().max() <= 2e-2 * theirs.abs().max()


def test_autocast_takes_half_hidden_states_with_a_float32_head_as_pytorch_does():
    """What autocast produces in a real model (bf16 activations, a float32 output layer) is accepted, as
    by F.linear + F.cross_entropy and PyTorch's own F.linear_cross_entropy, and gives their loss."""
    torch.manual_seed(3)
    x = torch.randn(12, 16).bfloat16().requires_grad_(True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = celib.linear_cross_entropy(x, w, t, chunk_size=5)
        theirs = F.linear_cross_entropy(x, w, t)
        unfused = F.cross_entropy(F.linear(x, w), t)
    assert ours.dtype == theirs.dtype == unfused.dtype == torch.float32
    torch.testing.assert_close(ours, unfused, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    ours.backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_a_linear_module_instead_of_its_weight_names_the_fix():
    x, w, b, t = _inputs()
    layer = torch.nn.Linear(x.shape[1], V, dtype=x.dtype)
    with pytest.raises(celib.InputError, match=r"got a Linear module; pass its \.weight"):
        celib.linear_cross_entropy(x, layer, t)


def test_bad_input_names_the_fix():
    x, w, b, t = _inputs()
    with pytest.raises(celib.InputError, match=r"hidden size 6 .* expects H = 5"):
        celib.linear_cross_entropy(x, w[:, :5], t)
    with pytest.raises(celib.InputError, match="transposed"):
        celib.linear_cross_entropy(torch.randn(4, V, dtype=torch.float64), w, t[:4])
    with pytest.raises(celib.InputError, match=r"linear_bias must have shape \(23,\)"):
        celib.linear_cross_entropy(x, w, t, linear_bias=b[:-1])
    with pytest.raises(celib.InputError, match="class index 23"):
        celib.linear_cross_entropy(x, w, torch.full_like(t, V))
    with pytest.raises(celib.InputError, match="cast one of them"):
        celib.linear_cross_entropy(x.float(), w, t)
    with pytest.raises(celib.InputError, match="linear_bias is torch.float32"):  # not the product's RuntimeError
        celib.linear_cross_entropy(x, w, t, linear_bias=b.float())
    with pytest.raises(celib.InputError, match="class indices"):
        celib.linear_cross_entropy(x, w, torch.rand(len(t), V, dtype=torch.float64))
    with pytest.raises(celib.InputError, match=r"expected \(17,\)"):
        celib.linear_cross_entropy(x, w, t[:5])
    with pytest.raises(celib.InputError, match="reduction"):
        celib.linear_cross_entropy(x, w, t, reduction="batchmean")


def test_module_matches_functional():
    x, w, b, t = _inputs()
    module = celib.nn.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4)
    torch.testing.assert_close(module(x, w, t, linear_bias=b),
                               celib.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1), rtol=1e-12,
                               atol=0)


def test_module_has_every_option_of_the_function():
    import inspect

    options = set(inspect.signature(celib.linear_cross_entropy).parameters)
    options -= {"input", "linear_weight", "target", "linear_bias"}
    assert options == set(inspect.signature(celib.nn.LinearCrossEntropyLoss).parameters)
    x, w, b, t = _inputs()
    module = celib.nn.LinearCrossEntropyLoss(chunk_memory=10**6, loss_dtype=torch.float32)
    loss = module(x.bfloat16(), w.bfloat16(), t)
    expected = celib.linear_cross_entropy(x.bfloat16(), w.bfloat16(), t, chunk_memory=10**6,
                                          loss_dtype=torch.float32)
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_without_gradients_no_gradient_is_formed(backend, monkeypatch):
    """Under torch.no_grad (evaluation) the chunks form no gradient: one matrix product, not three."""
    from unittest import mock

    from celib import _chunks

    if backend == "triton" and not kernels.available():
        pytest.skip("triton is not installed")
    x, w, b, t = (v.requires_grad_(True) if v.is_floating_point() else v for v in _inputs(dtype=torch.float32))
    with mock.patch.object(_chunks, "ParamGrads", wraps=_chunks.ParamGrads) as built:
        with torch.no_grad():
            quiet = celib.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4, backend=backend)
        assert built.call_count == 0
        loud = celib.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4, backend=backend)
        assert built.call_count == 1
    assert torch.equal(quiet, loud.detach())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_ignored_row_with_a_masked_class_0_is_not_nan(backend):
    """An ignored row reads the placeholder class 0; a -inf logit there must not make its loss 0 * inf."""
    if backend == "triton" and not kernels.available():
        pytest.skip("triton is not installed")
    x, w, b, _ = _inputs(n=4, dtype=torch.float32)  # the kernel takes float32, not float64
    b = b.clone()
    b[0] = -float("inf")  # class 0 masked out, as a padded vocabulary entry
    t = torch.tensor([3, -100, 5, 1])
    theirs = _grads(lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, reduction="none"), x, w, b)
    ours = _grads(lambda x, w, b: celib.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none",
                                                            chunk_size=3, backend=backend), x, w, b)
    for a, e in zip(ours[:3], theirs[:3]):  # the bias's gradient at the -inf class is nan in both
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
def test_triton_backend_reads_a_strided_index_target():
    """linear_cross_entropy hands the target to the kernel's launcher: a column view must be read with its
    stride (it was read as if contiguous)."""
    x, w, b, _ = _inputs(n=9, dtype=torch.float32, ignored=0.0)
    table = torch.randint(0, w.shape[0], (9, 2), generator=torch.Generator().manual_seed(5))
    t = table[:, 0]
    assert t.stride(0) == 2
    got = celib.linear_cross_entropy(x, w, t, linear_bias=b, backend="triton")
    expected = F.cross_entropy(F.linear(x, w, b), t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
