"""celib.integrations.transformers against the stock loss of tiny transformers models (built from
configs, random weights, no download): equal losses and gradients, Trainer with gradient
accumulation, the fused path without logits, the errors."""

from __future__ import annotations

import inspect
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers as tf

import celib
from celib.integrations.transformers import (
    FUSED_MODEL_TYPES,
    apply_celib,
    causal_lm_loss,
    remove_celib,
    shift_labels,
)
from tests import bounds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from hf_tiny import CONFIGS, SMALL, V, train_with_accumulation  # noqa: E402
from hf_tiny import model as _model  # noqa: E402
from hf_tiny import truth as _truth  # noqa: E402


def _batch(seed=0, b=3, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[-1, -3:] = -100  # padding
    return ids, labels


def _loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    out.loss = out.loss.detach()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_float64_loss_and_every_gradient_equal_the_truth(kind, fused):
    ids, labels = _batch()
    model = _model(kind)
    want, want_grads = _truth(model, ids, labels)
    apply_celib(model, fused_linear=fused, chunk_size=8)
    out, grads = _loss_and_grads(model, ids, labels)
    assert out.loss.dtype == torch.float64
    assert abs(out.loss.item() - float(want)) <= 1e-12 * float(want)
    assert grads.keys() == want_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert _rel(grad, want_grads[name]) <= 1e-12, name
    assert (out.logits is None) == fused  # training mode: the fused path returns no logits


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2"])
def test_float32_no_worse_than_the_stock_float32_loss(kind, fused):
    """float32 against the float64 truth, bounded by the stock model's own float32 error (x4, as
    everywhere in these tests, plus 16 u of the value): the summation order differs, the accuracy may not."""
    ids, labels = _batch(1)
    truth, truth_grads = _truth(_model(kind), ids, labels)
    model = _model(kind, torch.float32)
    stock, stock_grads = _loss_and_grads(model, ids, labels)
    apply_celib(model, fused_linear=fused, chunk_size=8)
    out, grads = _loss_and_grads(model, ids, labels)
    slack = 16 * bounds.U32
    err, stock_err = abs(out.loss.item() - float(truth)), abs(float(stock.loss) - float(truth))
    assert err <= bounds.TORCH_FACTOR * stock_err + slack * float(truth)
    for name, grad in grads.items():
        want = truth_grads[name]
        assert _rel(grad.double(), want) <= bounds.TORCH_FACTOR * _rel(stock_grads[name].double(), want) + slack


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_bfloat16_no_worse_than_the_stock_bfloat16_loss(fused):
    """The dtype models train in on GPUs: the same weights in float64 are the truth; celib's error is
    bounded by the stock bf16 model's (x4) plus 16 units of bf16 rounding (2**-8) of the value."""
    ids, labels = _batch(7)
    model = _model("llama", torch.bfloat16)
    truth, truth_grads = _truth(_as_double(model), ids, labels)
    stock, stock_grads = _loss_and_grads(model, ids, labels)
    apply_celib(model, fused_linear=fused, chunk_size=8)
    out, grads = _loss_and_grads(model, ids, labels)
    assert out.loss.dtype == stock.loss.dtype == torch.float32
    slack = 16 * 2.0**-8
    assert abs(out.loss.item() - float(truth)) <= 4 * abs(stock.loss.item() - float(truth)) + slack * float(truth)
    for name, grad in grads.items():
        want = truth_grads[name]
        assert _rel(grad.double(), want) <= 4 * _rel(stock_grads[name].double(), want) + slack, name


def _as_double(model):
    import copy

    return copy.deepcopy(model).double()


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_num_items_in_batch_and_shift_labels_as_transformers(fused):
    ids, labels = _batch(2)
    model = _model("llama")
    n = torch.tensor(40)
    want, want_grads = _truth(model, ids, labels, num_items=40)
    apply_celib(model, fused_linear=fused)
    out, grads = _loss_and_grads(model, ids, labels, num_items_in_batch=n)
    assert abs(out.loss.item() - float(want)) <= 1e-12 * float(want)
    assert all(_rel(g, want_grads[k]) <= 1e-12 for k, g in grads.items())
    # targets already shifted (a padding-free collator's): used instead of shifting the labels
    unrelated = torch.zeros_like(labels)
    out = model(input_ids=ids, labels=unrelated, shift_labels=shift_labels(labels), num_items_in_batch=n)
    assert abs(out.loss.item() - float(want)) <= 1e-12 * float(want)


def test_causal_lm_loss_is_transformers_for_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, V, generator=g)
    ids, labels = _batch(3, b=2, t=7)
    for n in (None, torch.tensor(9)):
        want = ForCausalLMLoss(logits, labels, V, num_items_in_batch=n)
        got = causal_lm_loss(logits, labels, V, num_items_in_batch=n)
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want)  # same float32 operations in the same order
    bf16 = logits.bfloat16()
    want = ForCausalLMLoss(bf16, labels, V)  # transformers upcasts the logits to float32
    assert torch.equal(causal_lm_loss(bf16, labels, V), want)
    with pytest.raises(celib.InputError, match="vocab_size is 90"):
        causal_lm_loss(logits, labels, 90)
    with pytest.raises(celib.InputError, match="labels of shape"):
        causal_lm_loss(logits, labels[:, :5], V)


