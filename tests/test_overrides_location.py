"""A problem caused by ``--set KEY=VALUE`` is located at that override: ``<--set>:N:COL``
(N: the override's position, COL: where its VALUE starts), with the override named."""

from __future__ import annotations

import pytest

from makd_registry.cli import main
from makd_registry.errors import ObjectiveError
from makd_registry.objective import resolve_text
from makd_registry.objective.overrides import apply_overrides
from makd_registry.objective.source import MAX_NODES, load_yaml
from makd_registry.plugins import make_registry

OBJECTIVE = """\
teacher:
  config: {model_type: bert, num_hidden_layers: 4, hidden_size: 64, num_attention_heads: 4,
           intermediate_size: 128}
student:
  teacher_layers: [0, 3]
training:
  steps: 10
  batch_size: 8
objective:
  type: sum
  layers: uniform
  terms:
    - {type: hidden_mse, weight: 1.0}
    - {type: logits_kd, temperature: 2.0}
"""


@pytest.fixture(scope="module")
def registry():
    return make_registry()


def errors(registry, *overrides: str, text: str = OBJECTIVE) -> list[str]:
    with pytest.raises(ObjectiveError) as info:
        resolve_text(text, "obj.yaml", registry, overrides=list(overrides))
    return [d.format() for d in info.value.diagnostics]


def test_a_bad_value_points_at_the_override_not_the_file(registry):
    resolve_text(OBJECTIVE, "obj.yaml", registry, overrides=["training.steps=3"])  # valid
    assert errors(registry, "training.seed=1", "training.steps=-1") == [
        "<--set>:2:16: training.steps: Input should be greater than or equal to 1 (got -1) "
        "(from --set training.steps=-1)"
    ]


def test_an_unknown_key_set_by_an_override_points_at_it(registry):
    (line,) = errors(registry, "training.stepz=3")
    assert line.startswith("<--set>:1:16: training.stepz: unknown key 'stepz'")
    assert line.endswith("(from --set training.stepz=3)")


def test_errors_inside_a_replaced_mapping_point_at_its_override(registry):
    (line,) = errors(registry, "student.factorize={budget: 3}")
    assert line.startswith("<--set>:1:19: student.factorize.budget: ")
    assert line.endswith("(from --set student.factorize={budget: 3})")
    (line,) = errors(registry, "student.teacher_layers=[0, 9]")
    assert line.startswith("<--set>:1:24: student.teacher_layers[1]: teacher layer 9")


def test_a_later_override_below_an_earlier_one_takes_the_blame(registry):
    (line,) = errors(registry, "student.factorize={budget: 0.5}", "student.factorize.budget=3")
    assert line.startswith("<--set>:2:26: student.factorize.budget: ")
    assert line.endswith("(from --set student.factorize.budget=3)")


def test_a_replaced_layer_mapping_reports_the_shape_it_was_given(registry):
    # the file's 'layers: uniform' is replaced by the shorthand list of pairs
    (line,) = errors(registry, "objective.layers=[[0, 9]]")
    assert line.startswith("<--set>:1:18: objective.layers[0][1]: teacher layer 9")


def test_problems_the_overrides_did_not_cause_stay_in_the_file(registry):
    text = OBJECTIVE.replace("batch_size: 8", "batch_size: 0")
    assert set(errors(registry, "training.steps=0", text=text)) == {
        "obj.yaml:8:15: training.batch_size: Input should be greater than or equal to 1 (got 0)",
        "<--set>:1:16: training.steps: Input should be greater than or equal to 1 (got 0) "
        "(from --set training.steps=0)",
    }


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["training.seed=1", "nope"], "<--set>:2:1: nope: expected KEY=VALUE"),
        (
            ["training.seed=1", "objective.terms.9.weight=1"],
            "<--set>:2:1: objective.terms.9.weight=1: objective.terms is a list of 2: '9'",
        ),
        (["training.seed=1", "training.steps=[1"], "<--set>:2:18: training.steps=[1: the value"),
    ],
)
def test_override_syntax_errors_are_at_the_overrides_line(registry, overrides, expected):
    (line,) = errors(registry, *overrides)
    assert line.startswith(expected), line


def test_an_alias_bomb_in_a_value_is_refused(registry):
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"&{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (line,) = errors(registry, "training.steps=[" + ", ".join(levels) + "]")
    assert line.startswith("<--set>:1:")
    assert f"more than {MAX_NODES:,} values through aliases/merge keys" in line


def test_a_missing_key_inside_an_override_can_be_located_at_it():
    data, smap = load_yaml(OBJECTIVE, "obj.yaml")
    apply_overrides(data, ["training.seed=1", "data={train: x.tsv}"], smap)
    diag = smap.diagnostic(("data", "task"), "missing required key 'task'", at=("data",))
    assert diag.format() == (
        "<--set>:2:6: data.task: missing required key 'task' (from --set data={train: x.tsv})"
    )
    diag = smap.diagnostic(("training", "x"), "missing required key 'x'", at=("training",))
    assert diag.format() == "obj.yaml:7:3: training.x: missing required key 'x'"


def test_without_a_source_map_overrides_apply_and_errors_name_their_index():
    data = {"training": {"steps": 1}}
    assert apply_overrides(data, ["training.steps=4", "data.task=qa"]) == {
        "training": {"steps": 4},
        "data": {"task": "qa"},
    }
    with pytest.raises(ObjectiveError) as info:
        apply_overrides(data, ["training.steps=4", "training.steps.x=1"])
    assert info.value.diagnostics[0].format() == (
        "<--set>:2:1: training.steps.x=1: training.steps is a value, not a mapping or a list"
    )


def test_makd_run_reports_the_override(tmp_path, capsys):
    path = tmp_path / "obj.yaml"
    path.write_text(OBJECTIVE, encoding="utf-8")
    assert main(["run", str(path), "--dry-run", "--set", "training.steps=-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "<--set>:1:16: training.steps: Input should be greater than or equal to 1 (got -1) "
        "(from --set training.steps=-1)"
    )
