"""Several processes on PyTorch's own engine (``training.distributed``), under torchrun with
gloo on the CPU: every strategy (replicate, ddp, fsdp, with a teacher replicated or sharded)
computes the single-process update on a MaKD objective of every term (token-averaged terms,
uneven padding and an uneven split of rows across the processes, student modules applied
to the teacher's inputs, gradient accumulation); a checkpoint resumes on another number of
processes; the final student of a sharded run is an ordinary transformers model. Then the
plan's refusals and the checkpoint formats, in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_engine import makd, write_objective
from test_run_integrity import EVERY_TERM, assert_same_run

from makd_registry.cli import main

ROOT = Path(__file__).resolve().parents[1]

#: 7 rows per micro-batch, 2 micro-batches per step: 4 and 3 rows per process, each
#: padded to its own longest row
STEPS = 4


def torchrun(path: Path, out: Path, *extra: str, port: int, fault: str = "") -> Any:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env["MAKD_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={port}", "-m", "makd_registry.cli", "run", str(path),
         "--output", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def max_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest relative error ``|a - b| / |a|`` (Frobenius norms) over the tensors; a
    tensor of norm below 1e-2 is compared as if it had 1e-2, i.e. to 1e-7 absolute (an
    attention key's bias, whose gradient is zero in exact arithmetic, holds only rounding
    noise of ~1e-8, different in every summation order)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-2)) for k in a)


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


def train_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def every_term(tmp_path_factory):
    """The objective (every term, batch 14 in 2 micro-batches of 7) and its 1-process run."""
    base = tmp_path_factory.mktemp("every-term")
    os.environ["MAKD_CACHE_DIR"] = str(base / "cache")
    path = write_objective(base, steps=STEPS, objective=EVERY_TERM, student_layers=2)
    text = path.read_text().replace("batch_size: 8", "batch_size: 14\n  gradient_accumulation: 2")
    path.write_text(text)
    single = base / "single"
    done = makd("run", str(path), "--output", str(single))
    assert done.returncode == 0, done.stderr
    return path, single


@pytest.mark.parametrize(
    ("strategy", "teacher", "port"),
    [("replicate", "replicate", 29541), ("ddp", "replicate", 29542), ("fsdp", "fsdp", 29543)],
)
def test_every_strategy_computes_the_one_process_update(every_term, strategy, teacher, port):
    path, single = every_term
    out = path.parent / f"two-{strategy}"
    setting = f"training.distributed={{strategy: {strategy}, teacher: {teacher}}}"
    done = torchrun(path, out, "--set", setting, port=port)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["processes"] == 2
    assert record["distributed"]["strategy"] == strategy
    assert record["distributed"]["teacher"] == teacher
    assert max_relative(student_weights(single), student_weights(out)) < 1e-5
    for one, two in zip(train_losses(single), train_losses(out), strict=True):
        assert abs(one - two) <= 1e-5 * abs(one)
    if strategy == "fsdp":
        # the gathered student is an ordinary transformers model, alignment maps beside it
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(out / "student")
        loaded = {k: v for k, v in model.state_dict().items() if k in student_weights(out)}
        assert max_relative(student_weights(single), loaded) < 1e-5
        assert (out / "student" / "aspect_modules.safetensors").is_file()
        state = json.loads((out / "checkpoint" / "state.json").read_text())
        assert state["format"] == 2 and state["world_size"] == 2
        assert len(state["files"]) == 2  # each process wrote its own shards


#: the pooler and the classifier get no gradient from this objective
HIDDEN_ONLY = "  type: hidden_mse\n  layers: uniform\n"


@pytest.fixture(scope="module")
def hidden_only(tmp_path_factory):
    base = tmp_path_factory.mktemp("hidden-only")
    os.environ["MAKD_CACHE_DIR"] = str(base / "cache")
    path = write_objective(base, steps=3, objective=HIDDEN_ONLY, student_layers=2)
    path.write_text(path.read_text().replace("batch_size: 8", "batch_size: 7"))
    single = base / "single"
    done = makd("run", str(path), "--output", str(single))
    assert done.returncode == 0, done.stderr
    return path, single


@pytest.mark.parametrize(
    ("strategy", "port"), [("replicate", 29547), ("ddp", 29548), ("fsdp", 29549)]
)
def test_parameters_no_process_uses_are_left_alone_as_with_one(hidden_only, strategy, port):
    """With one process a parameter without a gradient is not stepped (no weight decay):
    the wrappers' reductions hand back zeros for it, which must not step it either."""
    path, single = hidden_only
    out = path.parent / f"two-{strategy}"
    done = torchrun(path, out, "--set", f"training.distributed.strategy={strategy}", port=port)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = student_weights(single), student_weights(out)
    assert max_relative(one, two) < 1e-5
    assert any(k.startswith("bert.pooler") for k in one)
    for key in one:
        if key.startswith(("bert.pooler", "classifier")):
            assert torch.equal(one[key], two[key]), key  # never stepped: its initial value


