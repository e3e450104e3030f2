"""Hostile inputs: every bad objective, data file, model, plugin, command line and run
directory ends in its documented exit code and a message naming the file, key or column,
never a traceback, and never costs the run directory that was already there.

Each case builds its bad input in a temporary directory and runs
``makd run FILE --output EXISTING --overwrite`` (or the command the case needs) against a
run directory that holds an earlier run: ``--overwrite`` would destroy it if makd wrote
anything before its checks passed.
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_engine import MAKD_TERMS, write_objective
from test_run_integrity import tree_digest

from makd_registry.cli import main

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / "data" / "sst2"
TOKENIZER = ROOT / "data" / "tokenizers" / "bert-uncased"


@dataclass
class Case:
    name: str
    code: int
    build: Callable[[Path], tuple[list[str], list[str]]]  # tmp → (argv, mentions)
    seconds: float = 60.0


CASES: list[Case] = []


def case(code: int, seconds: float = 60.0):
    def register(fn):
        CASES.append(Case(fn.__name__, code, fn, seconds))
        return fn

    return register


def tiny(tmp: Path, **kw) -> Path:
    return write_objective(tmp, **kw)


def edited(tmp: Path, old: str, new: str, name: str = "bad.yaml", **kw) -> Path:
    text = tiny(tmp, **kw).read_text()
    assert old in text, old
    path = tmp / name
    path.write_text(text.replace(old, new, 1))
    return path


def run(path: Path | str, *extra: str) -> list[str]:
    return ["run", str(path), *extra]


def tsv(tmp: Path, name: str, rows: list[tuple[str, str]], header=("sentence", "label")) -> Path:
    path = tmp / name
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_ROWS = [(f"a fine sentence number {i}", str(i % 2)) for i in range(40)]


def with_data(tmp: Path, train: Path | str, dev: Path | None = None, extra: str = "") -> Path:
    text = tiny(tmp).read_text()
    text = text.replace(str(SST2 / "train-2k.tsv"), str(train))
    text = text.replace(str(SST2 / "dev.tsv"), str(dev or train))
    if extra:
        text = text.replace("  max_length: 32\n", "  max_length: 32\n" + extra)
    path = tmp / "data-case.yaml"
    path.write_text(text)
    return path


# -- the objective file (2) -----------------------------------------------------------------


@case(2)
def yaml_syntax_error(tmp):
    path = tmp / "syntax.yaml"
    path.write_text("objective: {type: sum, terms: [{type: ce}\n")
    return run(path), ["syntax.yaml:", "syntax error"]


@case(2)
def tab_indentation(tmp):
    path = tmp / "tabs.yaml"
    path.write_text("objective:\n\ttype: ce\n")
    return run(path), ["tabs.yaml:2:", "tabs"]


@case(2)
def duplicate_key(tmp):
    text = tiny(tmp).read_text() + "training: {steps: 3}\n"
    path = tmp / "dup.yaml"
    path.write_text(text)
    return run(path), ["dup.yaml:", "duplicate key 'training'"]


@case(2)
def misspelled_aspect_type(tmp):
    path = edited(tmp, "{type: hidden_mse,", "{type: hiden_mse,")
    return run(path), ["bad.yaml:", "did you mean 'hidden_mse'"]


@case(2)
def unknown_training_key(tmp):
    path = edited(tmp, "  log_every: 1", "  log_evry: 1")
    return run(path), ["bad.yaml:", "training.log_evry", "did you mean 'log_every'"]


@case(2)
def negative_weight(tmp):
    path = edited(tmp, "{type: attention_kl}", "{type: attention_kl, weight: -1}")
    return run(path), ["bad.yaml:", ".weight", "greater than or equal to 0"]


@case(2, seconds=1.0)
def billion_laughs(tmp):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("objective: {type: ce, name: *i}")
    path = tmp / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    return run(path), ["laughs.yaml:", "aliases"]


@case(2, seconds=1.0)
def merge_key_bomb(tmp):
    lines = ["m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}"]
    for i in range(1, 25):
        lines.append(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}, *m{i - 1}], k{i}: {i}}}")
    lines.append("objective: {type: ce, weight: 1}")
    path = tmp / "merges.yaml"
    path.write_text("\n".join(lines) + "\n")
    return run(path), ["merges.yaml:", "m0"]


@case(2, seconds=2.0)
def file_too_large(tmp):
    path = tmp / "huge.yaml"
    path.write_text("objective: {type: ce}\n" + "# padding\n" * 120_000)
    return run(path), ["huge.yaml:1:1:", "MiB"]


@case(2, seconds=2.0)
def deep_nesting(tmp):
    path = tmp / "deep.yaml"
    path.write_text("objective: " + "[" * 5000 + "]" * 5000 + "\n")
    return run(path), ["deep.yaml:", "nest"]


@case(2)
def objective_is_a_directory(tmp):
    (tmp / "objdir.yaml").mkdir()
    return run(tmp / "objdir.yaml"), ["objdir.yaml", "directory"]


@case(2)
def objective_missing(tmp):
    return run(tmp / "nope.yaml"), ["nope.yaml", "no such file"]


@case(2)
def objective_not_utf8(tmp):
    path = tmp / "latin.yaml"
    path.write_bytes("objective: {type: ce, name: caf\xe9}\n".encode("latin-1"))
    return run(path), ["latin.yaml", "cannot read"]


@case(2)
def misspelled_teacher_config_key(tmp):
    path = edited(tmp, "hidden_size: 32,", "hidden_sise: 32,")
    return run(path), ["bad.yaml:2:", "teacher.config.hidden_sise", "did you mean 'hidden_size'"]


@case(2)
def misspelled_student_config_key(tmp):
    text = tiny(tmp).read_text()
    i = text.index("student:")
    text = text[:i] + text[i:].replace("intermediate_size:", "intermediat_size:", 1)
    path = tmp / "bad.yaml"
    path.write_text(text)
    return run(path), ["bad.yaml:6:", "student.config.intermediat_size"]


@case(2, seconds=15.0)
def impossible_batch_size(tmp):
    path = edited(tmp, "  batch_size: 8", "  batch_size: 1000000000000")
    return run(path), ["bad.yaml:", "training.batch_size", "exceeds the 96 training examples"]


@case(2)
def warmup_not_below_steps(tmp):
    path = edited(tmp, "  log_every: 1", "  log_every: 1\n  warmup_steps: 6")
    return run(path), ["bad.yaml:", "training.warmup_steps", "fewer than steps"]


@case(2)
def stage_that_never_runs(tmp):
    objective = """\
  type: stages
  stages:
    - {name: first, steps: 6, objective: {type: hidden_mse, layers: uniform}}
    - {name: second, objective: {type: logits_kd}}
