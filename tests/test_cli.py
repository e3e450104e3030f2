"""The makd command line on the shipped objectives: streams, exit codes, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from makd_registry.cli import main

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = sorted((ROOT / "objectives").glob("*.yaml"))


def test_objectives_exist():
    assert (ROOT / "objectives" / "quickstart.yaml").is_file()


@pytest.mark.parametrize("path", OBJECTIVES, ids=[p.stem for p in OBJECTIVES])
def test_shipped_objectives_validate(path, capsys):
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # validate reports on stderr only
    assert f"{path}: ok" in captured.err


@pytest.mark.parametrize("path", OBJECTIVES, ids=[p.stem for p in OBJECTIVES])
def test_shipped_objectives_explain(path, capsys):
    assert main(["explain", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["objective"]["name"]
    assert data["features"]["student"], "an objective that needs nothing from the student"

    assert main(["explain", str(path)]) == 0
    text = capsys.readouterr().out
    assert "features captured" in text and data["objective"]["name"] in text


@pytest.mark.parametrize("path", OBJECTIVES, ids=[p.stem for p in OBJECTIVES])
def test_shipped_objectives_match_the_exported_schema(path, capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    document = yaml.safe_load(path.read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(document))
    assert not errors, [e.message for e in errors]


def test_schema_rejects_what_validate_rejects(capsys):
    assert main(["schema"]) == 0
    validator = jsonschema.Draft202012Validator(json.loads(capsys.readouterr().out))
    bad = [
        {"objective": {"type": "no_such_aspect"}},
        {"objective": {"type": "sum", "terms": []}},
        {"objective": {"type": "sum", "terms": [{"type": "sum", "terms": [{"type": "x"}]}]}},
        {"objective": {"type": "hidden_cosine", "layers": "last", "weight": -1}},
        {"objective": {"type": "hidden_cosine", "layers": "sideways"}},
        {"objective": {"type": "hidden_cosine", "layers": "last"}, "trainig": {}},
    ]
    for document in bad:
        assert list(validator.iter_errors(document)), document


def test_explain_shows_mapping_pairs_and_features(tmp_path, capsys):
    path = tmp_path / "o.yaml"
    path.write_text(
        "teacher: {config: {model_type: bert, num_hidden_layers: 6}}\n"
        "student: {config: {model_type: bert, num_hidden_layers: 2}}\n"
        "objective:\n"
        "  type: sum\n"
        "  name: distill\n"
        "  weight: 2\n"
        "  layers: uniform\n"
        "  terms:\n"
        "    - {type: hidden_cosine, weight: 0.5}\n"
    )
    assert main(["explain", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    leaf = data["objective"]["children"][0]
    assert leaf["path"] == "distill/hidden_cosine"
    assert leaf["pairs"] == [[0, 2], [1, 5]]
    assert leaf["effective_weight"] == 1.0
    assert leaf["features"] == {"teacher": ["hidden@[2,5]"], "student": ["hidden@[0,1]"]}
    assert data["teacher"]["layers"] == 6 and data["student"]["layers"] == 2


def test_aspects_json_lists_plugin_and_distribution(capsys):
    assert main(["aspects", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["sum"]["combinator"] and rows["sum"]["distribution"] == "makd"
    assert rows["hidden_cosine"]["plugin"] == "cosine"
    assert rows["hidden_cosine"]["layerwise"]
    assert rows["hidden_cosine"]["summary"].startswith("Cosine distance")


def test_several_files_report_all_and_exit_with_the_worst(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("objective: {type: hidden_cosine, layers: last}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: {type: hidden_cosine, layers: last, weight: -1}\n")
    assert main(["validate", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{good}: ok" in err and f"{bad}:1:" in err


def test_missing_file_is_an_input_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml:1:1: <file>: no such file" in capsys.readouterr().err


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_console_script_runs_as_a_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective:\n  type: hidden_cosine\n  layers: last\n  layers: last\n")
    proc = subprocess.run(
        [sys.executable, "-m", "makd_registry.cli", "validate", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert (
        proc.stderr.strip()
        == f"{bad}:4:3: objective.layers: duplicate key 'layers' (first defined on line 3)"
    )


def test_schema_has_one_definition_per_aspect(capsys):
    from makd_registry import make_registry

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    names = make_registry().names()
    assert {f"aspect.{n}" for n in names} <= set(schema["$defs"])
    assert [v["title"] for v in schema["$defs"]["AspectNode"]["oneOf"]] == names
    temperature = schema["$defs"]["aspect.logits_kd"]["properties"]["temperature"]
    assert temperature["exclusiveMinimum"] == 0