def test_a_checkpoint_taken_before_some_parameters_had_a_gradient_resumes(hidden_only):
    """Those parameters have no optimizer state in the checkpoint; the resumed run must not
    invent one (nor refuse the checkpoint)."""
    path, single = hidden_only
    run = path.parent / "stopped"
    stopped = makd(
        "run", str(path), "--output", str(run), env={"MAKD_FAULT": "sigint_after_step:2"}
    )
    assert stopped.returncode == 130, stopped.stderr
    resumed = makd("run", str(path), "--output", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(single, run)


def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(every_term):
    path, single = every_term
    base = path.parent
    fsdp = "training.distributed={strategy: fsdp, teacher: fsdp}"
    # 2 processes stopped after step 2, resumed on 1
    two_one = base / "two-one"
    stopped = torchrun(path, two_one, "--set", fsdp, port=29544, fault="sigint_after_step:2")
    assert "interrupted by SIGINT at step 2" in stopped.stderr, stopped.stderr[-3000:]
    resumed = makd("run", str(path), "--output", str(two_one), "--resume", "--set", fsdp)
    assert resumed.returncode == 0, resumed.stderr
    assert "written by 2 process(es) and this run has 1" in resumed.stdout + resumed.stderr
    # 1 process stopped after step 2, resumed on 2
    one_two = base / "one-two"
    env = {"MAKD_FAULT": "sigint_after_step:2"}
    stopped = makd("run", str(path), "--output", str(one_two), "--set", fsdp, env=env)
    assert stopped.returncode == 130, stopped.stderr
    resumed = torchrun(path, one_two, "--resume", "--set", fsdp, port=29545)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run in (two_one, one_two):
        assert max_relative(student_weights(single), student_weights(run)) < 1e-5
        assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


def test_a_sharded_decoder_with_tied_embeddings_equals_one_process(tmp_path, monkeypatch):
    """Qwen2 (GQA, RoPE, gated MLP, tied input and output embeddings), MaKD with every
    matrix projection applied to the teacher's inputs, rows split 3 and 2."""
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "cache"))
    args = [
        "--set", "teacher.config.hidden_size=32", "--set", "teacher.config.intermediate_size=64",
        "--set", "teacher.config.num_attention_heads=4",
        "--set", "teacher.config.num_key_value_heads=2", "--set", "teacher.finetune.steps=2",
        "--set", "teacher.finetune.warmup_steps=0", "--set", "data.max_length=24",
        "--set", "data.train_limit=60", "--set", "data.validation_limit=10",
        "--set", "training.steps=2", "--set", "training.batch_size=5",
        "--set", "training.warmup_steps=0", "--set", "training.eval_every=2",
        "--set", "training.checkpoint_every=2",
        "--set", "training.distributed={strategy: fsdp, teacher: fsdp}",
    ]  # fmt: skip
    objective = ROOT / "objectives" / "qwen2-makd.yaml"
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(["run", str(objective), "--output", str(single), *args]) == 0
    done = torchrun(objective, double, *args, port=29546)
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_relative(student_weights(single), student_weights(double)) < 1e-5
    config = json.loads((double / "student" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True


# -- one process: the plan and the checkpoint formats ------------------------------------


def _dry(path: Path, *sets: str) -> subprocess.CompletedProcess:
    args = ["run", str(path), "--dry-run", "--output", str(path.parent / "dry")]
    for item in sets:
        args += ["--set", item]
    return makd(*args)


def test_the_plan_reports_the_placement_and_refuses_what_cannot_be_sharded(tmp_path):
    path = write_objective(tmp_path, steps=3)
    report = _dry(path, "training.distributed={strategy: fsdp}")
    assert report.returncode == 0, report.stderr
    assert '"distributed"' in report.stdout and '"processes": 1' in report.stdout
    compiled = _dry(path, "training.distributed={strategy: fsdp}", "training.compile=true")
    assert compiled.returncode == 2
    assert "training.distributed.strategy" in compiled.stderr
    assert "compile" in compiled.stderr
    offload = _dry(path, "training.distributed={teacher: replicate, teacher_offload: true}")
    assert offload.returncode == 2 and "teacher_offload" in offload.stderr
    typo = _dry(path, "training.distributed={strategy: zero3}")
    assert typo.returncode == 2 and "strategy" in typo.stderr


def test_gkd_refuses_a_sharded_student(tmp_path):
    objective = ROOT / "objectives" / "instruct-gkd.yaml"
    out = makd(
        "run", str(objective), "--dry-run", "--output", str(tmp_path / "r"),
        "--set", "training.distributed={strategy: fsdp}",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "training.distributed.strategy" in out.stderr and "GKD" in out.stderr


def test_auto_shards_what_would_take_over_a_quarter_of_a_process():
    from makd_registry.engine.parallel import Placement, resolve_placement
    from makd_registry.objective.sections import DistributedSection

    auto = DistributedSection()
    small = resolve_placement(
        auto, 2, student_state_mb=10, teacher_mb=10, process_memory_mb=1000, has_teacher=True
    )
    assert small == Placement(strategy="ddp", teacher="replicate")
    big = resolve_placement(
        auto, 2, student_state_mb=400, teacher_mb=300, process_memory_mb=1000, has_teacher=True
    )
    assert (big.strategy, big.teacher) == ("fsdp", "fsdp")
    one = resolve_placement(
        auto, 1, student_state_mb=400, teacher_mb=300, process_memory_mb=1000, has_teacher=True
    )
    assert one == Placement()  # one process: nothing to share
    no_teacher = resolve_placement(
        auto, 2, student_state_mb=1, teacher_mb=900, process_memory_mb=1000, has_teacher=False
    )
    assert no_teacher.teacher == "replicate"


def _format1_writer(run_dir, *, train_state, optimizer, scheduler, state, rank=0, world_size=1):
    """What makd wrote before format 2 (student.safetensors, modules.safetensors,
    optimizer.pt, the RNG in state.json), behind the same link switch."""
    import random
    import uuid

    from safetensors.torch import save_model

    from makd_registry.engine import checkpoint as ck

    store = Path(run_dir) / ck.STORE
    store.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(state['step']):08d}"
    tag = uuid.uuid4().hex[:8]
    tmp = store / f".{name}.tmp-{tag}"
    tmp.mkdir()
    save_model(train_state.student, str(tmp / "student.safetensors"))
    if len(list(train_state.aspects.parameters())):
        save_model(train_state.aspects, str(tmp / "modules.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": [],
        },
        tmp / "optimizer.pt",
    )
    legacy = {k: v for k, v in state.items() if k not in ("rank_rng", "strategy")}
    legacy["rng"] = {"python": ck._jsonable(random.getstate()), "numpy": ck._numpy_state()}
    (tmp / ck.STATE).write_text(json.dumps(legacy), encoding="utf-8")
    return ck._commit(Path(run_dir), tmp, name, int(state["step"]), tag)


def test_a_checkpoint_of_the_previous_format_still_resumes(tmp_path, monkeypatch):
    from makd_registry.engine import trainer

    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "cache"))
    path = write_objective(tmp_path, steps=4)
    whole, old = tmp_path / "whole", tmp_path / "old"
    assert main(["run", str(path), "--output", str(whole)]) == 0
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", _format1_writer)
        patch.setenv("MAKD_FAULT", "sigint_after_step:2")
        assert main(["run", str(path), "--output", str(old)]) == 130
    assert (old / "checkpoint" / "optimizer.pt").is_file()
    assert main(["run", str(path), "--output", str(old), "--resume"]) == 0
    assert_same_run(whole, old)
    assert json.loads((old / "checkpoint" / "state.json").read_text())["format"] == 2


