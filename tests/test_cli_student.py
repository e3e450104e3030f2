"""``makd student`` and ``makd export-dense`` on tiny models built from configs."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import transformers

from makd_registry.cli import main
from makd_registry.errors import ExitCode
from makd_registry.testing.adapters import sample_batch

TEACHER = (
    "{model_type: bert, vocab_size: 120, hidden_size: 32, num_hidden_layers: 4, "
    "num_attention_heads: 4, intermediate_size: 64, max_position_embeddings: 64}"
)


def objective(tmp_path, student: str, teacher: str = TEACHER, objective: str = "") -> str:
    path = tmp_path / "objective.yaml"
    lines = [
        "teacher:",
        f"  config: {teacher}",
        "student:",
        textwrap.indent(student, "  "),
        "data: {task: classification, max_length: 64}",
        "objective:",
        textwrap.indent(objective or "type: logits_kd", "  "),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_student_reports_parameter_counts_of_a_factorized_copy(tmp_path, capsys):
    path = objective(tmp_path, "factorize: {budget: 0.5}")
    assert main(["student", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    teacher, student = report["teacher"]["parameters"], report["student"]["parameters"]
    assert report["student"]["layers"] == 4
    assert student["non_embedding"] <= 0.5 * teacher["non_embedding"]
    assert student["embedding"] == teacher["embedding"]
    assert report["student_to_teacher_non_embedding"] <= 0.5
    ranks = set(report["factorization"]["ranks"].values())
    assert len(ranks) == 1 and len(report["factorization"]["ranks"]) == 4 * 6
    assert report["capture"] == {"teacher": ["logits"], "student": ["logits"]}


def test_student_saves_and_export_dense_loads_in_plain_transformers(tmp_path, capsys):
    path = objective(
        tmp_path,
        "teacher_layers: [1, 3]\nfactorize: {rank: 4, modules: [attention]}",
        objective="type: sum\nlayers: uniform\nterms: [{type: hidden_mse}, "
        "{type: mha_matrix, input: teacher}]",
    )
    out = tmp_path / "student"
    assert main(["student", path, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "teacher (BertForSequenceClassification)" in text and "8 projections factorized" in text
    record = json.loads((out / "makd_student.json").read_text())
    assert record["recipe"]["teacher_layers"] == [1, 3]
    assert {m["rank"] for m in record["factorized"].values()} == {4}
    assert main(["export-dense", str(out), "-o", str(tmp_path / "dense")]) == 0
    dense = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense")
    from makd_registry.models.serialization import load_student

    factorized = load_student(out)
    batch = sample_batch(120)
    with torch.no_grad():
        torch.testing.assert_close(
            dense.eval()(**batch).logits, factorized(**batch).logits, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    ("teacher", "student", "message"),
    [
        (TEACHER, "factorize: {rank: 99}", "rank 99 exceeds the full rank 32"),
    ],
    ids=["rank-too-large"],
)
def test_model_problems_exit_5_with_a_clear_message(tmp_path, capsys, teacher, student, message):
    path = objective(tmp_path, student, teacher=teacher)
    assert main(["student", path]) == ExitCode.MODEL == 5
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err


def test_a_misspelled_config_key_is_a_located_objective_error(tmp_path, capsys):
    path = objective(tmp_path, "config: {model_type: bert, num_hidden_layer: 2}")
    for command in (["validate", path], ["student", path]):
        assert main(command) == ExitCode.INVALID_INPUT == 2
        err = " ".join(capsys.readouterr().err.split())
        assert (
            ":4:30: student.config.num_hidden_layer: 'num_hidden_layer' is not a bert config "
            "key (did you mean 'num_hidden_layers'?)"
        ) in err, err


def test_unequal_widths_with_identity_alignment_fail_validation_with_a_hint(tmp_path, capsys):
    narrow = TEACHER.replace("hidden_size: 32", "hidden_size: 16").replace(
        "num_hidden_layers: 4", "num_hidden_layers: 2"
    )
    path = objective(
        tmp_path,
        f"config: {narrow}",
        objective="type: hidden_mse\nlayers: uniform",
    )
    assert main(["validate", path]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert ":7:3: objective: 'hidden_mse' cannot compare these models:" in err, err
    assert "use align: linear or align: lowrank" in err


def test_unknown_architecture_is_an_objective_error_located_at_model_type(tmp_path, capsys):
    path = objective(tmp_path, "teacher_layers: [0]", teacher="{model_type: t5, num_layers: 2}")
    assert main(["student", path]) == 2
    err = capsys.readouterr().err
    assert ":2:24: teacher.config.model_type: no architecture adapter for model_type 't5'" in err


def test_objective_needing_features_the_student_lacks_is_refused(tmp_path, capsys):
    path = objective(
        tmp_path,
        "teacher_layers: [0, 1]",
        objective="type: ffn_matrix\nlayers: uniform\nparts: [gate]",
    )
    assert main(["student", path]) == 5
    assert "has no gated MLP" in capsys.readouterr().err


def test_export_dense_of_a_missing_directory(tmp_path, capsys):
    assert main(["export-dense", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 5
    assert "does not exist" in capsys.readouterr().err
