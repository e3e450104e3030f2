"""The SeqKD pass: teacher targets generated once, cached on disk, reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from makd_registry.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizers" / "bert-uncased"
SST2 = ROOT / "data" / "sst2"


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("MAKD_CACHE_DIR", str(path))
    return path


def test_classification_seqkd_trains_on_cached_teacher_pseudo_labels(tmp_path, cache, capsys):
    objective = tmp_path / "seqkd.yaml"
    objective.write_text(
        f"""\
teacher:
  config: {{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 2,
           num_attention_heads: 4, intermediate_size: 64, max_position_embeddings: 64}}
  tokenizer: {TOKENIZER}
  finetune: {{steps: 4, learning_rate: 1.0e-3}}
student: {{teacher_layers: [1]}}
data: {{task: classification, train: {SST2 / "train-2k.tsv"}, validation: {SST2 / "dev.tsv"},
       max_length: 32, train_limit: 40, validation_limit: 16}}
training: {{steps: 3, batch_size: 8}}
objective: {{type: seqkd}}
""",
        encoding="utf-8",
    )
    assert main(["run", str(objective), "--output", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "seqkd: the teacher labelled 40 training rows" in err
    (cached,) = (cache / "seqkd").glob("*.safetensors")
    labels = load_file(cached)["generated"]
    assert labels.shape == (40,) and set(labels.tolist()) <= {0, 1}
    # the pseudo-labels are the fine-tuned teacher's predictions
    (teacher_dir,) = (cache / "teachers").iterdir()
    from makd_registry.data.collate import collate
    from makd_registry.data.tasks import load_task_data
    from makd_registry.models.serialization import load_student
    from makd_registry.models.tokenizers import load_tokenizer
    from makd_registry.objective import load_objective
    from makd_registry.plugins import make_registry

    spec = load_objective(objective, make_registry()).spec
    data = load_task_data(spec.data, load_tokenizer(str(TOKENIZER)), base_dir=tmp_path)
    batch = collate(list(data.train), 0)
    teacher = load_student(teacher_dir)
    with torch.no_grad():
        predicted = teacher(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).logits.argmax(-1)
    assert torch.equal(predicted, labels)
    # a second run reuses the cache
    assert main(["run", str(objective), "--output", str(tmp_path / "b")]) == 0
    assert "seqkd: reusing the teacher's targets" in capsys.readouterr().err


def test_causal_lm_seqkd_trains_on_teacher_continuations(tmp_path, cache, capsys):
    text = tmp_path / "text.txt"
    text.write_text((SST2 / "dev.tsv").read_text(encoding="utf-8"), encoding="utf-8")
    objective = tmp_path / "lm.yaml"
    objective.write_text(
        f"""\
teacher:
  config: {{model_type: gpt2, vocab_size: 30522, n_embd: 32, n_layer: 2, n_head: 4,
           n_positions: 64, pad_token_id: 0, bos_token_id: 102, eos_token_id: 102}}
  tokenizer: {TOKENIZER}
  finetune: {{steps: 3, learning_rate: 1.0e-3}}
student: {{teacher_layers: [1]}}
data: {{task: causal_lm, train: {text}, validation: {text}, text_column: text,
       max_length: 16, train_limit: 200, validation_limit: 100}}
training: {{steps: 2, batch_size: 4}}
objective:
  type: sum
  terms: [{{type: seqkd, max_new_tokens: 10}}, {{type: logits_kd}}]
""",
        encoding="utf-8",
    )
    assert main(["run", str(objective), "--output", str(tmp_path / "run")]) == 0
    (cached,) = (cache / "seqkd").glob("*.safetensors")
    targets = load_file(cached)
    ids, generated, mask = targets["input_ids"], targets["generated"], targets["attention_mask"]
    assert ids.shape[1] == 16
    assert (generated[:, :6] == -100).all()  # the 6-token prompts are not targets
    kept = generated[:, 6:] != -100
    assert kept[:, 0].all()  # at least one generated token per row
    assert torch.equal(generated[:, 6:][kept], ids[:, 6:][kept])
    assert torch.equal(mask[:, 6:].bool(), kept)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student"]["perplexity"] > 1
