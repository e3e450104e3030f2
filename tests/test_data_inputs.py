"""Bad data files get one clear DataError (file, column, rows or ids, value); string labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from makd_registry.data.sources import DataError
from makd_registry.data.tasks import load_task_data
from makd_registry.objective.sections import DataSection

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizers" / "bert-uncased"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def tsv(directory: Path, name: str, rows: list[tuple[str, str]], header="sentence\tlabel"):
    return write(directory, name, header + "\n" + "".join(f"{a}\t{b}\n" for a, b in rows))


def load(tmp_path: Path, tokenizer, **spec):
    return load_task_data(DataSection(**spec), tokenizer, base_dir=tmp_path)


def error(tmp_path: Path, tokenizer, **spec) -> str:
    with pytest.raises(DataError) as caught:
        load(tmp_path, tokenizer, **spec)
    return str(caught.value)


GOOD = [("a fine film", "1"), ("a dull film", "0"), ("bright", "1"), ("grey", "0")]


# -- empty and non-text cells --------------------------------------------------------------


def test_empty_and_blank_text_cells_name_file_column_rows_and_count(tmp_path, tokenizer):
    rows = [*GOOD, ("", "1"), ("   ", "0"), ("fine again", "1"), ("", "0")]
    path = tsv(tmp_path, "train.tsv", rows)
    message = error(tmp_path, tokenizer, task="classification", train="train.tsv")
    assert message.startswith(f"data.train: {path}: column 'sentence'")
    assert "3 of 8 rows (rows 5, 6, 8;" in message


def test_non_text_value_is_named_with_its_row(tmp_path, tokenizer):
    lines = [{"sentence": "good", "label": 1}, {"sentence": 42, "label": 0}]
    write(tmp_path, "train.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    message = error(tmp_path, tokenizer, task="classification", train="train.jsonl")
    assert "train.jsonl: column 'sentence' must hold text" in message
    assert "row 2; the first is 42, a int" in message


def test_pair_classification_checks_the_second_text(tmp_path, tokenizer):
    text = "premise\thypothesis\tlabel\nit rains\tit is wet\t1\nsun\t\t0\n"
    write(tmp_path, "pairs.tsv", text)
    message = error(
        tmp_path,
        tokenizer,
        task="pair_classification",
        train="pairs.tsv",
        text_column="premise",
        text_pair_column="hypothesis",
    )
    assert "pairs.tsv: column 'hypothesis' is empty or whitespace-only in 1 of 2 rows (row 2;" in (
        message
    )


def test_causal_lm_skips_missing_cells_and_rejects_non_text(tmp_path, tokenizer):
    lines = [{"text": "to be or not to be"}, {"text": None}, {"text": "that is the question"}]
    write(tmp_path, "lm.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    data = load(
        tmp_path, tokenizer, task="causal_lm", train="lm.jsonl", text_column="text", max_length=8
    )
    expected = tokenizer("to be or not to be\nthat is the question", add_special_tokens=False)
    assert data.train[0]["input_ids"] == expected["input_ids"][:8]
    write(tmp_path, "bad.jsonl", json.dumps({"text": "words"}) + "\n" + '{"text": 7}\n')
    message = error(tmp_path, tokenizer, task="causal_lm", train="bad.jsonl", text_column="text")
    assert "bad.jsonl: column 'text' must hold text" in message and "row 2" in message


# -- files -----------------------------------------------------------------------------------


def test_a_directory_is_not_a_data_file(tmp_path, tokenizer):
    (tmp_path / "train.tsv").mkdir()
    message = error(tmp_path, tokenizer, task="classification", train="train.tsv")
    assert message == f"data.train: {tmp_path / 'train.tsv'} is a directory, not a data file"


def test_broken_json_names_file_line_and_column(tmp_path, tokenizer):
    write(tmp_path, "train.json", '[{"sentence": "a", "label": 1},\n {"sentence": "b", "lab')
    message = error(tmp_path, tokenizer, task="classification", train="train.json")
    assert f"cannot read {tmp_path / 'train.json'}: invalid JSON at line 2, column" in message
    write(tmp_path, "train.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b" "label": 0}\n')
    message = error(tmp_path, tokenizer, task="classification", train="train.jsonl")
    assert "train.jsonl: invalid JSON at line 2, column 18: Expecting ',' delimiter" in message


def test_binary_garbage_csv_is_named_as_such(tmp_path, tokenizer):
    (tmp_path / "train.csv").write_bytes(bytes(range(256)) * 8)
    message = error(tmp_path, tokenizer, task="classification", train="train.csv")
    path = tmp_path / "train.csv"
    assert message == f"data.train: cannot read {path}: it is a binary file, not text"
    (tmp_path / "latin.csv").write_bytes("sentence,label\ncaf\xe9,1\n".encode("latin-1"))
    message = error(tmp_path, tokenizer, task="classification", train="latin.csv")
    assert "latin.csv: it is not UTF-8 text (byte 18" in message


# -- labels ----------------------------------------------------------------------------------


def test_negative_integer_labels_are_refused_with_file_and_row(tmp_path, tokenizer):
    path = tsv(tmp_path, "train.tsv", [*GOOD, ("odd", "-1")])
    message = error(tmp_path, tokenizer, task="classification", train="train.tsv")
    assert message.startswith(f"data.train: {path}: column 'label': integer labels must be >= 0")
    assert "got -1 in 1 rows (row 5)" in message


def test_a_missing_label_names_its_row(tmp_path, tokenizer):
    tsv(tmp_path, "train.tsv", [*GOOD, ("no label here", "")])
    message = error(tmp_path, tokenizer, task="classification", train="train.tsv")
    assert "train.tsv: column 'label' has no label in 1 of 5 rows (row 5;" in message


def test_validation_label_outside_the_training_labels(tmp_path, tokenizer):
    tsv(tmp_path, "train.tsv", GOOD)
    path = tsv(tmp_path, "dev.tsv", [("ok", "1"), ("hmm", "2"), ("meh", "2")])
    message = error(
        tmp_path, tokenizer, task="classification", train="train.tsv", validation="dev.tsv"
    )
    assert message == (
        f"data.validation: {path}: column 'label': label 2 is not a known label in 2 of 3 rows "
        "(rows 2, 3); known labels: the integers 0..1"
    )


def test_integer_labels_stay_class_ids(tmp_path, tokenizer):
    tsv(tmp_path, "train.tsv", [*GOOD, ("third", "2")])
    data = load(tmp_path, tokenizer, task="classification", train="train.tsv")
    assert data.num_labels == 3 and data.label_names is None
    assert data.train["labels"] == [1, 0, 1, 0, 2]


STRINGS = [("a fine film", "pos"), ("a dull film", "neg"), ("bright", "pos"), ("grey", "neg")]


def test_string_labels_are_inferred_in_sorted_order(tmp_path, tokenizer):
    tsv(tmp_path, "train.tsv", STRINGS)
    tsv(tmp_path, "dev.tsv", [("ok", "neg"), ("fine", "pos")])
    data = load(tmp_path, tokenizer, task="classification", train="train.tsv", validation="dev.tsv")
    assert data.label_names == ["neg", "pos"] and data.num_labels == 2
    assert data.train["labels"] == [1, 0, 1, 0]
    assert data.validation["labels"] == [0, 1]
    from makd_registry.data.collate import collate

    batch = collate(list(data.train), tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [1, 0, 1, 0]


def test_explicit_labels_give_the_order(tmp_path, tokenizer):
    tsv(tmp_path, "train.tsv", STRINGS)
    data = load(
        tmp_path, tokenizer, task="classification", train="train.tsv", labels=["pos", "neg"]
    )
    assert data.label_names == ["pos", "neg"] and data.train["labels"] == [0, 1, 0, 1]
    # integer cells match integers or their decimal string in the list
    tsv(tmp_path, "ints.tsv", GOOD)
    data = load(tmp_path, tokenizer, task="classification", train="ints.tsv", labels=["1", 0])
    assert data.label_names == ["1", "0"] and data.train["labels"] == [0, 1, 0, 1]


def test_unknown_labels_name_value_row_and_known_labels(tmp_path, tokenizer):
    tsv(tmp_path, "train.tsv", STRINGS)
    path = tsv(tmp_path, "dev.tsv", [("ok", "neg"), ("so so", "neutral")])
    message = error(
        tmp_path, tokenizer, task="classification", train="train.tsv", validation="dev.tsv"
    )
    assert message == (
        f"data.validation: {path}: column 'label': label 'neutral' is not a known label in 1 "
        "of 2 rows (row 2); known labels: neg, pos (those of data.train)"
    )
    message = error(
        tmp_path, tokenizer, task="classification", train="train.tsv", labels=["neg", "positive"]
    )
    assert "label 'pos' is not a known label in 2 of 4 rows (rows 1, 3)" in message
    assert message.endswith("known labels: neg, positive (data.labels)")


def test_mixed_and_duplicate_labels(tmp_path, tokenizer):
    lines = [{"sentence": "a", "label": 1}, {"sentence": "b", "label": "neg"}]
    write(tmp_path, "mixed.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    message = error(tmp_path, tokenizer, task="classification", train="mixed.jsonl")
    assert "mixes integer labels (1) and string labels ('neg'); give data.labels" in message
    with pytest.raises(ValidationError, match=r"label '1' is already labels\[0\]"):
        DataSection(task="classification", train="train.tsv", labels=[1, "1"])


# -- SQuAD -----------------------------------------------------------------------------------

CONTEXT = "The Rhine flows from the Alps to the North Sea."


def squad(directory: Path, qas: list[dict], name: str = "train.json", context=CONTEXT) -> Path:
    document = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}
    return write(directory, name, json.dumps(document))


def qa(qid: str, text: str, start: int, question: str = "Where does it flow?") -> dict:
    return {"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}]}


def test_answers_outside_their_context_name_file_ids_and_count(tmp_path, tokenizer):
    path = squad(
        tmp_path,
        [qa("q1", "the Alps", 21), qa("q2", "the Alps", 3), qa("q3", "North Sea", 400)],
    )
    message = error(tmp_path, tokenizer, task="qa", train="train.json")
    assert message.startswith(f"data.train: {path}: 2 of 3 questions have an answer that is not")
    assert "ids 'q2' (row 2), 'q3' (row 3);" in message
    assert "answer 'the Alps' at 3: the context there reads ' Rhine f'" in message
    # validation data is checked the same way: its scores would be wrong
    squad(tmp_path, [qa("q1", "the Alps", 21)])
    squad(tmp_path, [qa("d1", "Sea", 1000)], name="dev.json")
    message = error(tmp_path, tokenizer, task="qa", train="train.json", validation="dev.json")
    assert message.startswith("data.validation:") and "id 'd1' (row 1);" in message
    assert "answer 'Sea' at 1000: outside the context (47 characters)" in message


def test_malformed_squad_records_are_counted_and_named(tmp_path, tokenizer):
    records = [
        qa("q1", "the Alps", 21),
        {"id": "q2", "answers": []},
        {"id": "q3", "question": "Why?", "answers": [{"text": "x"}]},
    ]
    path = squad(tmp_path, records)
    message = error(tmp_path, tokenizer, task="qa", train="train.json")
    assert message == (
        f"data.train: {path}: 2 malformed SQuAD records: question id 'q2': no 'question'; "
        "question id 'q3': 'answers' must be a list of {text, answer_start} objects"
    )
    write(tmp_path, "par.json", json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}))
    message = error(tmp_path, tokenizer, task="qa", train="par.json")
    assert "1 malformed SQuAD record: data[0].paragraphs[0]: no 'context'" in message


def test_squad_without_questions_has_no_examples(tmp_path, tokenizer):
    path = write(tmp_path, "train.json", json.dumps({"data": [], "version": "1.1"}))
    message = error(tmp_path, tokenizer, task="qa", train="train.json")
    assert message.startswith(f"data.train: {path} has no examples")


def test_empty_question_or_context_names_the_question_id(tmp_path, tokenizer):
    squad(tmp_path, [qa("q1", "the Alps", 21), qa("q2", "the Alps", 21, question="  ")])
    message = error(tmp_path, tokenizer, task="qa", train="train.json")
    assert "column 'question' is empty or whitespace-only in 1 of 2 rows (id 'q2' (row 2);" in (
        message
    )
    squad(tmp_path, [qa("q1", "x", 0)], context="")
    message = error(tmp_path, tokenizer, task="qa", train="train.json")
    assert "column 'context' is empty or whitespace-only in 1 of 1 rows (id 'q1' (row 1);" in (
        message
    )
