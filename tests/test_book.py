"""The book's helper modules: data, training loop, metrics, plot style, widgets."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import celib
from celib.book import data, metrics, plot, train, widgets


def test_digits_split_is_stratified_seeded_and_unbalanced_on_request():
    split = data.digits(seed=0)
    assert split.x_train.shape[1] == 64 and split.x_train.dtype == torch.float32
    assert len(split.x_train) + len(split.x_test) == 1797 and split.num_classes == 10
    assert abs(float(split.x_train.mean())) < 1e-5  # standardised on the training set
    again = data.digits(seed=0)
    assert torch.equal(split.y_train, again.y_train) and torch.equal(split.x_test, again.x_test)
    rare = data.digits(seed=0, keep_fraction={3: 0.1})
    counts = torch.bincount(rare.y_train, minlength=10)
    assert counts[3] == round(0.1 * int(torch.bincount(split.y_train)[3]))
    assert torch.equal(rare.y_test, split.y_test)  # the test set stays balanced


def test_digits_leaves_a_feature_constant_in_training_unscaled():
    # seed 2: pixel 24 is 0 on every training image, not on two test images
    split = data.digits(seed=2)
    assert float(split.x_train[:, 24].abs().max()) == 0.0
    assert 0 < float(split.x_test[:, 24].abs().max()) <= 16  # a raw pixel
    assert float(split.x_test.abs().max()) < 100


def test_fit_learns_digits_and_is_repeatable():
    split = data.digits(seed=0)
    runs = []
    for _ in range(2):
        model = train.linear_model(64, 10, seed=1)
        runs.append(train.fit(model, split.x_train, split.y_train, celib.cross_entropy, epochs=3, lr=0.1,
                              x_test=split.x_test, y_test=split.y_test))
    assert runs[0].train_loss == runs[1].train_loss
    assert runs[0].train_loss[-1] < runs[0].train_loss[0] < np.log(10) + 0.5
    assert runs[0].test_accuracy[-1] > 0.85


def test_binary_models_predict_with_a_sigmoid():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0]]))
        model.bias.zero_()
    x = torch.tensor([[2.0, 0.0], [-1.0, 5.0]])
    assert train.predict(model, x).tolist() == [1, 0]
    assert train.accuracy(model, x, torch.tensor([1.0, 1.0])) == 0.5
    torch.testing.assert_close(train.predict_proba(model, x)[:, 0], torch.sigmoid(torch.tensor([2.0, -1.0])))


def test_reliability_and_ece():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    r = metrics.reliability(probs, labels, n_bins=5)
    # confidences 0.9, 0.8, 0.7, 0.6 fall in bins 4, 3, 3, 2 (edges 0, .2, .4, .6, .8, 1; right-inclusive)
    assert r.count.tolist() == [0, 0, 1, 2, 1]
    np.testing.assert_allclose(r.accuracy[2:], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(r.confidence[2:], [0.6, 0.75, 0.9])
    assert r.ece == pytest.approx((1 * 0.4 + 2 * 0.25 + 1 * 0.1) / 4)
    with pytest.raises(ValueError):
        metrics.reliability(probs, labels[:3])


def test_calibrated_ece_is_the_binomial_noise_of_a_calibrated_model():
    # confidence 1: always right, so every simulated ECE is exactly 0
    sure = np.tile([0.0, 1.0, 0.0], (50, 1))
    assert metrics.calibrated_ece(sure, n_draws=20).tolist() == [0.0] * 20
    # one bin, confidence 0.7 on n = 400: ECE = |hits / n - 0.7| with hits
    # ~ Binomial(n, 0.7); its mean is sqrt(2 / pi) * sqrt(0.7 * 0.3 / n)
    probs = np.tile([0.7, 0.3], (400, 1))
    draws = metrics.calibrated_ece(probs, n_draws=4000, seed=1)
    expected = np.sqrt(2 / np.pi) * np.sqrt(0.21 / 400)
    assert draws.shape == (4000,) and abs(draws.mean() / expected - 1) < 0.05
    # seeded: the same draws again, other draws with another seed
    np.testing.assert_array_equal(draws, metrics.calibrated_ece(probs, n_draws=4000, seed=1))
    assert not np.array_equal(draws[:10], metrics.calibrated_ece(probs, n_draws=10, seed=2))
    with pytest.raises(ValueError, match="probs must be"):
        metrics.calibrated_ece(np.ones(5))


def test_per_class_recall():
    recall = metrics.per_class_recall(np.array([0, 1, 1, 2, 0]), np.array([0, 1, 2, 2, 1]), 4)
    np.testing.assert_allclose(recall[:3], [1.0, 0.5, 0.5])
    assert np.isnan(recall[3])


def test_plot_style_has_opaque_white_background():
    plot.use_style()
    import matplotlib as mpl

    assert mpl.rcParams["figure.facecolor"] == "white" and mpl.rcParams["savefig.transparent"] is False
    fig, axes = plot.figure(1, 2)
    assert fig.get_size_inches().tolist() == [8.4, 4.0] and len(axes) == 2


def test_penalty_widget_numbers_come_from_celib():
    page = widgets.penalty_of_confidence_html()
    payload = json.loads(re.search(r"var d = (\{.*?\});", page).group(1))
    assert payload["p"][0] == "0.01" and payload["p"][-1] == "1.00" and len(payload["p"]) == 100
    assert payload["x"] == sorted(payload["x"])  # the slider runs along the x-axis: larger p, further right
    lookup = dict(zip(payload["p"], payload["loss"]))
    assert lookup["0.10"] == "2.30" and lookup["0.60"] == "0.51" and lookup["1.00"] == "0.00"
    for label in ("p = 0.99: 0.01", "p = 0.6: 0.51", "p = 0.1: 2.30", "p = 0.01: 4.61"):
        assert label in page


def test_celib_imports_and_runs_on_cpu_without_triton():
    code = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is not installed (simulated)")
sys.meta_path.insert(0, NoTriton())
import torch, celib
x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
assert torch.equal(celib.cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))
assert torch.equal(celib.cross_entropy(x, t, backend="auto"), torch.nn.functional.cross_entropy(x, t))
assert "triton" not in sys.modules
try:
    celib.cross_entropy(x, t, backend="triton")
except Exception as err:
    print(type(err).__name__, err)
else:
    raise SystemExit("backend='triton' did not raise without triton")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "triton" in out.stdout.lower()


def test_import_celib_leaves_the_book_helpers_out():
    """A user of the library meets no book plumbing: no celib.book, scikit-learn or matplotlib."""
    code = ("import sys, celib, celib.nn, celib.kernels, celib.linear\n"
            "loaded = [m for m in sys.modules if m.startswith(('celib.book', 'sklearn', 'matplotlib'))]\n"
            "print(loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_solutions_run_every_block_in_its_own_namespace(tmp_path):
    from celib.book import solutions

    def md(text):
        return {"cell_type": "markdown", "metadata": {}, "source": [text]}

    nb = {"cells": [
        md("```{exercise} E\n:label: e\n```python\nnot run = 1\n```\n```"),
        md("````{solution} e\n```python\nx = 2\nseen.append(x)\n```\n"
           "```python\nassert x == 1\nseen.append(x)\n```\n````"),
    ]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    seen = []
    assert solutions.run(path, {"x": 1, "seen": seen}) == 2
    assert seen == [2, 1]  # the second block did not see the first's x
    nb["cells"][1]["source"] = ["````{solution} e\n```python\nassert x == 2\n```\n````"]
    path.write_text(json.dumps(nb))
    with pytest.raises(AssertionError):
        solutions.run(path, {"x": 1})


def test_fit_stack_trains_each_network_as_fit_would_alone():
    """Each network on its own data, seed and rate: as fit would train it alone."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 40, 5), torch.randint(0, 3, (2, 40))
    nets = train.mlp_stack([3, 4], 5, 3, hidden=8)

    def losses(z, t):  # (K, n, C), (K, n) -> (K,)
        k, n, c = z.shape
        return celib.cross_entropy(z.reshape(k * n, c), t.reshape(-1), reduction="none").view(k, n).mean(1)

    train.fit_stack(nets, x, y, losses, lr=[0.1, 0.5], epochs=30)
    assert not any(p.requires_grad for p in nets.parameters())  # the caller's stack is left as it was
    out = nets(x)
    for k, (seed, lr) in enumerate([(3, 0.1), (4, 0.5)]):
        alone = train.linear_model(5, 3, hidden=8, seed=seed)
        train.fit(alone, x[k], y[k], celib.cross_entropy, epochs=30, lr=lr, batch_size=40)
        with torch.no_grad():
            torch.testing.assert_close(out[k], alone(x[k]), rtol=1e-4, atol=1e-5)
    assert (out[0] - out[1]).abs().max() > 0.1


def test_fit_stack_refuses_a_loss_averaged_over_networks_and_a_wrong_number_of_rates():
    x, y = torch.randn(2, 10, 5), torch.randint(0, 3, (2, 10))
    nets = train.mlp_stack([0, 1], 5, 3, hidden=4)
    before = nets.w1.clone()

    def averaged(z, t):  # one scalar for both networks: every gradient would be halved
        return celib.cross_entropy(z.reshape(-1, 3), t.reshape(-1))

    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        train.fit_stack(nets, x, y, averaged, lr=0.1, epochs=1)
    with pytest.raises(ValueError, match="1 or 2 learning rates"):
        train.fit_stack(nets, x, y, averaged, lr=[0.1, 0.2, 0.3], epochs=1)
    assert torch.equal(nets.w1, before) and not nets.w1.requires_grad
