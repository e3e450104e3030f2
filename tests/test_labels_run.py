"""String labels end to end: a TSV with ``neg``/``pos`` trains, and the saved student
predicts those names in plain transformers."""

from __future__ import annotations

import json

import pytest
from test_engine import SST2, write_objective

from makd_registry.cli import main


def _named_copy(src, dst, names=("neg", "pos"), limit=200):
    lines = src.read_text().splitlines()
    out = [lines[0]]
    for line in lines[1 : limit + 1]:
        text, label = line.rsplit("\t", 1)
        out.append(f"{text}\t{names[int(label)]}")
    dst.write_text("\n".join(out) + "\n")
    return dst


@pytest.mark.parametrize("explicit", [False, True], ids=["inferred", "labels-list"])
def test_string_labels_train_and_the_student_predicts_names(tmp_path, monkeypatch, explicit):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "cache"))
    train = _named_copy(SST2 / "train-2k.tsv", tmp_path / "train.tsv")
    dev = _named_copy(SST2 / "dev.tsv", tmp_path / "dev.tsv", limit=48)
    path = write_objective(tmp_path, steps=2)
    text = path.read_text().replace(str(SST2 / "train-2k.tsv"), str(train))
    text = text.replace(str(SST2 / "dev.tsv"), str(dev))
    order = ["pos", "neg"] if explicit else ["neg", "pos"]  # inferred: sorted
    if explicit:
        text = text.replace("  max_length: 32\n", "  max_length: 32\n  labels: [pos, neg]\n")
    path.write_text(text)
    out = tmp_path / "run"
    assert main(["run", str(path), "-o", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["labels"] == order
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["id2label"] == {"0": order[0], "1": order[1]}
    assert config["label2id"] == {order[0]: 0, order[1]: 1}
    import transformers

    classify = transformers.pipeline(
        "text-classification", model=str(out / "student"), tokenizer=str(out / "student")
    )
    predicted = classify(["a gorgeous, witty film", "dull and lifeless"])
    assert {p["label"] for p in predicted} <= {"neg", "pos"}
