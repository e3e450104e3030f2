"""Tests of the example combinator: found by entry point, resolved and explained through the
tree protocol like a built-in, its loss and its learned weights."""

from __future__ import annotations

import torch
from makd_uncertainty import UncertaintySum

from makd_registry import Feature, FeatureSet, make_plugin_manager, make_registry
from makd_registry.explain import explain_dict
from makd_registry.features import ModelInfo
from makd_registry.testing import diagnostics, registry_with, resolve

OBJECTIVE = """
teacher: {config: {num_hidden_layers: 6}}
student: {config: {num_hidden_layers: 2}}
objective:
  type: uncertainty_sum
  layers: uniform
  terms:
    - {type: hidden_mse, weight: 2}
    - {type: logits_kd, temperature: 2}
"""


def test_found_through_its_entry_point():
    registry = make_registry(make_plugin_manager())
    entry = registry.entries["uncertainty_sum"]
    assert entry.plugin.distribution == "makd-uncertainty" and not entry.plugin.builtin


def test_children_inherit_the_mapping_and_explain_shows_them():
    resolved = resolve(OBJECTIVE, registry_with(UncertaintySum))
    root = resolved.root
    assert [c.path for c in root.children] == [
        "uncertainty_sum/hidden_mse",
        "uncertainty_sum/logits_kd",
    ]
    assert root.children[0].pairs == ((0, 2), (1, 5))  # inherited `layers: uniform`
    tree = explain_dict(resolved)["objective"]
    assert [c["effective_weight"] for c in tree["children"]] == [2.0, 1.0]


def test_duplicate_children_and_bad_options_are_located():
    text = OBJECTIVE.replace("{type: logits_kd, temperature: 2}", "{type: hidden_mse}")
    (diag,) = diagnostics(text, registry_with(UncertaintySum))
    assert diag.path == "objective.terms[1].type" and "duplicate name" in diag.message
    (diag,) = diagnostics(
        OBJECTIVE.replace("layers: uniform", "layers: uniform\n  initial_log_variance: 99"),
        registry_with(UncertaintySum),
    )
    assert diag.path == "objective.initial_log_variance"


def _features():
    gen = torch.Generator().manual_seed(0)
    h = {i: torch.randn(2, 4, 8, generator=gen) for i in range(3)}
    return FeatureSet(
        teacher_features={
            (Feature.HIDDEN, 2): h[0],
            (Feature.HIDDEN, 5): h[1],
            (Feature.LOGITS, None): torch.randn(2, 3, generator=gen),
        },
        student_features={
            (Feature.HIDDEN, 0): h[2].requires_grad_(True),
            (Feature.HIDDEN, 1): h[0].clone().requires_grad_(True),
            (Feature.LOGITS, None): torch.randn(2, 3, generator=gen).requires_grad_(True),
        },
        attention_mask=torch.ones(2, 4),
    )


def test_loss_is_the_precision_weighted_sum_and_trains_the_log_variances():
    root = resolve(OBJECTIVE, registry_with(UncertaintySum)).root
    info = ModelInfo(num_layers=6, hidden_size=8, num_heads=2)
    root.build(info, ModelInfo(num_layers=2, hidden_size=8, num_heads=2))
    (s,) = root.modules()["log_variance"].parameters()
    with torch.no_grad():
        s.copy_(torch.tensor([0.5, -1.0]))
    features = _features()
    terms = [c.weight * c.loss(features) for c in root.children]
    want = sum(torch.exp(-s[i]) * terms[i] + s[i] for i in range(2))
    got = root.loss(features)
    torch.testing.assert_close(got, want)
    got.backward()
    # d/ds_i = 1 − exp(−s_i)·w_i·L_i
    expected = torch.stack([1 - torch.exp(-s[i]) * terms[i] for i in range(2)]).detach()
    torch.testing.assert_close(s.grad, expected)


def test_makd_run_trains_the_log_variances_and_saves_them(tmp_path, monkeypatch):
    """`makd run` end to end with the plugin found through its entry point."""
    from pathlib import Path

    from safetensors.torch import load_file

    from makd_registry.cli import main

    root = Path(__file__).resolve().parents[3]
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "cache"))
    tiny = (
        "{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: %d, "
        "num_attention_heads: 4, intermediate_size: 64, max_position_embeddings: 64}"
    )
    objective = tmp_path / "uncertainty.yaml"
    objective.write_text(
        f"""
teacher:
  config: {tiny % 2}
  tokenizer: {root / "data" / "tokenizers" / "bert-uncased"}
  finetune: {{steps: 2, learning_rate: 1.0e-3}}
student: {{config: {tiny % 1}}}
data:
  task: classification
  train: {root / "data" / "sst2" / "train-2k.tsv"}
  max_length: 32
  train_limit: 32
training: {{steps: 3, batch_size: 8, learning_rate: 1.0e-2}}
objective:
  type: uncertainty_sum
  layers: uniform
  terms:
    - {{type: hidden_mse}}
    - {{type: logits_kd, temperature: 2}}
""",
        encoding="utf-8",
    )
    assert main(["run", str(objective), "--output", str(tmp_path / "run")]) == 0
    saved = load_file(tmp_path / "run" / "student" / "aspect_modules.safetensors")
    (key,) = [k for k in saved if "log_variance" in k]
    assert saved[key].shape == (2,) and (saved[key] != 0).all()  # trained from 0