def test_a_damaged_sharded_checkpoint_is_refused_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "cache"))
    path = write_objective(tmp_path, steps=4)
    run = tmp_path / "run"
    monkeypatch.setenv("MAKD_FAULT", "sigint_after_step:2")
    assert main(["run", str(path), "--output", str(run)]) == 130
    monkeypatch.delenv("MAKD_FAULT")
    state_file = run / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["format"] == 2 and state["files"] == [
        "shard-00001-model-00001-of-00001.safetensors"
    ]
    shard = run / "checkpoint" / state["files"][0]
    shard.rename(shard.with_suffix(".moved"))
    missing = makd("run", str(path), "--output", str(run), "--resume")
    assert missing.returncode == 2 and state["files"][0] in missing.stderr
    shard.with_suffix(".moved").rename(shard)
    state_file.write_text(json.dumps({**state, "format": 9}))
    future = makd("run", str(path), "--output", str(run), "--resume")
    assert future.returncode == 2 and "format 9" in future.stderr
    state_file.write_text(json.dumps({**state, "optimizer": {}}))
    mismatch = makd("run", str(path), "--output", str(run), "--resume")
    assert mismatch.returncode == 2 and "optimizer's settings" in mismatch.stderr
    state_file.write_text(json.dumps(state))
    shard.write_bytes(shard.read_bytes()[:200])  # cut short: its tensors cannot be read
    damaged = makd("run", str(path), "--output", str(run), "--resume")
    assert damaged.returncode == 2, damaged.stderr
    assert "does not match" in damaged.stderr and "Traceback" not in damaged.stderr


def test_a_format1_checkpoint_is_refused_by_a_sharded_student(tmp_path):
    from makd_registry.engine.checkpoint import CheckpointError, load_checkpoint

    directory = tmp_path / "checkpoints" / "step-00000002"
    directory.mkdir(parents=True)
    for name in ("student.safetensors", "optimizer.pt"):
        (directory / name).write_bytes(b"")
    (directory / "state.json").write_text(json.dumps({"step": 2}))
    os.symlink("checkpoints/step-00000002", tmp_path / "checkpoint")
    with pytest.raises(CheckpointError, match="format 1"):
        load_checkpoint(tmp_path, train_state=None, optimizer=None, scheduler=None, sharded=True)
