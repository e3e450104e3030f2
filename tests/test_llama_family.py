"""Llama-family models end to end: the shipped Qwen2 objectives (GQA, RoPE, gated MLP
teacher trained by makd; 2-layer and factorized students), each run briefly at a tiny
size through `makd run`, with the shipped objective otherwise unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from makd_registry.cli import main

ROOT = Path(__file__).resolve().parents[1]

#: the same architecture at a test's size and budget
TINY = [
    "teacher.config.hidden_size=32",
    "teacher.config.intermediate_size=64",
    "teacher.config.num_attention_heads=4",
    "teacher.config.num_key_value_heads=2",
    "teacher.finetune.steps=3",
    "teacher.finetune.warmup_steps=0",
    "data.max_length=32",
    "data.train_limit=300",
    "data.validation_limit=100",
    "training.steps=3",
    "training.batch_size=4",
    "training.warmup_steps=0",
    "training.eval_every=3",
    "training.checkpoint_every=3",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "makd-cache"))


@pytest.mark.parametrize("name", ["qwen2-kd", "qwen2-makd", "qwen2-makd-factorized"])
def test_a_qwen2_objective_trains_end_to_end(name, tmp_path):
    args = ["run", str(ROOT / "objectives" / f"{name}.yaml"), "--output", str(tmp_path / "r")]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["student"]["perplexity"] > 1 and summary["teacher"]["perplexity"] > 1
    record = json.loads((tmp_path / "r" / "student" / "makd_student.json").read_text())
    config = json.loads((tmp_path / "r" / "student" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_key_value_heads"] == 2
    if name.endswith("factorized"):
        assert "factorize" in json.dumps(record["recipe"])
    else:
        assert config["num_hidden_layers"] == 2
