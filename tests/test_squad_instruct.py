"""The bundled SQuAD slice recast as instruction data (question + context → answer)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "data" / "squad-instruct"


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines()]


def test_the_files_are_what_the_script_makes_from_the_squad_slice():
    spec = importlib.util.spec_from_file_location("make", HERE / "make_instruction.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    for split in ("train", "dev"):
        assert _load(f"{split}.jsonl") == make.rows(ROOT / "data" / "squad" / f"{split}.json")


def test_split_by_article_with_answers_from_their_paragraphs():
    train, dev = _load("train.jsonl"), _load("dev.jsonl")
    assert (len(train), len(dev)) == (989, 214)  # every question of the slice, once
    assert not {r["title"] for r in train} & {r["title"] for r in dev}
    assert not {r["input"] for r in train} & {r["input"] for r in dev}
    for row in train + dev:
        assert row["instruction"] and row["output"] == row["answers"][0]
        assert all(answer in row["input"] for answer in row["answers"])
