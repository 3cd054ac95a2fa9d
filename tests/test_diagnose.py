"""celib.diagnose names each common mistake, and is silent on clean input."""

from __future__ import annotations

import pytest
import torch

import celib


def codes(input, target, **kw) -> list[str]:
    return [f.code for f in celib.diagnose(input, target, **kw)]


LOGITS = torch.randn(8, 5) * 3
TARGET = torch.randint(0, 5, (8,))


@pytest.mark.parametrize(
    "input,target",
    [
        (LOGITS, TARGET),
        (torch.randn(4, 5, 6, 7), torch.randint(0, 5, (4, 6, 7))),  # segmentation
        (torch.randn(2, 5, 9), torch.randint(0, 5, (2, 9))),  # sequence, class dim 1
        (LOGITS, torch.softmax(torch.randn(8, 5), 1)),  # probability targets
        (LOGITS, torch.tensor([0, 1, -100, 3, 4, 0, 1, 2])),  # ignored position
        (torch.randn(10), (torch.rand(10) > 0.5).float()),  # binary logits
    ],
)
def test_clean_inputs_have_no_findings(input, target):
    assert celib.diagnose(input, target) == []


def test_softmax_before_cross_entropy():
    assert codes(torch.softmax(LOGITS, 1), TARGET) == ["softmax-before-cross-entropy"]


def test_one_hot_target():
    found = celib.diagnose(LOGITS, torch.nn.functional.one_hot(TARGET, 5))
    assert [f.code for f in found] == ["one-hot-target"]
    assert "argmax(dim=1)" in found[0].fix


def test_target_dtype_int32_and_float_indices():
    assert codes(LOGITS, TARGET.int()) == ["target-dtype"]
    found = celib.diagnose(LOGITS, TARGET.float())
    assert [f.code for f in found] == ["target-dtype"] and "target.long()" in found[0].fix


def test_float_target_of_neither_shape():
    for target in (torch.rand(5), torch.rand(8, 4)):  # a wrong batch size; a class count the input lacks
        found = celib.diagnose(LOGITS, target)
        assert [f.code for f in found] == ["target-shape"]
        assert str(tuple(target.shape)) in found[0].message and "(8, 5)" in found[0].message


def test_target_out_of_range():
    found = celib.diagnose(LOGITS, torch.tensor([0, 1, 5, 3, 4, 0, -1, 2]))
    assert [f.code for f in found] == ["target-out-of-range"]
    assert "[-1, 5]" in found[0].message and "[0, 4]" in found[0].message
    assert codes(LOGITS, torch.tensor([0, 1, 7, 3, 4, 0, 1, 2]), ignore_index=7) == []


def test_class_dimension_last():
    found = celib.diagnose(torch.randn(2, 9, 5), torch.randint(0, 5, (2, 9)))
    assert [f.code for f in found] == ["class-dim-last"]
    assert "movedim(-1, 1)" in found[0].fix


def test_non_finite_input():
    x = LOGITS.clone()
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    found = celib.diagnose(x, TARGET)
    assert found[0].code == "non-finite-input" and "2 NaN or +Inf" in found[0].message


