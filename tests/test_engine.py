"""``makd run`` end to end on tiny models: outputs, resume after a kill, 2-process training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from makd_registry.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizers" / "bert-uncased"
SST2 = ROOT / "data" / "sst2"

TINY = (
    "{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: LAYERS, "
    "num_attention_heads: 4, intermediate_size: 64, max_position_embeddings: 64, "
    "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"
)

OBJECTIVE = """\
teacher:
  config: {teacher}
  tokenizer: {tokenizer}
  finetune: {{steps: 4, learning_rate: 1.0e-3}}
student:
  config: {student}
data:
  task: classification
  train: {train}
  validation: {dev}
  max_length: 32
  train_limit: 96
  validation_limit: 48
training:
  steps: {steps}
  batch_size: 8
  learning_rate: 1.0e-3
  log_every: 1
  checkpoint_every: 2
  eval_every: 3
objective:
{objective}
"""

MAKD_TERMS = """\
  type: sum
  name: tiny
  terms:
    - type: sum
      name: layerwise
      layers: uniform
      terms: [{type: attention_kl}, {type: hidden_mse, align: lowrank, rank: 4}]
    - {type: logits_kd, name: logits, temperature: 2.0, alpha: 0.5}
"""


def write_objective(
    tmp_path: Path,
    *,
    steps: int = 6,
    objective: str = MAKD_TERMS,
    teacher_layers: int = 2,
    student_layers: int = 1,
) -> Path:
    text = OBJECTIVE.format(
        teacher=TINY.replace("LAYERS", str(teacher_layers)),
        student=TINY.replace("LAYERS", str(student_layers)),
        tokenizer=TOKENIZER,
        train=SST2 / "train-2k.tsv",
        dev=SST2 / "dev.tsv",
        steps=steps,
        objective=objective,
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "makd-cache"))


def makd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "makd_registry.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_leaves_student_metrics_and_plots(tmp_path, capsys):
    path = write_objective(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "student" in printed and "accuracy" in printed
    for name in (
        "objective.yaml",
        "objective.resolved.json",
        "metrics.jsonl",
        "loss.png",
        "eval.png",
        "summary.json",
        "student/model.safetensors",
        "student/makd_student.json",
        "student/aspect_modules.safetensors",
    ):
        assert (out / name).is_file(), name
    rows = records(out)
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert set(train[0]["terms"]) == {
        "tiny",
        "tiny/layerwise",
        "tiny/layerwise/attention_kl",
        "tiny/layerwise/hidden_mse",
        "tiny/logits",
    }
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert set(evals[-1]["student"]) == {"accuracy", "f1", "mcc"}
    assert evals[-1]["teacher"] == evals[0]["teacher"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student"] == evals[-1]["student"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 1
    modules = load_file(out / "student" / "aspect_modules.safetensors")
    assert modules and all("hidden_mse" in k for k in modules)  # the low-rank alignment maps


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    path = write_objective(tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["captured"]["teacher"] == [
        "attention_key@[1]",
        "attention_query@[1]",
        "hidden@[1]",
        "logits",
    ]
    assert plan["examples"] == {"train": 96, "validation": 48}
    assert plan["parameters"]["student"]["total"] < plan["parameters"]["teacher"]["total"]
    assert plan["memory_estimate_mb"]["total_excluding_activations"] > 0
    assert not out.exists()


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    path = write_objective(tmp_path, steps=6)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    first = makd("run", str(path), "--output", str(whole))
    assert first.returncode == 0, first.stderr
    crash = makd("run", str(path), "--output", str(killed), env={"MAKD_FAULT": "after_step:5"})
    assert crash.returncode == -9, crash.stderr  # SIGKILL: no chance to clean up
    state = json.loads((killed / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4  # the last checkpoint before the kill
    assert not (killed / "student").exists()
    resumed = makd("run", str(path), "--output", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["final_loss"] == b["final_loss"]
    assert a["student"] == b["student"]
    wa = load_file(whole / "student" / "model.safetensors")
    wb = load_file(killed / "student" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in records(killed) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_run_errors_are_clear(tmp_path, capsys):
    path = write_objective(tmp_path)
    text = path.read_text()
    bad = tmp_path / "bad-column.yaml"
    bad.write_text(text.replace("  max_length: 32", "  max_length: 32\n  text_column: text"))
    assert main(["run", str(bad), "--output", str(tmp_path / "a")]) == 6
    err = capsys.readouterr().err
    assert "has no column text_column: 'text'" in " ".join(err.split())
    assert "sentence, label" in err

    random_teacher = tmp_path / "random-teacher.yaml"
    random_teacher.write_text(text.replace("  finetune: {steps: 4, learning_rate: 1.0e-3}\n", ""))
    assert main(["run", str(random_teacher), "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "random-teacher.yaml:2:" in err and "teacher.config" in err
    assert "add 'finetune: {steps: N}'" in " ".join(err.split())

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "something").write_text("x")
    assert main(["run", str(path), "--output", str(tmp_path / "c")]) == 2
    assert "is not empty: pass --resume" in " ".join(capsys.readouterr().err.split())
    assert main(["run", str(path), "--output", str(tmp_path / "c"), "--resume"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_set_overrides_settings_and_is_recorded(tmp_path, capsys):
    path = write_objective(tmp_path, steps=6)
    out = tmp_path / "run"
    code = main(
        [
            "run",
            str(path),
            "--output",
            str(out),
            "--set",
            "training.steps=2",
            "--set",
            "objective.terms.1.temperature=3.0",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    resolved = json.loads((out / "objective.resolved.json").read_text())
    assert resolved["objective"]["terms"][1]["temperature"] == 3.0
    assert (out / "overrides.txt").read_text().splitlines() == [
        "--set training.steps=2",
        "--set objective.terms.1.temperature=3.0",
    ]
    capsys.readouterr()
    assert main(["run", str(path), "--dry-run", "--set", "training.steps=-1"]) == 2
    assert "training.steps: Input should be greater than or equal to 1 (got -1)" in (
        capsys.readouterr().err
    )
    assert main(["run", str(path), "--dry-run", "--set", "objective.terms.9.weight=1"]) == 2
    assert "objective.terms is a list of 2: '9' is no index" in capsys.readouterr().err


def test_teacher_training_shows_its_own_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "fresh-cache"))  # the teacher is trained
    path = write_objective(tmp_path, steps=2)
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "training the teacher (4 steps" in printed
    lines = printed.splitlines()
    assert any(line.startswith("teacher ━") and " 4/4 " in line for line in lines), printed
    assert any(line.startswith("train ━") and " 2/2 " in line for line in lines), printed


@pytest.mark.parametrize("whose", ["teacher", "student"])
def test_a_non_finite_loss_stops_the_run_and_caches_nothing(tmp_path, capsys, monkeypatch, whose):
    from makd_registry.engine.trainer import StepResult, Trainer

    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("MAKD_CACHE_DIR", str(cache))
    real = Trainer.train_step
    calls = {"n": 0}

    def train_step(self):  # the teacher's 4 steps come first, then the student's
        calls["n"] += 1
        result = real(self)
        bad = calls["n"] == 2 if whose == "teacher" else calls["n"] == 6
        return StepResult(result.step, float("nan"), {}, result.lr) if bad else result

    monkeypatch.setattr(Trainer, "train_step", train_step)
    path = write_objective(tmp_path, steps=3)
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 4  # runtime failure
    err = " ".join(capsys.readouterr().err.split())
    if whose == "teacher":
        assert "the teacher's own loss is nan at step 2" in err
        assert not list(cache.glob("teachers/*/makd_student.json"))
    else:
        assert "the student's loss is nan at step 2" in err
        assert list(cache.glob("teachers/*/makd_student.json"))
