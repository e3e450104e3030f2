"""One file and seed give one result; a run's directory loses nothing.

Each test here runs ``makd run`` on tiny models (a few seconds each): the same student
whether the teacher was trained in this run or read from the cache; 2 processes equal 1 on
every term; ``--resume`` refuses a changed objective and says when a run is finished;
``--overwrite`` keeps the previous run until the new one is safe; SIGINT/SIGTERM and a kill
while a checkpoint is replaced leave a resumable run that ends exactly like an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine import OBJECTIVE, TINY, makd, records, write_objective

from makd_registry.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory`` (links by target)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical losses, terms, evaluation and student weights."""
    ra = [r for r in records(a) if r["kind"] in ("train", "eval")]
    rb = [r for r in records(b) if r["kind"] in ("train", "eval")]
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in ra]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rb]
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "integrity-cache"))


# -- item 2: where the teacher came from does not change the student --------------------

DROPOUT = TINY.replace("hidden_dropout_prob: 0.0", "hidden_dropout_prob: 0.1")


def test_a_cached_teacher_gives_the_same_student_as_a_freshly_trained_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "fresh-cache"))
    text = OBJECTIVE.format(
        teacher=DROPOUT.replace("LAYERS", "2"),
        student=DROPOUT.replace("LAYERS", "1"),  # dropout on: its stream matters too
        tokenizer=ROOT / "data" / "tokenizers" / "bert-uncased",
        train=ROOT / "data" / "sst2" / "train-2k.tsv",
        dev=ROOT / "data" / "sst2" / "dev.tsv",
        steps=3,
        objective="  type: sum\n  terms:\n    - {type: hidden_mse, layers: uniform, "
        "align: linear}\n    - {type: logits_kd}\n",
    )
    path = tmp_path / "dropout.yaml"
    path.write_text(text)
    trained, cached = tmp_path / "trained", tmp_path / "cached"
    assert main(["run", str(path), "-o", str(trained)]) == 0  # trains and caches the teacher
    assert list((tmp_path / "fresh-cache").glob("teachers/*/makd_student.json"))
    assert main(["run", str(path), "-o", str(cached)]) == 0  # reads it from the cache
    assert_same_run(trained, cached)
    ma = load_file(trained / "student" / "aspect_modules.safetensors")
    mb = load_file(cached / "student" / "aspect_modules.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


# -- item 3: two processes equal one on every term ---------------------------------------

EVERY_TERM = """\
  type: sum
  name: all
  terms:
    - type: sum
      name: layerwise
      layers: uniform
      terms:
        - {type: attention_kl}
        - {type: hidden_mse, align: lowrank, rank: 4, embeddings: true}
        - {type: hidden_mse, name: cosine, distance: cosine}
    - type: sum
      name: matrix
      layers: uniform
      terms: [{type: mha_matrix}, {type: ffn_matrix}]
    - {type: logits_kd, name: logits, temperature: 2.0, alpha: 0.5}
"""


def test_two_processes_equal_one_on_every_term_with_uneven_padding(tmp_path):
    # 7 examples per step: 4 and 3 per process, padded to each process's own longest row
    path = write_objective(tmp_path, steps=3, objective=EVERY_TERM, student_layers=2)
    path.write_text(path.read_text().replace("batch_size: 8", "batch_size: 7"))
    single, double = tmp_path / "single", tmp_path / "double"
    one = makd("run", str(path), "--output", str(single))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29531",
            "-m",
            "makd_registry.cli",
            "run",
            str(path),
            "--output",
            str(double),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    ta = [r for r in records(single) if r["kind"] == "train"]
    tb = [r for r in records(double) if r["kind"] == "train"]
    assert [r["step"] for r in ta] == [r["step"] for r in tb] == [1, 2, 3]
    assert len(ta[0]["terms"]) == 9
    for a, b in zip(ta, tb, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["terms"].keys() == a["terms"].keys()
        for term, value in a["terms"].items():
            assert b["terms"][term] == pytest.approx(value, rel=1e-5, abs=1e-7), (b["step"], term)
    wa, wb = weights(single), weights(double)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=1e-5, msg=key)


# -- items 4 and 6: resume ---------------------------------------------------------------


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints every 2 steps) and its objective file."""
    base = tmp_path_factory.mktemp("whole")
    cache = tmp_path_factory.getbasetemp() / "integrity-cache"
    env = {"MAKD_CACHE_DIR": str(cache)}
    path = write_objective(base, steps=6)
    out = base / "run"
    done = makd("run", str(path), "--output", str(out), env=env)
    assert done.returncode == 0, done.stderr
    return path, out, env


@pytest.fixture(scope="module")
def killed_at_3(whole, tmp_path_factory):
    """``whole``'s run killed (SIGKILL) after step 3: its checkpoint is of step 2. Tests copy
    it (``shutil.copytree(..., symlinks=True)``) instead of killing a run of their own."""
    path, _, env = whole
    out = tmp_path_factory.mktemp("killed") / "run"
    killed = makd("run", str(path), "-o", str(out), env={**env, "MAKD_FAULT": "after_step:3"})
    assert killed.returncode == -9
    return out


@pytest.mark.parametrize(
    "fault",
    ["after_step:5", "before_checkpoint_switch:4", "sigint_after_step:3", "sigterm_after_step:3"],
)
def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(whole, tmp_path, fault):
    path, reference, env = whole
    out = tmp_path / "run"
    crash = makd("run", str(path), "--output", str(out), env={**env, "MAKD_FAULT": fault})
    point, step = fault.split(":")
    if point.startswith("sig"):
        assert crash.returncode == 130, crash.stderr
        err = " ".join(crash.stderr.split())
        assert f"at step {step} of 6: checkpoint saved" in err
        assert f"makd run {path} --output {out} --resume" in err
        assert "Traceback" not in crash.stderr
        expected = int(step)  # the checkpoint written when the signal came
    else:
        assert crash.returncode == -9, crash.stderr  # SIGKILL: no chance to clean up
        expected = {"after_step": 4, "before_checkpoint_switch": 2}[point]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == expected
    assert (out / "checkpoint").resolve() == (out / "checkpoints" / f"step-{expected:08d}")
    if point == "before_checkpoint_switch":  # complete on disk, but never made current
        assert (out / "checkpoints" / f"step-{int(step):08d}" / "state.json").is_file()
    assert not (out / "student").exists()
    resumed = makd("run", str(path), "--output", str(out), "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, out)
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("objective.terms.1.temperature=3.0", "objective.terms[1].temperature: 2.0 → 3.0"),
        ("student.config.num_hidden_layers=2", "student.config.num_hidden_layers: 1 → 2"),
        ("training.learning_rate=0.002", "training.learning_rate: 0.001 → 0.002"),
        ("data.max_length=24", "data.max_length: 32 → 24"),
    ],
    ids=["temperature", "student", "learning-rate", "data"],
)
def test_resume_refuses_a_changed_objective_and_touches_nothing(
    whole, killed_at_3, tmp_path, capsys, override, named
):
    path, reference, env = whole
    out = tmp_path / "run"
    shutil.copytree(killed_at_3, out, symlinks=True)
    before = tree_digest(out)
    assert main(["run", str(path), "-o", str(out), "--resume", "--set", override]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert named in err, err
    assert "Traceback" not in err
    assert tree_digest(out) == before


def test_resume_refuses_changed_data_file_contents(whole, tmp_path, capsys):
    path, reference, env = whole
    data = tmp_path / "train.tsv"
    data.write_text((ROOT / "data" / "sst2" / "train-2k.tsv").read_text())
    text = path.read_text().replace(str(ROOT / "data" / "sst2" / "train-2k.tsv"), str(data))
    objective = tmp_path / "tiny.yaml"
    objective.write_text(text)
    out = tmp_path / "run"
    killed = makd("run", str(objective), "-o", str(out), env={**env, "MAKD_FAULT": "after_step:3"})
    assert killed.returncode == -9
    before = tree_digest(out)
    data.write_text(data.read_text().replace("\t1\n", "\t0\n", 5))
    assert main(["run", str(objective), "-o", str(out), "--resume"]) == 2
    assert "data.train (file contents)" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_resume_accepts_more_steps_and_records_it(whole, killed_at_3, tmp_path, capsys):
    path, reference, env = whole
    out = tmp_path / "run"
    shutil.copytree(killed_at_3, out, symlinks=True)
    code = main(
        [
            "run",
            str(path),
            "-o",
            str(out),
            "--resume",
            "--set",
            "training.steps=8",
            "--set",
            "training.log_every=2",
        ]
    )
    assert code == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "resumed from step 2" in err and "training.steps: 6 → 8" in err
    record = json.loads((out / "run.json").read_text())
    assert record["resumes"][-1]["changes"] == [
        "training.log_every: 1 → 2",
        "training.steps: 6 → 8",
    ]
    assert json.loads((out / "objective.resolved.json").read_text())["training"]["steps"] == 8
    steps = [r["step"] for r in records(out) if r["kind"] == "train"]
    assert steps == [1, 2, 4, 6, 8]


def test_resuming_a_finished_run_says_so_and_changes_nothing(whole, capsys):
    path, reference, env = whole
    before = tree_digest(reference)
    assert main(["run", str(path), "-o", str(reference), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "already finished its 6 steps: nothing to do" in " ".join(captured.err.split())
    assert "Traceback" not in captured.err
    assert tree_digest(reference) == before


# -- item 5: --overwrite loses nothing ------------------------------------------------------


def test_overwrite_with_a_broken_file_keeps_the_previous_run(whole, tmp_path, capsys):
    path, reference, env = whole
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.txt").write_text("hours of work")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        path.read_text().replace("  max_length: 32", "  max_length: 32\n  text_column: txt")
    )
    assert main(["run", str(bad), "-o", str(out), "--overwrite"]) == 6
    assert "has no column text_column: 'txt'" in " ".join(capsys.readouterr().err.split())
    assert tree_digest(out) == {"results.txt": hashlib.sha256(b"hours of work").hexdigest()}


def test_overwrite_keeps_the_previous_run_until_the_first_checkpoint(whole, tmp_path, monkeypatch):
    path, reference, env = whole
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.txt").write_text("hours of work")
    killed = makd(
        "run", str(path), "-o", str(out), "--overwrite", env={**env, "MAKD_FAULT": "after_step:1"}
    )
    assert killed.returncode == -9  # before the first checkpoint (step 2)
    aside = list(tmp_path.glob(".run.previous-*"))
    assert len(aside) == 1 and (aside[0] / "results.txt").read_text() == "hours of work"
    # a failure (not a kill) before the first checkpoint puts the previous run back
    from makd_registry.engine.trainer import StepResult, Trainer

    real = Trainer.train_step

    def nan_step(self):
        result = real(self)
        return StepResult(result.step, float("nan"), {}, result.lr)

    monkeypatch.setattr(Trainer, "train_step", nan_step)
    second = tmp_path / "second"
    second.mkdir()
    (second / "results.txt").write_text("more work")
    assert main(["run", str(path), "-o", str(second), "--overwrite"]) == 4
    assert tree_digest(second) == {"results.txt": hashlib.sha256(b"more work").hexdigest()}
    assert not list(tmp_path.glob(".second.previous-*"))
    # once the new run has a checkpoint the previous one is gone
    monkeypatch.setattr(Trainer, "train_step", real)
    assert main(["run", str(path), "-o", str(second), "--overwrite"]) == 0
    assert not (second / "results.txt").exists()
    assert not list(tmp_path.glob(".second.previous-*"))
    assert_same_run(reference, second)


# -- edges of resume --------------------------------------------------------------------------


def test_resume_after_the_last_checkpoint_but_before_the_summary_finishes_the_run(whole, tmp_path):
    path, reference, env = whole
    out = tmp_path / "run"
    shutil.copytree(reference, out, symlinks=True)
    (out / "summary.json").unlink()  # killed after the final checkpoint, before the summary
    shutil.rmtree(out / "student")
    assert main(["run", str(path), "-o", str(out), "--resume"]) == 0
    a = json.loads((reference / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert b["student"] == a["student"] and b["student"]  # evaluated, not empty
    assert b["final_loss"] == a["final_loss"]
    assert_same_run(reference, out)


def test_extending_a_finished_run_follows_the_new_schedule(whole, tmp_path):
    from makd_registry.engine.optim import lr_factor

    path, reference, env = whole
    out = tmp_path / "run"
    shutil.copytree(reference, out, symlinks=True)
    assert main(["run", str(path), "-o", str(out), "--resume", "--set", "training.steps=9"]) == 0
    train = {r["step"]: r for r in records(out) if r["kind"] == "train"}
    assert sorted(train) == list(range(1, 10))
    for step in (7, 8, 9):  # the lr logged at a step is the one that step used
        expected = 1e-3 * lr_factor(step - 1, total=9, warmup=0, schedule="linear")
        assert train[step]["lr"] == pytest.approx(expected, rel=1e-6), step


def test_a_torn_metrics_line_does_not_stop_a_resume(whole, killed_at_3, tmp_path):
    path, reference, env = whole
    out = tmp_path / "run"
    shutil.copytree(killed_at_3, out, symlinks=True)
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "train", "step": 4, "lo')  # a write cut short by the kill
    assert main(["run", str(path), "-o", str(out), "--resume"]) == 0
    assert_same_run(reference, out)


def test_the_teacher_cache_survives_a_resume_in_its_first_epoch(tmp_path):
    # 96 examples, batch 8: the first epoch is 12 steps; the run stops at step 5
    path = write_objective(tmp_path, steps=16)
    text = path.read_text().replace("  eval_every: 3\n", "  eval_every: 8\n  teacher_cache: {}\n")
    path.write_text(text)
    whole_run, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert makd("run", str(path), "-o", str(whole_run)).returncode == 0
    killed = makd("run", str(path), "-o", str(resumed), env={"MAKD_FAULT": "sigint_after_step:5"})
    assert killed.returncode == 130, killed.stderr
    assert not (resumed / "teacher_cache-0.safetensors").exists()
    done = makd("run", str(path), "-o", str(resumed), "--resume")
    assert done.returncode == 0, done.stderr
    assert (resumed / "teacher_cache-0.safetensors").is_file()
    assert_same_run(whole_run, resumed)


def test_two_processes_with_dropout_resume_exactly(tmp_path):
    text = OBJECTIVE.format(
        teacher=DROPOUT.replace("LAYERS", "2"),
        student=DROPOUT.replace("LAYERS", "1"),
        tokenizer=ROOT / "data" / "tokenizers" / "bert-uncased",
        train=ROOT / "data" / "sst2" / "train-2k.tsv",
        dev=ROOT / "data" / "sst2" / "dev.tsv",
        steps=4,
        objective="  type: sum\n  terms: [{type: logits_kd}, {type: ce}]\n",
    )
    path = tmp_path / "dropout.yaml"
    path.write_text(text)

    def torchrun(out: Path, *extra: str, fault: str = "") -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if fault:
            env["MAKD_FAULT"] = fault
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             "--master_port=29533", "-m", "makd_registry.cli", "run", str(path),
             "--output", str(out), *extra],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip

    whole_run, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert torchrun(whole_run).returncode == 0
    stopped = torchrun(resumed, fault="sigint_after_step:2")
    assert "interrupted by SIGINT at step 2 of 4" in stopped.stderr
    assert stopped.stderr.count("interrupted by SIGINT") == 1  # rank 0 says it, once
    state = json.loads((resumed / "checkpoint" / "state.json").read_text())
    assert len(state["rank_rng"]) == 2
    assert torchrun(resumed, "--resume").returncode == 0
    assert_same_run(whole_run, resumed)


def test_the_plan_refuses_a_teacher_batch_smaller_than_the_processes(tmp_path, capsys):
    from rich.console import Console

    from makd_registry.engine.distributed import World
    from makd_registry.engine.run import Run, RunOptions
    from makd_registry.errors import ObjectiveError

    path = write_objective(tmp_path)
    path.write_text(
        path.read_text().replace(
            "learning_rate: 1.0e-3}", "learning_rate: 1.0e-3, batch_size: 2}", 1
        )
    )
    run = Run(path, RunOptions(output=tmp_path / "run"), Console(quiet=True))
    run.world = World(rank=0, world_size=4, local_rank=0)
    run._check_run_dir()
    with pytest.raises(ObjectiveError) as exc:
        run.plan()
    assert (
        "teacher.finetune.batch_size: the teacher's batch of 2 must give every one of the 4"
        in str(exc.value)
    )
    assert not (tmp_path / "run").exists()


def test_a_run_without_a_checkpoint_link_uses_its_newest_complete_checkpoint(tmp_path):
    from makd_registry.engine.checkpoint import REQUIRED, checkpoint_dir

    store = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        directory = store / f"step-{step:08d}"
        directory.mkdir(parents=True)
        for name in REQUIRED if complete else REQUIRED[:1]:
            (directory / name).write_text("{}")
    assert checkpoint_dir(tmp_path) == store / "step-00000004"


def test_cache_keys_cover_what_the_cached_outputs_depend_on(tmp_path):
    from makd_registry.engine.teacher import teacher_key
    from makd_registry.generation import cache_key
    from makd_registry.objective import load_objective
    from makd_registry.plugins import make_registry

    path = write_objective(tmp_path)
    registry = make_registry()

    def key(*overrides):
        resolved = load_objective(path, registry, overrides=list(overrides))
        return teacher_key(resolved.spec, resolved.base_dir)

    base = key()
    assert key("training.max_grad_norm=0.01") != base  # the teacher's training clips too
    assert key("training.precision=bf16") != base
    assert key("training.seed=3") == base  # the teacher has its own seed
    assert key("training.log_every=5") == base
    resolved = load_objective(path, registry)
    config = registry.get("seqkd").Config(type="seqkd", decoding="sample")
    options = config.model_dump(mode="json", exclude={"name", "weight", "cache_dir"})
    generation = {"seed": 0, "batch_size": 8, "device": "cpu", "bf16": False}
    tokenizer = list(range(10))
    data = resolved.spec.data
    first = cache_key("t", data, tokenizer, options, generation, "seqkd")
    assert cache_key("t", data, tokenizer, options, {**generation, "seed": 1}, "seqkd") != first
    assert cache_key("t", data, tokenizer, {**options, "top_p": 0.5}, generation, "seqkd") != first
