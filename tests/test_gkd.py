"""On-policy distillation (``gkd``): the student's samples replace the responses on a
fraction λ of the steps, through the provider mechanism; JSD(β) over the responses."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from test_engine import makd
from test_instruction import LOSS_MASK, ROOT, _features, write_instruction

from makd_registry.capture.extractor import FeatureExtractor
from makd_registry.cli import main
from makd_registry.engine.run import Run, RunOptions
from makd_registry.generation import sample_continuations
from makd_registry.testing import registry_with, resolve

SHAKESPEARE = ROOT / "data" / "tinyshakespeare"
RAW = f"  train: {SHAKESPEARE / 'train.txt'}\n  text_column: text\n"
GKD = "  type: gkd\n  lmbda: {lmbda}\n  beta: 0.3\n  max_new_tokens: 5\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "makd-cache"))


def spy_batches(monkeypatch):
    """The (step, batch) pairs the student's distillation forwards saw."""
    seen = []
    original = FeatureExtractor.__call__

    def spy(self, batch, *, step=0, **kw):
        if self.teacher is not None:
            seen.append((step, {k: v.clone() for k, v in batch.items()}))
        return original(self, batch, step=step, **kw)

    monkeypatch.setattr(FeatureExtractor, "__call__", spy)
    return seen


def test_the_loss_is_jsd_beta_over_the_positions_that_predict_response_tokens():
    aspect = resolve(
        "teacher: {config: {num_hidden_layers: 1}}\nstudent: {config: {num_hidden_layers: 1}}\n"
        "objective: {type: gkd, beta: 0.3}\n",
        registry_with(),
    ).root
    f = _features(LOSS_MASK)
    z_s = f.student("logits")
    z_t = f.teacher("logits")
    keep = f.prediction_mask().bool()
    ls, lt = z_s[keep].log_softmax(-1), z_t[keep].log_softmax(-1)
    m = torch.logaddexp(lt + torch.tensor(0.3).log(), ls + torch.tensor(0.7).log())
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731
    expected = (0.3 * kl(lt, m) + 0.7 * kl(ls, m)).mean()
    assert aspect.loss(f).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_lambda_0_never_and_lambda_1_always_trains_on_the_students_samples(
    lmbda, tmp_path, monkeypatch
):
    seen = spy_batches(monkeypatch)
    path = write_instruction(tmp_path, GKD.format(lmbda=lmbda))
    assert main(["run", str(path), "--output", str(tmp_path / "r")]) == 0
    assert len(seen) == 3
    for _, batch in seen:
        labelled = batch["labels"] != -100
        if lmbda == 0:  # the data's responses: labels and loss mask agree
            assert torch.equal(labelled, batch["loss_mask"].bool())
        else:  # the student's own tokens: no labels, the loss mask on the samples
            assert not labelled.any() and batch["loss_mask"].any()
            lengths = batch["loss_mask"].sum(-1)
            assert (1 <= lengths).all() and (lengths <= 5).all()


def test_on_policy_batches_are_the_students_samples_of_the_prompts(tmp_path, monkeypatch):
    """Step 1's batch is exactly prompt + the sample the student of that step draws with
    the row's seed."""
    seen = spy_batches(monkeypatch)
    path = write_instruction(tmp_path, GKD.format(lmbda=1.0))
    run = Run(path, RunOptions(output=tmp_path / "r"), Console(quiet=True))
    run._check_run_dir()
    plan = run.plan()
    setup = run.setup(plan)
    student = setup.student
    trainer_rows = None

    from makd_registry.engine.trainer import Trainer

    original = Trainer.micro_batches

    def capture(self):
        nonlocal trainer_rows
        for batch in original(self):
            if trainer_rows is None:
                trainer_rows = (batch["index"].tolist(), self.step)
            yield batch

    monkeypatch.setattr(Trainer, "micro_batches", capture)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    run.train(setup)
    indices, step = trainer_rows
    assert step == 0
    first = seen[0][1]
    probe = type(student)(student.config)
    probe.load_state_dict(before)  # the student as step 1 sampled with
    from makd_registry.engine.seeding import purpose_seed

    prompts = [
        plan.data.train[i]["input_ids"][: plan.data.train[i]["prompt_length"]] for i in indices
    ]
    samples = sample_continuations(
        probe,
        prompts,
        [purpose_seed(0, f"gkd:sample:0:{i}") for i in indices],
        max_new_tokens=5,
        temperature=1.0,
        pad_id=0,
        eos_id=0,
        device="cpu",
    )
    for row, (p, s) in enumerate(zip(prompts, samples, strict=True)):
        n = len(p) + len(s)
        assert first["input_ids"][row, :n].tolist() == p + s
        assert first["loss_mask"][row].tolist() == [0] * len(p) + [1] * len(s) + [0] * (
            first["input_ids"].shape[1] - n
        )