"""
    return run(tiny(tmp, objective=objective)), ["tiny.yaml:", "stage 'second'", "never run"]


@case(2)
def max_length_beyond_positions(tmp):
    path = edited(tmp, "  max_length: 32", "  max_length: 100")
    return run(path), ["bad.yaml:", "data.max_length", "max_position_embeddings (64)"]


@case(2)
def identity_alignment_between_unequal_widths(tmp):
    text = tiny(tmp).read_text()
    i = text.index("student:")
    text = text[:i] + text[i:].replace("hidden_size: 32", "hidden_size: 16", 1)
    text = text.replace("{type: hidden_mse, align: lowrank, rank: 4}", "{type: hidden_mse}")
    path = tmp / "bad.yaml"
    path.write_text(text)
    return run(path), ["bad.yaml:", "hidden_mse", "use align: linear or align: lowrank"]


@case(2)
def relation_heads_not_dividing(tmp):
    path = edited(tmp, "{type: attention_kl}", "{type: attention_kl, relation_heads: 3}")
    return run(path), ["bad.yaml:", "relation_heads=3 does not divide"]


@case(2)
def layer_pair_out_of_range(tmp):
    path = edited(tmp, "      layers: uniform", "      layers: [[0, 7]]")
    return run(path), ["bad.yaml:", "layers", "7"]


@case(2)
def unknown_task(tmp):
    path = edited(tmp, "  task: classification", "  task: summarisation")
    return run(path), ["bad.yaml:", "data.task"]


@case(2)
def random_teacher_without_finetune(tmp):
    path = edited(tmp, "  finetune: {steps: 4, learning_rate: 1.0e-3}\n", "")
    return run(path), ["bad.yaml:2:", "teacher.config", "finetune"]


@case(2)
def seqkd_terms_with_different_options(tmp):
    objective = """\
  type: sum
  terms:
    - {type: seqkd, name: short, max_new_tokens: 4}
    - {type: seqkd, name: long, max_new_tokens: 8}