def test_masked_logits_are_fine_unless_a_position_is_fully_masked_or_its_target_is():
    x, t = LOGITS.clone(), torch.tensor([0, 1, 2, 3, 4, 0, -100, 2])
    x[:, 4] = float("-inf")  # a masked class (e.g. vocabulary padding) that no target names
    t[4] = 3
    assert codes(x, t) == []
    x[6] = float("-inf")  # an ignored position fully masked: its gradient is NaN all the same
    found = celib.diagnose(x, t)
    assert [f.code for f in found] == ["all-masked-position"] and "(0 of them kept)" in found[0].message
    a = x.clone().requires_grad_(True)
    loss = celib.cross_entropy(a, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isnan(a.grad[6]).all()  # what the finding says
    x[6] = 0.0
    x[2] = float("-inf")  # a kept position fully masked: NaN loss
    assert "(1 of them kept)" in celib.diagnose(x, t)[0].message
    assert torch.isnan(celib.cross_entropy(x, t))
    x[2] = LOGITS[2]
    t[0] = 4  # a target on the masked class: an infinite loss
    found = celib.diagnose(x, t)
    assert [f.code for f in found] == ["masked-target"] and found[0].message.startswith("1 kept position")
    assert torch.isinf(celib.cross_entropy(x, t))
    assert codes(torch.full((4,), float("-inf")), torch.tensor(1)) == ["all-masked-position"]  # 1-D input


def test_nan_at_an_ignored_position_is_named_by_its_gradient():
    x, t = LOGITS.clone().requires_grad_(False), TARGET.clone()
    x[1, 0] = float("nan")
    t[1] = -100
    found = celib.diagnose(x, t)
    assert found[0].code == "non-finite-input" and "ignored positions included" in found[0].message
    a = x.clone().requires_grad_(True)
    loss = celib.cross_entropy(a, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isnan(a.grad[1]).all()


def test_empty_and_all_ignored_batches_give_a_nan_mean_and_are_named():
    found = celib.diagnose(torch.randn(0, 5), torch.zeros(0, dtype=torch.long))
    assert [f.code for f in found] == ["empty-batch"]
    assert codes(torch.randn(4, 5), torch.zeros(0, dtype=torch.long)) == ["target-shape"]  # not empty: a mismatch
    assert torch.isnan(celib.cross_entropy(torch.randn(0, 5), torch.zeros(0, dtype=torch.long)))
    t = torch.full((8,), -100)
    found = celib.diagnose(LOGITS, t)
    assert [f.code for f in found] == ["all-ignored"] and "max(number of kept targets, 1)" in found[0].fix
    x = LOGITS.clone().requires_grad_(True)
    loss = celib.cross_entropy(x, t)
    loss.backward()
    assert torch.isnan(loss) and torch.equal(x.grad, torch.zeros_like(x))  # as the message says


def test_integer_logits_are_named():
    found = celib.diagnose(torch.randint(0, 5, (4, 3)), torch.tensor([0, 1, 2, 0]))
    assert [f.code for f in found] == ["input-dtype"] and "torch.int64" in found[0].message
    with pytest.raises(RuntimeError):  # PyTorch refuses the call that diagnose warns about
        torch.nn.functional.cross_entropy(torch.randint(0, 5, (4, 3)), torch.tensor([0, 1, 2, 0]))


def test_an_input_with_no_classes_or_no_positions_is_named_not_a_raw_error():
    found = celib.diagnose(torch.randn(3, 0), torch.tensor([0, 1, 2]))
    assert [f.code for f in found] == ["no-classes"] and "C = 0" in found[0].message
    with pytest.raises(IndexError):  # what PyTorch says for the same call
        torch.nn.functional.cross_entropy(torch.randn(3, 0), torch.tensor([0, 1, 2]))
    assert codes(torch.randn(2, 0, 4), torch.zeros(2, 4, dtype=torch.long)) == ["no-classes"]
    assert codes(torch.randn(2, 3, 0), torch.zeros(2, 0, dtype=torch.long)) == ["empty-batch"]
    assert codes(torch.randn(0, 5), torch.zeros(3, dtype=torch.long)) == ["target-shape"]


def test_single_logit_meant_for_bce():
    assert codes(torch.randn(8, 1), torch.zeros(8, dtype=torch.long)) == ["single-logit"]


def test_probabilities_given_to_bce_with_logits():
    probs = torch.sigmoid(torch.randn(6, 3))
    labels = (torch.rand(6, 3) > 0.5).float()
    labels[0] = torch.tensor([1.0, 1.0, 0.0])  # multi-label: rows need not sum to 1
    assert codes(probs, labels) == ["probabilities-to-bce-with-logits"]
    assert codes(torch.randn(6, 3) * 4, labels) == []


def test_finding_prints_code_message_and_fix():
    text = str(celib.diagnose(torch.softmax(LOGITS, 1), TARGET)[0])
    assert text.startswith("[softmax-before-cross-entropy]") and "fix: pass the raw logits" in text


def test_labels_not_shifted():
    """A causal-LM adapter that forgets the shift scores position t against token t itself."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    logits = torch.randn(2, 9, 50, generator=g)
    flat = logits.reshape(-1, 50)
    wrong = celib.diagnose(flat, labels.reshape(-1), inputs=ids.reshape(-1))
    assert [f.code for f in wrong] == ["labels-not-shifted"]
    assert "at 15 of 15 kept positions" in wrong[0].message and "labels[:, 1:]" in wrong[0].fix
    right = celib.diagnose(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                           inputs=ids[:, :-1].reshape(-1))
    assert right == []
    with pytest.raises(celib.InputError, match="inputs of shape"):
        celib.diagnose(flat, labels.reshape(-1), inputs=ids)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_targets_are_diagnosed_not_a_crash(dtype):
    """uint8 segmentation masks with 255 for void pixels, and other small integer targets, which
    celib.cross_entropy accepts: diagnose used to raise gather()'s dtype error on them."""
    x = torch.randn(1, 3, 2, 2)
    void = 255 if dtype == torch.uint8 else 100
    mask = torch.tensor([[[0, 2], [void, 1]]], dtype=dtype)
    findings = celib.diagnose(x, mask, ignore_index=void)
    assert [f.code for f in findings] == ["target-dtype"]  # PyTorch refuses these for (N, C, H, W)
    if dtype == torch.uint8:
        with pytest.raises(RuntimeError, match="Long but found Byte"):
            torch.nn.functional.cross_entropy(x, mask, ignore_index=void)
    assert torch.isfinite(celib.cross_entropy(x, mask, ignore_index=void))
    x[0, 2, 0, 1] = float("-inf")  # the target class of a kept pixel: the masked-target check reads it
    assert "masked-target" in [f.code for f in celib.diagnose(x, mask, ignore_index=void)]