def test_shift_labels():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert shift_labels(labels).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]
    assert shift_labels(labels, ignore_index=-1)[:, -1].tolist() == [-1, -1]


def test_fused_returns_logits_only_when_asked():
    ids, labels = _batch(4)
    model = _model("llama")
    stock_logits = model(input_ids=ids).logits
    apply_celib(model, fused_linear=True)
    assert model(input_ids=ids, labels=labels).logits is None  # a training step
    model.eval()  # as from_pretrained returns it: a step with gradients still skips the logits
    assert model(input_ids=ids, labels=labels).logits is None
    with torch.no_grad():  # evaluation keeps them
        out = model(input_ids=ids, labels=labels)
    assert torch.equal(out.logits, stock_logits)
    model.train()
    apply_celib(model, fused_linear=True, return_logits=True)
    assert torch.equal(model(input_ids=ids, labels=labels).logits, stock_logits)
    # without labels (generation) the model runs as before, logits_to_keep included
    last = model(input_ids=ids, logits_to_keep=1).logits  # one row per sequence: other matmul blocking
    assert last.shape == (3, 1, V) and torch.allclose(last, stock_logits[:, -1:], rtol=1e-12, atol=0)
    with pytest.raises(celib.InputError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)


def test_fused_never_materialises_the_logits():
    """No (B, T, V) tensor is saved for backward on the fused path; the logits path saves some."""
    ids, labels = _batch(5, b=2, t=24)
    rows, big = 48, 4096  # more rows than the hidden size (32): no weight-sized tensor passes for logits
    cfg = tf.LlamaConfig(**{**SMALL, "vocab_size": big})
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    for fused in (False, True):
        apply_celib(model, fused_linear=fused, chunk_size=8)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=labels % big).loss
        has_logits = any(big in s and s.numel() >= rows * big for s in map(torch.Size, saved))
        assert has_logits == (not fused)


def test_remove_celib_restores_the_stock_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    ids, labels = _batch(6)
    model = _model("gpt2", torch.float32)
    stock = model(input_ids=ids, labels=labels).loss
    apply_celib(model, fused_linear=True)
    assert model.forward is not type(model).forward.__get__(model)
    remove_celib(model)
    assert model.loss_function is ForCausalLMLoss and "forward" not in vars(model)
    assert torch.equal(model(input_ids=ids, labels=labels).loss, stock)
    apply_celib(model, fused_linear=True)
    apply_celib(model)  # a second call replaces the first
    assert "forward" not in vars(model)


def test_errors():
    with pytest.raises(celib.InputError, match="PreTrainedModel"):
        apply_celib(torch.nn.Linear(2, 2))
    bert = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=32))
    with pytest.raises(celib.InputError, match="not one of transformers' causal language models"):
        apply_celib(bert)
    double = tf.GPT2DoubleHeadsModel(CONFIGS["gpt2"]())  # an LM head, but its forward has its own loss
    with pytest.raises(celib.InputError, match="GPT2DoubleHeadsModel is not one of"):
        apply_celib(double)
    # a causal LM whose forward computes its loss itself: apply_celib could not reach it, so it refuses
    bart = tf.BartForCausalLM(tf.BartConfig(vocab_size=V, d_model=16, decoder_layers=1, encoder_layers=1,
                                            decoder_attention_heads=2, encoder_attention_heads=2,
                                            decoder_ffn_dim=16, encoder_ffn_dim=16))
    with pytest.raises(celib.InputError, match="BartForCausalLM computes its loss itself"):
        apply_celib(bart)
    torch.manual_seed(0)
    cohere = tf.AutoModelForCausalLM.from_config(tf.CohereConfig(**SMALL))  # scales its logits
    apply_celib(cohere)  # the loss on the logits: any causal LM
    with pytest.raises(celib.InputError, match="fused_linear=True is tested on model types"):
        apply_celib(cohere, fused_linear=True)
    assert set(FUSED_MODEL_TYPES) == set(CONFIGS)  # every type it accepts is tested above


def test_transformers_version_is_checked(monkeypatch):
    model = _model("gpt2")
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.46.0")
    with pytest.raises(ImportError, match=r"transformers >= 5\.0, found transformers 4\.46\.0"):
        apply_celib(model)


