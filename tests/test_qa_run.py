"""Extractive QA end to end: windows over long contexts, span → text mapping, a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from makd_registry.cli import main
from makd_registry.data.tasks import load_task_data
from makd_registry.engine.evaluate import evaluate, qa_best_spans, qa_predictions
from makd_registry.objective.sections import DataSection

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizers" / "bert-uncased"
SQUAD = ROOT / "data" / "squad"

FILLER = " ".join(f"word{i}" for i in range(60))  # far more than one window of 32 tokens
CONTEXT = f"Intro. {FILLER} the purple zebra ran. {FILLER} the end."
ANSWER = "purple zebra"
OTHER = f"Topic: {FILLER} Animals, in the end."


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def squad_file(path: Path) -> Path:
    qas = [
        {
            "id": "zebra",
            "question": "Which animal ran?",
            "answers": [{"text": ANSWER, "answer_start": CONTEXT.index(ANSWER)}],
        },
        {
            "id": "start",
            "question": "What is the topic?",
            "answers": [{"text": "Animals", "answer_start": OTHER.index("Animals")}],
        },
    ]
    paragraphs = [{"context": CONTEXT, "qas": qas[:1]}, {"context": OTHER, "qas": qas[1:]}]
    document = {"data": [{"title": "t", "paragraphs": paragraphs}]}
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


class Pointer(nn.Module):
    """A stand-in QA model whose start/end logits point at given token ids."""

    def __init__(self, start_ids: list[int], end_ids: list[int]) -> None:
        super().__init__()
        self.start_ids, self.end_ids = torch.tensor(start_ids), torch.tensor(end_ids)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        start = torch.isin(input_ids, self.start_ids).float() * 10
        end = torch.isin(input_ids, self.end_ids).float() * 10
        return QuestionAnsweringModelOutput(start_logits=start, end_logits=end)


def test_long_contexts_are_windowed_and_spans_map_back_to_the_context(tmp_path, tokenizer):
    squad_file(tmp_path / "qa.json")
    spec = DataSection(task="qa", train="qa.json", validation="qa.json", max_length=32)
    data = load_task_data(spec, tokenizer, base_dir=tmp_path)
    n_tokens = len(tokenizer(CONTEXT)["input_ids"])
    assert n_tokens > 4 * 32
    raw = data.validation_raw
    assert raw["example"].count(0) >= 8 and raw["example"].count(1) >= 4
    assert raw["context"] == [CONTEXT, OTHER]
    assert all(len(row["input_ids"]) <= 32 for row in data.validation)
    # training keeps the window(s) holding the answer, far past the first window
    decoded = {
        tokenizer.decode(row["input_ids"][row["labels"][0] : row["labels"][1] + 1])
        for row in data.train
    }
    assert decoded == {ANSWER, "animals"}
    # the best span over all windows, mapped through the offsets, is the answer's text
    purple, zebra = tokenizer.convert_tokens_to_ids(["purple", "zebra"])
    model = Pointer([purple], [zebra])
    scores = evaluate(model, data, tokenizer, batch_size=3, device=torch.device("cpu"))
    assert scores == {"exact_match": 50.0, "f1": 50.0}
    animals = tokenizer.convert_tokens_to_ids("animals")
    model = Pointer([purple, animals], [zebra, animals])
    scores = evaluate(model, data, tokenizer, batch_size=4, device=torch.device("cpu"))
    assert scores == {"exact_match": 100.0, "f1": 100.0}


def test_a_long_question_is_cut_to_half_the_window(tmp_path, tokenizer):
    question = "Which of the many animals named in this rather long question " * 4 + "ran?"
    qas = [{"id": "q", "question": question, "answers": [{"text": "zebra", "answer_start": 4}]}]
    document = {"data": [{"paragraphs": [{"context": "The zebra ran.", "qas": qas}]}]}
    (tmp_path / "qa.json").write_text(json.dumps(document), encoding="utf-8")
    spec = DataSection(task="qa", train="qa.json", max_length=32)
    (row,) = load_task_data(spec, tokenizer, base_dir=tmp_path).train
    assert len(row["input_ids"]) <= 32
    assert row["token_type_ids"].count(0) == 1 + 14 + 1  # [CLS], (32 - 3) // 2 tokens, [SEP]
    assert tokenizer.decode(row["input_ids"][row["labels"][0] : row["labels"][1] + 1]) == "zebra"


def test_best_span_respects_context_tokens_order_and_length():
    # window 0: tokens 0-1 are question/special (no offsets), 2-5 context
    offsets = [[None, None, [0, 3], [4, 9], [10, 12], [13, 20]], [None, [0, 5], [6, 8]]]
    start = torch.tensor([[9.0, 0, 1, 0, 5, 0], [0, 0, 2, -50, -50, -50]])
    end = torch.tensor([[0.0, 9, 0, 4, 0, 3], [0, 1, 0, -50, -50, -50]])
    spans = qa_best_spans(start, end, offsets, max_answer=2)
    # the question tokens' 9s are ignored; 4..5 (5 + 3) beats 2..3 (1 + 4); end >= start
    assert spans[0] == (8.0, 10, 20)
    # window 1 is shorter than the batch (padding has no offsets): token 2 alone wins
    assert spans[1] == (2.0, 6, 8)
    text = qa_predictions(spans, {"example": [0, 0], "context": ["abc defgh ij klmnopq"]})
    assert text == ["ij klmnopq"]
    assert qa_predictions([None], {"example": [0], "context": ["x"]}) == [""]


TINY = (
    "{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: LAYERS, "
    "num_attention_heads: 4, intermediate_size: 64, max_position_embeddings: 64, "
    "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"
)

OBJECTIVE = f"""\
teacher:
  config: {TINY.replace("LAYERS", "2")}
  tokenizer: {TOKENIZER}
  finetune: {{steps: 6, learning_rate: 1.0e-3}}
student:
  config: {TINY.replace("LAYERS", "1")}
data:
  task: qa
  train: {SQUAD / "train.json"}
  validation: {SQUAD / "dev.json"}
  max_length: 64
  train_limit: 64
  validation_limit: 24
training: {{steps: 6, batch_size: 8, learning_rate: 1.0e-3, log_every: 2}}
objective:
  type: sum
  name: makd
  layers: uniform
  terms:
    - type: sum
      name: layerwise
      terms: [{{type: attention_kl}}, {{type: hidden_mse, embeddings: true}}]
    - type: sum
      name: matrix
      terms: [{{type: mha_matrix, projections: [q, k, v, o]}}, {{type: ffn_matrix}}]
    - {{type: logits_kd, name: model, temperature: 2.0, alpha: 0.5}}
"""


def test_tiny_qa_run_trains_evaluates_and_saves_a_qa_student(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "qa.yaml"
    path.write_text(OBJECTIVE, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out)]) == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert {"makd/layerwise/attention_kl", "makd/matrix/mha_matrix", "makd/model"} <= set(
        train[0]["terms"]
    )
    final = [r for r in rows if r["kind"] == "eval"][-1]
    assert set(final["student"]) == {"exact_match", "f1"}
    assert set(final["teacher"]) == {"exact_match", "f1"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["main_metric"] == "f1"
    from transformers import AutoModelForQuestionAnswering

    student = AutoModelForQuestionAnswering.from_pretrained(str(out / "student"))
    assert student.config.num_hidden_layers == 1
    ids = torch.tensor([[101, 2054, 102, 1996, 2003, 102]])
    logits = student(input_ids=ids).start_logits
    assert logits.shape == (1, 6)
