"""The student's word embeddings in training: the CPU's sparse-to-dense gradient path is the
dense gradient exactly; ``training.embeddings: freeze`` leaves them untouched."""

from __future__ import annotations

import json

import torch
import transformers
from safetensors.torch import load_file

from makd_registry.engine.embeddings import EmbeddingGradients
from makd_registry.testing.adapters import sample_batch


def _student(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).train()


def _grads(model, batch, path):
    for micro in (batch, batch):  # two micro-batches accumulate
        out = model(**{k: micro[k] for k in ("input_ids", "attention_mask")})
        out.logits.square().sum().backward()
    path.densify()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_sparse_path_gives_the_dense_gradient(tmp_path):
    batch = sample_batch(200)
    dense, sparse = _student(), _student()
    off = EmbeddingGradients(dense, torch.device("meta"))  # not the CPU: inactive
    on = EmbeddingGradients(sparse, torch.device("cpu"))
    assert off.embedding is None and on.embedding is not None
    assert sparse.get_input_embeddings().sparse
    a, b = _grads(dense, batch, off), _grads(sparse, batch, on)
    assert a.keys() == b.keys()
    for name in a:
        assert not b[name].is_sparse
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-8, msg=name)
    buffer = on.buffer
    sparse.zero_grad(set_to_none=True)
    _grads(sparse, batch, on)
    assert on.buffer is buffer  # reused, not allocated again
    on.close()
    assert not sparse.get_input_embeddings().sparse


def test_tied_embeddings_keep_the_dense_path():
    config = transformers.GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    assert EmbeddingGradients(model, torch.device("cpu")).embedding is None


def test_frozen_embeddings_are_not_trained(tmp_path, monkeypatch):
    from test_engine import write_objective

    from makd_registry.cli import main

    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "cache"))
    path = write_objective(tmp_path, steps=2)
    outputs = {}
    for mode in ("train", "freeze"):
        out = tmp_path / mode
        assert main(["run", str(path), "-o", str(out), "--set", f"training.embeddings={mode}"]) == 0
        outputs[mode] = load_file(out / "student" / "model.safetensors")
    key = "bert.embeddings.word_embeddings.weight"
    assert main(["student", str(path), "-o", str(tmp_path / "initial")]) == 0  # same seed stream
    initial = load_file(tmp_path / "initial" / "model.safetensors")
    assert torch.equal(outputs["freeze"][key], initial[key])  # untouched
    assert not torch.equal(outputs["train"][key], initial[key])
    other = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(outputs["freeze"][other], initial[other])  # the rest trains
    record = json.loads((tmp_path / "freeze" / "objective.resolved.json").read_text())
    assert record["training"]["embeddings"] == "freeze"
