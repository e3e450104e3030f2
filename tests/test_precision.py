"""``training.precision: bf16`` on the CPU: bf16 autocast whose losses match fp32's within 1%."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from test_engine import SST2, TOKENIZER

from makd_registry.cli import main

OBJECTIVE = """\
teacher: {{model: {teacher}, tokenizer: {tokenizer}}}
student: {{teacher_layers: [0, 2]}}
data: {{task: classification, train: {train}, max_length: 32, train_limit: 64}}
training: {{steps: 3, batch_size: 16, learning_rate: 1.0e-3, log_every: 1, precision: {precision}}}
objective:
  type: sum
  terms:
    - type: sum
      name: layerwise
      layers: uniform
      terms: [{{type: attention_kl}}, {{type: hidden_mse}}]
    - {{type: logits_kd, name: logits, temperature: 2.0, alpha: 0.5}}
"""


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("teacher") / "model"
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def test_bf16_autocast_on_the_cpu_matches_fp32_within_one_percent(tmp_path, teacher_dir):
    terms = {}
    for precision in ("fp32", "bf16"):
        path = tmp_path / f"{precision}.yaml"
        path.write_text(
            OBJECTIVE.format(
                teacher=teacher_dir,
                tokenizer=TOKENIZER,
                train=SST2 / "train-2k.tsv",
                precision=precision,
            )  # fmt: skip
        )
        out = tmp_path / precision
        assert main(["run", str(path), "-o", str(out)]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        terms[precision] = [r for r in rows if r["kind"] == "train"][0]["terms"]
    assert terms["fp32"].keys() == terms["bf16"].keys()
    for name, value in terms["fp32"].items():
        assert terms["bf16"][name] == pytest.approx(value, rel=1e-2), name
    assert terms["bf16"] != terms["fp32"]  # bf16 did run: not bit-identical