"""
    return run(tiny(tmp, objective=objective)), ["tiny.yaml:", "same decoding options"]


@case(2)
def overwrite_of_the_working_directory(tmp):
    here = tmp / "here"
    here.mkdir()
    (here / "keep.txt").write_text("x")
    os.chdir(here)
    return ["run", str(tiny(tmp)), "-o", ".", "--overwrite"], ["working directory"]


# -- the command line (2) -------------------------------------------------------------------


@case(2)
def set_without_equals(tmp):
    return run(tiny(tmp), "--set", "training.steps"), ["<--set>:1:", "expected KEY=VALUE"]


@case(2)
def set_invalid_value(tmp):
    argv = run(tiny(tmp), "--set", "training.log_every=1", "--set", "training.steps=-1")
    return argv, ["<--set>:2:16:", "training.steps", "(from --set training.steps=-1)"]


@case(2)
def set_index_out_of_range(tmp):
    return run(tiny(tmp), "--set", "objective.terms.9.weight=1"), ["objective.terms", "no index"]


@case(2)
def resume_and_overwrite_together(tmp):
    return run(tiny(tmp), "--resume"), ["--resume and --overwrite"]


# -- models (5) -----------------------------------------------------------------------------


def _teacher_dir(tmp: Path) -> Path:
    import transformers

    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    directory = tmp / "teacher-model"
    model.save_pretrained(directory)
    return directory


def _with_teacher_model(tmp: Path, ref: str) -> Path:
    text = tiny(tmp).read_text()
    start = text.index("  config:")
    end = text.index("  tokenizer:")
    text = text[:start] + f"  model: {ref}\n" + text[end:]
    path = tmp / "model-case.yaml"
    path.write_text(text)
    return path


@case(5)
def model_directory_missing(tmp):
    return run(_with_teacher_model(tmp, str(tmp / "no-model"))), ["teacher.model", "no-model"]


@case(5)
def model_path_is_a_file(tmp):
    (tmp / "weights.bin").write_bytes(b"\0" * 16)
    return run(_with_teacher_model(tmp, str(tmp / "weights.bin"))), ["weights.bin", "is a file"]


@case(5)
def truncated_safetensors(tmp):
    directory = _teacher_dir(tmp)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return run(_with_teacher_model(tmp, str(directory))), ["teacher", str(directory)]


@case(5)
def corrupt_safetensors_header(tmp):
    directory = _teacher_dir(tmp)
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    return run(_with_teacher_model(tmp, str(directory))), ["teacher", str(directory)]


@case(5)
def config_json_not_json(tmp):
    directory = tmp / "broken-model"
    directory.mkdir()
    (directory / "config.json").write_text("{not json")
    return run(_with_teacher_model(tmp, str(directory))), ["teacher.model", "config.json"]


@case(5)
def pkg_not_installed(tmp):
    return run(_with_teacher_model(tmp, "pkg:no_such_package_xyz")), ["no_such_package_xyz"]


@case(5)
def pkg_from_the_working_directory(tmp):
    (tmp / "evil_pkg_ref.py").write_text(
        f"open({str(tmp / 'imported.marker')!r}, 'w').write('ran')\n"
    )
    os.chdir(tmp)
    return run(_with_teacher_model(tmp, "pkg:evil_pkg_ref")), ["evil_pkg_ref"]


@case(5)
def tokenizer_missing(tmp):
    path = edited(tmp, f"  tokenizer: {TOKENIZER}", f"  tokenizer: {tmp / 'no-tokenizer'}")
    return run(path), ["teacher.tokenizer", "no-tokenizer"]


@case(5)
def tokenizers_disagree(tmp):
    other = ROOT / "data" / "tokenizers" / "shakespeare-bpe"
    text = tiny(tmp).read_text().replace("data:\n", f"  tokenizer: {other}\ndata:\n", 1)
    path = tmp / "vocab.yaml"
    path.write_text(text)
    return run(path), ["teacher tokenizer", "student tokenizer", "differ"]


@case(5)
def factorize_rank_too_large(tmp):
    text = tiny(tmp).read_text()
    start = text.index("student:")
    end = text.index("data:")
    text = text[:start] + "student:\n  factorize: {rank: 999}\n" + text[end:]
    path = tmp / "rank.yaml"
    path.write_text(text)
    return run(path), ["rank 999 exceeds the full rank"]


# -- data (6) -------------------------------------------------------------------------------


@case(6)
def data_file_missing(tmp):
    path = with_data(tmp, tmp / "gone.tsv")
    return run(path), ["data.train", "gone.tsv", "does not exist"]


@case(6)
def data_file_is_a_directory(tmp):
    (tmp / "folder.tsv").mkdir()
    return run(with_data(tmp, tmp / "folder.tsv")), ["data.train", "folder.tsv", "directory"]


@case(6)
def missing_column(tmp):
    path = edited(tmp, "  max_length: 32", "  max_length: 32\n  text_column: txt")
    return run(path), ["data.train", "txt", "sentence, label"]


@case(6)
def empty_text_cell(tmp):
    rows = [*GOOD_ROWS[:10], ("", "1"), *GOOD_ROWS[10:]]
    return run(with_data(tmp, tsv(tmp, "empty.tsv", rows))), ["empty.tsv", "sentence", "11"]


@case(6)
def missing_label_cell(tmp):
    rows = [*GOOD_ROWS[:5], ("a sentence without a label", ""), *GOOD_ROWS[5:]]
    return run(with_data(tmp, tsv(tmp, "nolabel.tsv", rows))), ["nolabel.tsv", "label", "6"]


@case(6)
def validation_label_never_seen_in_training(tmp):
    dev = tsv(tmp, "dev3.tsv", [*GOOD_ROWS[:8], ("a third kind", "2")])
    path = with_data(tmp, tsv(tmp, "train.tsv", GOOD_ROWS), dev)
    return run(path), ["dev3.tsv", "label", "2"]


@case(6)
def string_label_outside_the_labels_list(tmp):
    rows = [(f"sentence {i}", ("neg", "pos")[i % 2]) for i in range(40)] + [("meh", "neutral")]
    path = with_data(tmp, tsv(tmp, "named.tsv", rows), extra="  labels: [neg, pos]\n")
    return run(path), ["named.tsv", "neutral", "neg"]


@case(6)
def negative_integer_label(tmp):
    rows = [*GOOD_ROWS, ("bad label", "-1")]
    return run(with_data(tmp, tsv(tmp, "neg.tsv", rows))), ["neg.tsv", "label", "-1"]


@case(6)
def labels_disagree_with_the_model_head(tmp):
    path = edited(
        tmp,
        "attention_probs_dropout_prob: 0.0}",
        "attention_probs_dropout_prob: 0.0, num_labels: 3}",
    )
    return run(path), ["data.train", "2 labels", "has 3"]


@case(6)
def squad_answer_not_in_the_context(tmp):
    import json

    doc = {
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "The cat sat on the mat in the morning sun.",
                        "qas": [
                            {
                                "id": f"q{i}",
                                "question": "Where did the cat sit?",
                                "answers": [{"text": "on the mat", "answer_start": 12}],
                            }
                            for i in range(12)
                        ]
                        + [
                            {
                                "id": "bad-span",
                                "question": "When?",
                                "answers": [{"text": "in the evening", "answer_start": 22}],
                            }
                        ],
                    }
                ],
            }
        ]
    }
    squad = tmp / "squad.json"
    squad.write_text(json.dumps(doc))
    text = tiny(tmp).read_text().replace("  task: classification", "  task: qa")
    text = text.replace(str(SST2 / "train-2k.tsv"), str(squad))
    text = text.replace(str(SST2 / "dev.tsv"), str(squad))
    text = text.replace("  train_limit: 96\n", "").replace("  batch_size: 8", "  batch_size: 4")
    path = tmp / "qa.yaml"
    path.write_text(text.replace(MAKD_TERMS, "  type: logits_kd\n"))
    return run(path), ["squad.json", "bad-span"]


@case(6)
def broken_json_data(tmp):
    (tmp / "rows.json").write_text('{"sentence": "ok", "label": 1}\n{"sentence": ')
    return run(with_data(tmp, tmp / "rows.json")), ["data.train", "rows.json"]


@case(6)
def binary_garbage_csv(tmp):
    (tmp / "garbage.csv").write_bytes(os.urandom(2048))
    return run(with_data(tmp, tmp / "garbage.csv")), ["data.train", "garbage.csv"]


@case(6)
def unsupported_data_file_type(tmp):
    (tmp / "rows.xml").write_text("<rows/>")
    return run(with_data(tmp, "./rows.xml")), ["rows.xml", "unsupported"]


# -- plugins (3) ----------------------------------------------------------------------------


def _plugin(tmp: Path, name: str, source: str) -> None:
    """A third-party plugin ``name`` installed by a fake distribution on ``sys.path``."""
    site = tmp / "site"
    (site / f"{name}-0.1.dist-info").mkdir(parents=True)
    (site / f"{name}-0.1.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n"
    )
    (site / f"{name}-0.1.dist-info" / "entry_points.txt").write_text(f"[makd]\n{name} = {name}\n")
    (site / f"{name}.py").write_text(textwrap.dedent(source))
    import importlib
    import sys

    sys.path.insert(0, str(site))
    importlib.invalidate_caches()


@case(3)
def plugin_that_fails_to_import(tmp):
    _plugin(tmp, "broken_plugin_x", "raise RuntimeError('this plugin is broken')\n")
    path = edited(tmp, "{type: attention_kl}", "{type: broken_aspect}")
    return run(path), ["broken_aspect", "broken_plugin_x"]


@case(3)
def plugin_registering_a_builtin_name(tmp):
    _plugin(
        tmp,
        "clash_plugin_x",
        """
        from makd_registry import Aspect, hookimpl

        class Clash(Aspect):
            name = "hidden_mse"
            def loss(self, features):
                return features.zero()

        @hookimpl
        def makd_register_aspects(register):
            register(Clash)
        """,
    )
    return run(tiny(tmp)), ["hidden_mse", "clash_plugin_x"]


@case(3)
def plugin_aspect_raising_during_training(tmp):
    _plugin(
        tmp,
        "raising_plugin_x",
        """
        from makd_registry import Aspect, Feature, FeatureRequest, hookimpl

        class Raising(Aspect):
            name = "raising_aspect"
            def requires(self):
                return [FeatureRequest("student", Feature.LOGITS)]
            def loss(self, features):
                raise KeyError("no such thing")

        @hookimpl
        def makd_register_aspects(register):
            register(Raising)
        """,
    )
    path = edited(tmp, "{type: attention_kl}", "{type: raising_aspect}")
    return run(path), ["raising_aspect", "raising_plugin_x", "KeyError", "raising_plugin_x.py"]


# -- run directories (2) --------------------------------------------------------------------


@case(2)
def output_is_a_file(tmp):
    (tmp / "out.txt").write_text("not a directory")
    return ["run", str(tiny(tmp)), "-o", str(tmp / "out.txt")], ["out.txt", "is a file"]


@case(2)
def output_parent_is_a_file(tmp):
    (tmp / "blocker").write_text("x")
    out = tmp / "blocker" / "run"
    return ["run", str(tiny(tmp)), "-o", str(out)], ["blocker", "cannot be created"]


@case(2)
def output_not_writable(tmp):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return ["run", str(tiny(tmp)), "-o", str(locked / "run")], ["locked", "not writable"]


# cases whose argv names the pre-existing run directory themselves (EXISTING below)
EXISTING = "{existing}"


@case(2)
def existing_run_without_overwrite_or_resume(tmp):
    return ["run", str(tiny(tmp)), "-o", EXISTING], ["is not empty", "--overwrite"]


@case(2)
def resume_without_a_checkpoint(tmp):
    return ["run", str(tiny(tmp)), "-o", EXISTING, "--resume"], ["holds no checkpoint"]


@case(2)
def resume_with_a_damaged_checkpoint(tmp):
    return ["run", str(tiny(tmp)), "-o", EXISTING, "--resume", "+damaged"], ["state.json"]


@case(2)
def run_without_a_file(tmp):
    return ["run"], ["FILE"]


@case(2)
def unknown_option(tmp):
    return ["run", str(tiny(tmp)), "--frobnicate"], ["--frobnicate"]


# -- the test ---------------------------------------------------------------------------------


def _existing_run(directory: Path, damaged: bool) -> None:
    """An earlier run's results (what matters is that they survive)."""
    (directory / "student").mkdir(parents=True)
    (directory / "student" / "model.safetensors").write_bytes(b"weights of hours of work")
    (directory / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    (directory / "objective.yaml").write_text("objective: {type: ce}\n")
    if damaged:
        (directory / "checkpoints" / "step-00000004").mkdir(parents=True)
        (directory / "checkpoints" / "step-00000004" / "state.json").write_text("{truncated")
        os.symlink("checkpoints/step-00000004", directory / "checkpoint")


def test_there_are_at_least_forty_hostile_cases():
    assert len(CASES) >= 40
    kinds = {c.code for c in CASES}
    assert kinds >= {2, 3, 5, 6}


@pytest.mark.parametrize("bad", CASES, ids=[c.name for c in CASES])
def test_hostile_input(bad: Case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    work = tmp_path / "work"
    work.mkdir()
    argv, mentions = bad.build(work)
    damaged = "+damaged" in argv
    argv = [a for a in argv if a != "+damaged"]
    existing = tmp_path / "existing-run"
    _existing_run(existing, damaged)
    before = tree_digest(existing)
    if EXISTING in argv:
        argv = [str(existing) if a == EXISTING else a for a in argv]
    elif argv[:1] == ["run"] and "-o" not in argv and len(argv) > 1:
        argv += ["-o", str(existing), "--overwrite"]
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    err = " ".join((captured.err + captured.out).split())
    assert code == bad.code, err
    assert "Traceback" not in err
    assert "internal error" not in err
    for mention in mentions:
        assert mention in err, f"{mention!r} not in: {err}"
    assert tree_digest(existing) == before, "the earlier run was changed"
    assert not list(tmp_path.glob(".existing-run.previous-*"))
    assert elapsed < bad.seconds, f"took {elapsed:.1f}s"
    assert not (work / "imported.marker").exists()
