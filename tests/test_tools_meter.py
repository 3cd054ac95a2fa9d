"""celib.kernels.tools: the traffic meter (meter.py, traffic), under Triton's interpreter on the CPU.

It counts what a user's ``loss.backward()`` moves end to end: the kernels' loads and stores and every
PyTorch operator on N x C tensors; these tests pin the counts of each kernel path.
"""

from __future__ import annotations

import pytest
import torch

from celib import kernels
from celib.kernels import launch, tools
from tests.cases import fused

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


@pytest.mark.parametrize("target_kind", ["index", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_traffic_one_block_forward_and_backward_at_the_floor(target_kind, reduction):
    """A row in one block, loss.backward() (upstream 1): 1 read + 1 write per logit, end to end, plus
    one scalar load of the target's logit per row for index targets."""
    x = torch.randn(8, 100)
    t = torch.randint(0, 100, (8,)) if target_kind == "index" else torch.softmax(torch.randn(8, 100), 1)
    report = tools.traffic(x, t, reduction=reduction)
    assert report.block == 128
    target_loads = 8 if target_kind == "index" else 0
    assert (report.logits_read, report.grad_written) == (800 + target_loads, 800), report.torch_ops
    assert report.torch_ops == ()  # no PyTorch operator touches an N x C tensor


def test_traffic_one_block_upstream_not_one_recomputes_from_the_logits():
    x = torch.randn(8, 100)
    report = tools.traffic(x, torch.randint(0, 100, (8,)), upstream=0.5)
    # forward 1R + 1W (+ the target logits), backward re-reads the logits and writes the gradient once
    assert (report.logits_read, report.grad_written) == (2 * 800 + 8, 2 * 800)
    assert report.torch_ops == ()


@pytest.mark.parametrize("upstream", [1.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_traffic_streamed_rows_read_twice_write_once(upstream, reduction):
    x = torch.randn(4, 1000)
    report = tools.traffic(x, torch.randint(0, 1000, (4,)), max_block=128, weight=torch.rand(1000),
                             upstream=upstream, reduction=reduction)
    assert report.block == 128
    assert (report.logits_read, report.grad_written) == (2 * 4000 + 4, 4000), report.torch_ops


@pytest.mark.parametrize("upstream", [1.0, 0.5])
def test_traffic_same_program_design(upstream):
    """Two sweeps in the forward program: 2 reads + 1 write per logit at upstream 1, as the split design,
    and the backward moves nothing; at another upstream backward recomputes the rows (1 R + 1 W more,
    where the split design stays at 2 R + 1 W)."""
    x = torch.randn(4, 1000)
    with launch.tuned(two_sweeps=True, programs=2):
        report = tools.traffic(x, torch.randint(0, 1000, (4,)), max_block=128, upstream=upstream)
    expected = (2 * 4000 + 4, 4000) if upstream == 1.0 else (3 * 4000 + 4, 2 * 4000)
    assert (report.logits_read, report.grad_written) == expected, report.torch_ops
    assert report.torch_ops == ()


@pytest.mark.parametrize("max_block", [None, 128])
def test_traffic_forward_only_reads_once(max_block):
    x = torch.randn(4, 1000)
    report = tools.traffic(x, torch.randint(0, 1000, (4,)), backward=False, max_block=max_block)
    assert (report.logits_read, report.grad_written) == (4000 + 4, 0)  # + one target logit per row


def test_no_host_synchronisation_without_input_checks():
    x, t = torch.randn(4, 300), torch.randint(0, 300, (4,))
    for max_block in (None, 64):
        assert tools.traffic(x, t, check_inputs=False, max_block=max_block, label_smoothing=0.1).host_syncs == 0
    assert tools.traffic(x, t, check_inputs=True).host_syncs >= 1  # the range check reads the targets


def test_meter_sees_pytorch_operators_on_the_logits():
    """The meter is not blind to work outside the kernels: a softmax before the loss is counted."""
    from celib.kernels.tools.meter import measure

    x = torch.randn(4, 100, requires_grad=True)

    def run():
        probs = torch.softmax(x, 1)  # reads N x C, writes N x C
        fused(probs, torch.zeros(4, dtype=torch.long)).backward()
        return x, x.grad

    report = measure(run, x, 128)
    # softmax 1R 1W, kernel 1R 1W (of the probabilities) + 4 target logits, softmax's backward 2R 1W
    assert (report.logits_read, report.grad_written) == (4 * 400 + 4, 3 * 400)
    assert any("softmax" in op for op, _, _ in report.torch_ops)