def test_a_rows_sample_does_not_depend_on_the_other_rows_of_its_batch(tmp_path, monkeypatch):
    """Per-row seeds: split into 2 micro-batches, every row gets the same sample."""
    runs = {}
    for accumulation in (1, 2):
        seen = spy_batches(monkeypatch)
        path = write_instruction(tmp_path, GKD.format(lmbda=1.0))
        out = tmp_path / f"r{accumulation}"
        args = ["run", str(path), "--output", str(out), "--set", "training.steps=1"]
        args += ["--set", f"training.gradient_accumulation={accumulation}"]
        assert main(args) == 0
        samples = {}
        for _, batch in seen:
            for row, index in enumerate(batch["index"].tolist()):
                keep = batch["loss_mask"][row].bool()
                samples[index] = batch["input_ids"][row][keep].tolist()
        runs[accumulation] = samples
        monkeypatch.undo()
        monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "cache"))
    assert runs[1] == runs[2] and len(runs[1]) == 4


def test_lambda_picks_steps_from_the_seed_and_a_resumed_run_repeats_them(tmp_path):
    path = write_instruction(tmp_path, GKD.format(lmbda=0.5))
    text = path.read_text().replace("  steps: 3\n", "  steps: 6\n  checkpoint_every: 1\n")
    path.write_text(text)
    env = {"MAKD_CACHE_DIR": str(tmp_path / "cache")}
    whole = makd("run", str(path), "--output", str(tmp_path / "whole"), env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "cut"
    crash = makd("run", str(path), "--output", str(out), env={**env, "MAKD_FAULT": "after_step:1"})
    assert crash.returncode == -9
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    resumed = makd("run", str(path), "--output", str(out), "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"train"' in x]

    assert losses(out) == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)
    assert len(losses(out)) == 6
    # seed 0 puts steps 1 and 2 on-policy, 3 to 6 off; killed after step 1 (and its
    # checkpoint), the run resumes at step 2: the resumed part has both kinds
    from makd_plugins.gkd import StudentSamples

    from makd_registry.engine.seeding import purpose_seed
    from makd_registry.providers import BatchContext

    def decision(step):
        context = BatchContext(
            None, step, 0, [], lambda p: purpose_seed(0, p), "cpu", None, 0, 0, None
        )
        return StudentSamples.on_policy({"lmbda": 0.5}, context)

    assert [decision(s) for s in range(6)] == [True, True, False, False, False, False]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("task: instruction", "task: causal_lm"), "needs task: instruction"),
        (("  batch_size: 4\n", "  batch_size: 4\n  teacher_cache: {}\n"), "needs the live teacher"),
    ],
)
def test_gkd_is_refused_where_it_cannot_work(tmp_path, capsys, change, message):
    path = write_instruction(tmp_path, GKD.format(lmbda=0.5))
    text = path.read_text().replace(*change)
    if "causal_lm" in text:  # a causal_lm data section: raw text, no extra evaluation sets
        text = text.replace(text[text.index("  train:") : text.index("  max_length")], RAW)
        text = text.replace("train_limit: 24", "train_limit: 400")
    path.write_text(text)
    assert main(["run", str(path), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "objective" in err
    assert not (tmp_path / "r").exists()


def test_two_gkd_terms_must_agree_on_how_they_sample(tmp_path, capsys):
    objective = (
        "  type: sum\n  terms:\n"
        "    - {type: gkd, name: a, lmbda: 0.5}\n    - {type: gkd, name: b, lmbda: 0.2}\n"
    )
    path = write_instruction(tmp_path, objective)
    assert main(["run", str(path), "--output", str(tmp_path / "r")]) == 2
    assert "must use the same lmbda" in " ".join(capsys.readouterr().err.split())