def test_import_celib_does_not_import_transformers():
    code = ("import sys, celib, celib.integrations; "
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trainer_with_gradient_accumulation_gives_the_stock_updates(kind, tmp_path):
    start = dict(_model(kind, torch.float32, seed=1).named_parameters())
    stock_losses, stock = train_with_accumulation(kind, "stock", str(tmp_path))
    assert len(stock_losses) == 2
    for route in ("apply_celib", "apply_celib fused_linear=True"):
        losses, params = train_with_accumulation(kind, route, str(tmp_path))
        assert losses == pytest.approx(stock_losses, rel=1e-5)
        for name, p in params.items():
            update, stock_update = p - start[name], stock[name] - start[name]
            assert stock_update.norm() > 0, name  # every parameter moved
            assert _rel(update, stock_update) <= 1e-4, (route, name)


def test_fused_output_positional_labels_and_tuples():
    """Labels passed by position are found; the output's dict and tuple views agree with its attributes
    (no logits in either when they are skipped); return_dict=False gives a tuple, loss first."""
    ids, labels = _batch(8)
    model = _model("gpt2")
    want, _ = _truth(model, ids, labels)
    apply_celib(model, fused_linear=True)
    # GPT2LMHeadModel.forward(input_ids, past_key_values, cache_position, attention_mask, token_type_ids,
    # position_ids, inputs_embeds, encoder_hidden_states, encoder_attention_mask, labels, ...)
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    position = names.index("labels")
    args = [ids] + [None] * (position - 1) + [labels]
    out = model(*args)
    assert abs(out.loss.item() - float(want)) <= 1e-12 * float(want)
    assert "logits" not in out.keys() and out.logits is None
    assert out.to_tuple()[0] is out.loss and all(t.dim() == 0 or t.shape[-1] != 0 for t in out.to_tuple() if torch.is_tensor(t))
    tup = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and abs(tup[0].item() - float(want)) <= 1e-12 * float(want)


def test_a_deep_copy_acts_on_its_own_weights():
    """As a reference model or an EMA copy is made: the copy's fused loss uses the copy's weights."""
    import copy

    ids, labels = _batch(9)
    model = apply_celib(_model("llama"), fused_linear=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    want, want_grads = _truth(copy.deepcopy(twin), ids, labels)
    model.zero_grad(set_to_none=True)
    out, grads = _loss_and_grads(twin, ids, labels)
    assert abs(out.loss.item() - float(want)) <= 1e-12 * float(want)
    assert all(_rel(g, want_grads[k]) <= 1e-12 for k, g in grads.items())
    assert all(p.grad is None for p in model.parameters())  # the original took no part


def test_a_replaced_output_layer_is_used():
    ids, labels = _batch(10)
    model = apply_celib(_model("llama"), fused_linear=True)
    model.resize_token_embeddings(V + 3)  # a new embedding and output layer of V + 3 rows
    assert model.get_output_embeddings().weight.shape[0] == V + 3
    want = float(_truth(model, ids, labels)[0])  # the truth reads V + 3 from the logits
    assert abs(model(input_ids=ids, labels=labels).loss.item() - want) <= 1e-12 * want


def test_accelerate_hooks_on_the_output_layer_are_kept():
    """accelerate replaces a layer's forward with its hooks' (device maps, offloading): the fused path
    goes through them, and leaves them in place; an offloaded weight is refused with the way out."""
    from accelerate import cpu_offload
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    ids, labels = _batch(11)
    model = apply_celib(_model("llama"), fused_linear=True)
    add_hook_to_module(model.lm_head, Count())
    hooked = vars(model.lm_head)["forward"]
    model(input_ids=ids, labels=labels)
    assert Count.calls == 1 and vars(model.lm_head)["forward"] is hooked

    offloaded = _model("llama", torch.float32)
    stock = offloaded(input_ids=ids, labels=labels).loss.item()
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.lm_head.weight.is_meta
    model_forward = vars(offloaded)["forward"]  # accelerate's hooks on the model itself
    apply_celib(offloaded, fused_linear=True)
    with pytest.raises(celib.InputError, match="offloaded by accelerate"):
        offloaded(input_ids=ids, labels=labels)
    apply_celib(offloaded)  # the loss on the logits works there
    assert offloaded(input_ids=ids, labels=labels).loss.item() == pytest.approx(stock, rel=1e-6)
    remove_celib(offloaded)
    assert vars(offloaded)["forward"] is model_forward  # restored, not deleted
    assert offloaded(input_ids=ids, labels=labels).loss.item() == pytest.approx(stock, rel=1e-6)


FSDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist, transformers as tf
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, os.getcwd())
import celib
from celib.integrations.transformers import apply_celib
from tests.test_transformers_integration import SMALL, _batch
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
ids, labels = _batch(12)
losses = {}
for shard_head in (False, True):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, tie_word_embeddings=False))
    stock = model(input_ids=ids, labels=labels).loss.item()
    apply_celib(model, fused_linear=True)
    for layer in model.model.layers:
        fully_shard(layer)
    if shard_head:
        fully_shard(model.lm_head)
    fully_shard(model)
    try:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        print("head in root", abs(loss.item() - stock) <= 1e-5 * stock)
    except celib.InputError as err:
        print("head sharded alone", "DTensor shard" in str(err))
dist.destroy_process_group()
"""


def test_fsdp2_head_in_the_root_works_and_a_head_sharded_alone_is_refused():
    out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["head in root True", "head sharded alone True"]
