"""Tests of the example callback: found by entry point, validated with located errors,
its decisions, and `makd run` ending early and finishing normally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from makd_earlystop import EarlyStopping

from makd_registry import make_plugin_manager, make_registry
from makd_registry.callbacks import Control, LoopState
from makd_registry.cli import main

ROOT = Path(__file__).resolve().parents[3]
TINY = (
    "{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: %d, "
    "num_attention_heads: 4, intermediate_size: 64, max_position_embeddings: 64}"
)


def objective(tmp_path: Path, callbacks: str, steps: int = 8) -> Path:
    path = tmp_path / "early.yaml"
    path.write_text(
        f"""
teacher:
  config: {TINY % 2}
  tokenizer: {ROOT / "data" / "tokenizers" / "bert-uncased"}
  finetune: {{steps: 2, learning_rate: 1.0e-3}}
student: {{config: {TINY % 1}}}
data:
  task: classification
  train: {ROOT / "data" / "sst2" / "train-2k.tsv"}
  validation: {ROOT / "data" / "sst2" / "dev.tsv"}
  max_length: 32
  train_limit: 32
  validation_limit: 16
training:
  steps: {steps}
  batch_size: 8
  eval_every: 1
  callbacks: {callbacks}
objective: {{type: logits_kd, temperature: 2}}
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "makd-cache"))


def test_found_through_its_entry_point():
    registry = make_registry(make_plugin_manager())
    entry = registry.callbacks["early_stopping"]
    assert entry.plugin.distribution == "makd-earlystop" and not entry.plugin.builtin


@pytest.mark.parametrize(
    ("metric", "values", "stops_at"),
    [
        ("accuracy", [0.5, 0.6, 0.6, 0.55], 4),  # patience 2: the 2nd evaluation without gain
        ("perplexity", [100.0, 90.0, 95.0, 91.0], 4),  # lower is better
        ("accuracy", [0.5, 0.6, 0.7, 0.8], None),
    ],
)
def test_it_stops_after_patience_evaluations_without_improvement(metric, values, stops_at):
    callback = EarlyStopping(EarlyStopping.Config(type="early_stopping", patience=2))
    state = LoopState(role="student", step=0, max_steps=10, main_metric=metric)
    stopped = None
    for step, value in enumerate(values, 1):
        control = Control()
        state.step = step
        callback.on_evaluate(state, control, {metric: value})
        if control.should_stop:
            stopped = step
            assert "did not improve" in control.stop_reason
            break
    assert stopped == stops_at


def test_a_bad_option_is_located(tmp_path, capsys):
    path = objective(tmp_path, "[{type: early_stopping, patience: 0}]")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "training.callbacks[0].patience" in err


def test_makd_run_stops_early_and_finishes_normally(tmp_path, capsys):
    # min_delta 1: no change of accuracy counts, so it stops at the 2nd evaluation
    path = objective(tmp_path, "[{type: early_stopping, patience: 1, min_delta: 1.0}]")
    run = tmp_path / "run"
    assert main(["run", str(path), "--output", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_at"] == 2 and "did not improve" in summary["stop_reason"]
    assert summary["student"]  # evaluated at the step it stopped
    assert (run / "student" / "model.safetensors").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 2
    capsys.readouterr()
    assert main(["run", str(path), "--output", str(run), "--resume"]) == 0  # finished
    printed = capsys.readouterr()
    assert "already stopped at step 2 of 8" in " ".join((printed.out + printed.err).split())
