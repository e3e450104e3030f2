"""The offline teacher artifact: ``makd teacher cache`` builds it, ``teacher: {cache: DIR}``
trains from it without the teacher's weights, and a cache that does not match is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from makd_registry.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizers" / "shakespeare-bpe"
TEXT = ROOT / "data" / "tinyshakespeare"

QWEN = (
    "{{model_type: qwen2, vocab_size: 4096, hidden_size: 32, intermediate_size: 64, "
    "num_hidden_layers: {layers}, num_attention_heads: 4, num_key_value_heads: 2, "
    "max_position_embeddings: 64, tie_word_embeddings: true, bos_token_id: 0, "
    "eos_token_id: 0, pad_token_id: 0}}"
)
TEACHER = f"""\
  config: {QWEN.format(layers=4)}
  tokenizer: {TOKENIZER}
  finetune: {{steps: 3, learning_rate: 1.0e-3}}
"""
MAKD = """\
  type: sum
  name: makd
  layers: uniform
  terms:
    - {type: attention_kl}
    - {type: hidden_mse}
    - {type: mha_matrix, projections: [q, o], input: teacher}
    - {type: logits_kd, temperature: 1.0, alpha: 0.5}
"""
KD = """\
  type: logits_kd
  temperature: 1.0
"""
OBJECTIVE = """\
teacher:
{teacher}student:
  {student}
data:
  task: causal_lm
  train: {train}
  validation: {valid}
  text_column: text
  max_length: 32
  train_limit: 100
  validation_limit: 16
training:
  steps: 2
  batch_size: 4
  learning_rate: 1.0e-3
  log_every: 1
objective:
{objective}"""


def write(
    directory: Path,
    name: str,
    *,
    teacher: str = TEACHER,
    objective: str = MAKD,
    student: str | None = None,
    train: Path = TEXT / "train.txt",
) -> Path:
    path = directory / name
    path.write_text(
        OBJECTIVE.format(
            teacher=teacher,
            student=student or f"config: {QWEN.format(layers=2)}",
            train=train,
            valid=TEXT / "valid.txt",
            objective=objective,
        ),
        encoding="utf-8",
    )
    return path


def cached(directory: str = "art", extra: str = "") -> str:
    return f"  cache: {directory}\n{extra}"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "makd-cache"))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    """Progress bars stay off the test output (the CLI's console, made quiet)."""
    import makd_registry.cli as cli

    original = cli.Console

    def quiet(*args, **kwargs):
        return original(*args, **{**kwargs, "quiet": kwargs.get("stderr", False)})

    monkeypatch.setattr(cli, "Console", quiet)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One dense artifact of the MaKD objective (3 shards of 8 rows), built once."""
    directory = tmp_path_factory.mktemp("artifact")
    mp = pytest.MonkeyPatch()
    mp.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "makd-cache"))
    try:
        source = write(directory, "live.yaml")
        code = main(["teacher", "cache", str(source), "-o", str(directory / "art")] + SHARDS)
        assert code == 0
    finally:
        mp.undo()
    return directory


SHARDS = ["--shard-rows", "8", "--batch-size", "4"]


def first_terms(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    return {**train[0]["terms"], "loss": train[0]["loss"]}


def forbid_teacher_weights(monkeypatch) -> list:
    """Fail on any load of the teacher's weights; collect the trainers' teachers."""
    import makd_registry.models.build as build
    import makd_registry.models.serialization as serialization
    from makd_registry.engine import run as run_module
    from makd_registry.engine.trainer import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher's weights were loaded")

    real_from_config = build.build_from_config

    def from_config(config, head, registry, *, what="model", **kwargs):
        if what.startswith("teacher"):
            refuse()
        return real_from_config(config, head, registry, what=what, **kwargs)

    monkeypatch.setattr(build, "load_pretrained", refuse)
    monkeypatch.setattr(build, "build_from_config", from_config)
    monkeypatch.setattr(serialization, "load_student", refuse)
    monkeypatch.setattr(run_module.Run, "_finetune_teacher", refuse)
    teachers = []
    post_init = Trainer.__post_init__

    def record(self):
        teachers.append(self.teacher)
        post_init(self)

    monkeypatch.setattr(Trainer, "__post_init__", record)
    return teachers


# -- training from the artifact ------------------------------------------------------------


def test_training_from_the_artifact_matches_the_live_teacher_without_its_weights(
    built, tmp_path, monkeypatch, capsys
):
    from makd_registry.capture.extractor import FeatureExtractor

    live = built / "live.yaml"
    assert main(["run", str(live), "-o", str(tmp_path / "live")]) == 0
    path = write(built, f"from-cache-{tmp_path.name}.yaml", teacher=cached())
    assert main(["validate", str(path)]) == 0  # depths from the artifact's config
    teachers = forbid_teacher_weights(monkeypatch)
    forwards = []
    monkeypatch.setattr(FeatureExtractor, "run_teacher", lambda *a: forwards.append(1))
    capsys.readouterr()
    assert main(["run", str(path), "-o", str(tmp_path / "cached")]) == 0
    assert forwards == []  # never ran a teacher
    assert teachers and all(p.is_meta for t in teachers for p in t.parameters())
    a, b = first_terms(tmp_path / "live"), first_terms(tmp_path / "cached")
    assert set(a) == set(b) and len(a) == 6
    for key in a:  # fp16 storage of the teacher's features
        assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-6), key
    sa = json.loads((tmp_path / "live" / "summary.json").read_text())
    sb = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert sb["teacher"] == sa["teacher"] and sb["teacher"]["perplexity"] > 1  # from the manifest
    assert sb["student"]["perplexity"] == pytest.approx(sa["student"]["perplexity"], rel=1e-3)


def test_the_manifest_names_every_input_by_its_hash(built):
    art = built / "art"
    manifest = json.loads((art / "manifest.json").read_text())
    assert set(manifest["hashes"]) == {"teacher", "tokenizer", "data", "preprocessing", "capture"}
    identity = manifest["identity"]
    assert identity["teacher"]["finetune"]  # the fine-tuned teacher's key
    assert set(identity["tokenizer"]["files"]) == {"tokenizer.json", "tokenizer_config.json"}
    assert identity["preprocessing"]["settings"]["max_length"] == 32
    assert ["hidden", 1] in identity["capture"]["features"]
    assert ["o_proj", 3] in identity["capture"]["module_inputs"]
    rows = manifest["rows"]
    assert [(s["first_row"], s["rows"]) for s in manifest["shards"]] == [
        (i, min(8, rows - i)) for i in range(0, rows, 8)
    ]
    assert manifest["teacher_eval"]["scores"]["perplexity"] > 1
    assert not (art / "build.json").exists()
    config = json.loads((art / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 4
    copied = {p.name: p.read_bytes() for p in (art / "tokenizer").iterdir()}
    assert copied == {n: (TOKENIZER / n).read_bytes() for n in copied}


def test_a_top_k_artifact_serves_top_k_logits_and_with_k_v_matches_dense(tmp_path):
    kd = write(tmp_path, "kd.yaml", objective=KD)
    for k in (16, 4096):
        out = tmp_path / f"top{k}"
        assert main(["teacher", "cache", str(kd), "-o", str(out), "--top-k", str(k)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["identity"]["capture"]["top_k"] == k
        per_token = manifest["bytes_per_token"]
        assert per_token == pytest.approx(k * 6 + 4, rel=0.2)  # fp16 values, int32 ids, residual
    live = tmp_path / "live"
    assert main(["run", str(kd), "-o", str(live)]) == 0
    for k in (16, 4096):
        path = write(tmp_path, f"from-{k}.yaml", teacher=cached(f"top{k}"), objective=KD)
        assert main(["run", str(path), "-o", str(tmp_path / f"run{k}")]) == 0
    want = first_terms(live)["loss"]
    assert first_terms(tmp_path / "run4096")["loss"] == pytest.approx(want, rel=2e-3)
    # k 16: the forward KL with one bucket for the rest of the mass, a different value
    assert first_terms(tmp_path / "run16")["loss"] != pytest.approx(want, rel=2e-3)


def test_an_encoder_artifact_with_its_teacher_config_checks_the_teacher(tmp_path, capsys):
    from test_engine import write_objective

    source = write_objective(tmp_path, steps=2)
    text = source.read_text()
    assert main(["teacher", "cache", str(source), "-o", str(tmp_path / "art")]) == 0
    both = tmp_path / "both.yaml"
    both.write_text(text.replace("teacher:\n", "teacher:\n  cache: art\n", 1))
    assert main(["run", str(source), "-o", str(tmp_path / "live")]) == 0
    assert main(["run", str(both), "-o", str(tmp_path / "cached")]) == 0
    a, b = first_terms(tmp_path / "live"), first_terms(tmp_path / "cached")
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-6), key
    other = tmp_path / "other-teacher.yaml"
    other.write_text(both.read_text().replace("{steps: 4,", "{steps: 5,"))
    capsys.readouterr()
    assert main(["run", str(other), "-o", str(tmp_path / "refused")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "other-teacher.yaml:2:" in err and "teacher.cache" in err
    assert "the teacher differs: the fine-tuned teacher" in err
    assert not (tmp_path / "refused").exists()


# -- refusals -------------------------------------------------------------------------------


def refused(path: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["run", str(path), "-o", str(out), *extra])
    err = " ".join(capsys.readouterr().err.split())
    assert not out.exists(), "a refused run wrote its run directory"
    return code, err


def test_a_cache_of_other_data_preprocessing_or_tokenizer_is_refused(built, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(built / "art", art)
    out = tmp_path / "run"
    base = write(tmp_path, "cache.yaml", teacher=cached())
    assert main(["run", str(base), "--dry-run"]) == 0

    code, err = refused(base, out, capsys, "--set", "data.max_length=24")
    assert code == 2 and "cache.yaml:2:10: teacher.cache:" in err
    assert "the preprocessing differs: data.max_length: 32 → 24" in err

    changed = tmp_path / "train.txt"
    changed.write_text((TEXT / "train.txt").read_text().replace("Citizen", "Citizens", 1))
    path = write(tmp_path, "data.yaml", teacher=cached(), train=changed)
    code, err = refused(path, out, capsys)
    assert code == 2 and "the training data differs: data.train train.txt has sha256" in err

    tokenizer = tmp_path / "tok"
    shutil.copytree(TOKENIZER, tokenizer)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**config, "makd_test": 1}))
    path = write(tmp_path, "tok.yaml", teacher=cached(extra=f"  tokenizer: {tokenizer}\n"))
    code, err = refused(path, out, capsys)
    assert code == 2 and "the tokenizer differs" in err and "tokenizer_config.json" in err
    assert "preprocessing" not in err  # the same rows


def test_a_cache_without_a_needed_feature_names_it(tmp_path, capsys):
    kd = write(tmp_path, "kd.yaml", objective=KD)
    assert main(["teacher", "cache", str(kd), "-o", str(tmp_path / "art")]) == 0
    path = write(tmp_path, "makd.yaml", teacher=cached())
    code, err = refused(path, tmp_path / "run", capsys)
    assert code == 2
    assert "the objective needs hidden states of teacher layer 1, which the teacher artifact" in err
    assert "attention queries of teacher layer 3" in err
    assert "the input of the teacher's o_proj module at layer 1" in err


def test_a_damaged_missing_or_unfinished_artifact_is_refused(built, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(built / "art", art)
    path = write(tmp_path, "cache.yaml", teacher=cached())
    out = tmp_path / "run"
    shard = art / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, err = refused(path, out, capsys)
    assert code == 6 and "shard shard-00001.safetensors (rows 8..15) is damaged" in err
    shard.unlink()
    code, err = refused(path, out, capsys)
    assert code == 6 and "shard shard-00001.safetensors (rows 8..15) is missing" in err
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").unlink()
    (art / "build.json").write_text(
        json.dumps({"shards": manifest["shards"][:1], "shard_count": 3, "command": "makd x"})
    )
    code, err = refused(path, out, capsys)
    assert code == 2 and "is incomplete (1 of 3 shards built, no manifest.json)" in err
    assert "run 'makd x' to finish it" in err
    (art / "build.json").unlink()
    code, err = refused(path, out, capsys)
    assert code == 2 and "is not a teacher artifact: it has no manifest.json" in err
    shutil.rmtree(art)
    code, err = refused(path, out, capsys)
    assert code == 5 and "teacher.cache" in err and "does not exist: build it with" in err


def test_what_needs_the_teachers_weights_is_refused_located(built, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(built / "art", art)
    out = tmp_path / "run"
    seqkd = write(
        tmp_path,
        "seqkd.yaml",
        teacher=cached(),
        objective="  type: seqkd\n  max_new_tokens: 4\n",
    )
    code, err = refused(seqkd, out, capsys)
    assert (
        code == 2
        and "seqkd.yaml:19:3: objective:" in err
        and "trains on sequences the teacher generates" in err
    )
    from makd_registry.plugins import load_plugins

    if load_plugins().registry.get("gkd") is not None:  # on-policy: batches made in training
        gkd = write(
            tmp_path, "gkd.yaml", teacher=cached(), objective="  type: gkd\n  max_new_tokens: 4\n"
        )
        code, err = refused(gkd, out, capsys)
        assert code == 2 and "gkd.yaml:19:3: objective:" in err
        assert "trains on batches made during training" in err
    layers = write(tmp_path, "layers.yaml", teacher=cached(), student="teacher_layers: [1, 3]")
    code, err = refused(layers, out, capsys)
    assert code == 2 and "student.teacher_layers" in err and "give the student by 'model'" in err
    both = write(tmp_path, "both.yaml", teacher=cached())
    text = both.read_text().replace("  log_every: 1\n", "  log_every: 1\n  teacher_cache: {}\n")
    both.write_text(text)
    code, err = refused(both, out, capsys)
    assert code == 2 and "training.teacher_cache" in err and "drop training.teacher_cache" in err


# -- the build ------------------------------------------------------------------------------


def test_an_interrupted_build_resumes_and_ends_byte_identical(built, tmp_path, monkeypatch, capsys):
    import makd_registry.engine.teacher_artifact as artifact

    source = built / "live.yaml"
    target = tmp_path / "art"

    def interrupt(index):
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "_shard_done", interrupt)
    capsys.readouterr()
    assert main(["teacher", "cache", str(source), "-o", str(target), *SHARDS]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "interrupted after 2 of 3 shards" in err and "continue with: makd teacher cache" in err
    assert not (target / "manifest.json").exists()
    state = json.loads((target / "build.json").read_text())
    assert [s["file"] for s in state["shards"]] == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    # a killed write leaves a temporary file; a damaged finished shard is built again
    (target / ".shard-00002.safetensors.tmp-dead").write_bytes(b"partial")
    (target / "shard-00001.safetensors").write_bytes(b"garbage")
    monkeypatch.setattr(artifact, "_shard_done", lambda index: None)
    import makd_registry.engine.teacher_artifact as module

    messages = []
    real_say = module.ArtifactBuild.say
    monkeypatch.setattr(
        module.ArtifactBuild,
        "say",
        lambda self, text: (messages.append(text), real_say(self, text)),
    )
    assert main(["teacher", "cache", str(source), "-o", str(target), *SHARDS]) == 0
    assert any("resuming the build" in m and "at shard 1 of 3" in m for m in messages), messages
    reference = built / "art"
    names = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())
    for name in names:
        assert (reference / name).read_bytes() == (target / name).read_bytes(), name


def test_the_command_checks_before_it_writes(built, tmp_path, capsys):
    source = built / "live.yaml"

    def cache(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["teacher", "cache", *args])
        return code, " ".join(capsys.readouterr().err.split())

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, err = cache(str(source), "-o", str(busy))
    assert code == 2 and "is not empty and holds no makd teacher artifact" in err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    art = tmp_path / "art"
    shutil.copytree(built / "art", art)
    code, err = cache(str(source), "-o", str(art), *SHARDS)
    assert code == 0  # the same inputs: nothing to do
    code, err = cache(str(source), "-o", str(art), "--set", "data.max_length=24", *SHARDS)
    assert code == 2 and "holds a finished artifact of other inputs" in err
    assert "data.max_length: 32 → 24" in err
    code, err = cache(str(source), "-o", str(art), "--top-k", "8")
    assert code == 2 and "the capture plan differs" in err and "--shard-rows 8 → 1024" in err

    alone = write(tmp_path, "alone.yaml", teacher=cached())
    code, err = cache(str(alone), "-o", str(tmp_path / "new"))
    assert code == 2 and "alone.yaml:2:" in err and "needs its weights" in err
    seqkd = write(tmp_path, "seqkd.yaml", objective="  type: seqkd\n  max_new_tokens: 4\n")
    code, err = cache(str(seqkd), "-o", str(tmp_path / "new"))
    assert code == 2 and "seqkd.yaml:" in err and "needs sequences the teacher generates" in err
    code, err = cache(str(source), "-o", str(tmp_path / "new"), "--set", "data.max_lenght=24")
    assert code == 2 and "max_lenght" in err
    code, err = cache(str(source), "--top-k", "8")
    assert code == 2 and "give the artifact directory with -o DIR" in err
    from test_engine import write_objective

    encoder = write_objective(tmp_path, steps=2)
    code, err = cache(str(encoder), "-o", str(tmp_path / "new"), "--top-k", "8")
    assert code == 2 and "leave --top-k out" in err
    with pytest.raises(SystemExit):
        main(["teacher", "cache", str(source), "--top-k", "0"])
    assert not (tmp_path / "new").exists()

    code, err = cache(str(source), "-o", str(art), "--top-k", "8", "--overwrite")
    assert code == 0
    assert json.loads((art / "manifest.json").read_text())["identity"]["capture"]["top_k"] == 8


# -- any process reads its own rows ----------------------------------------------------------


def test_each_rank_reads_its_own_rows_across_shards(built):
    """The rows a rank's micro-batch holds (``order[rank::world]``), in any order and
    across shards, come back as the teacher's features on exactly those rows."""
    from makd_registry.capture import CapturePlan
    from makd_registry.capture.extractor import model_inputs
    from makd_registry.capture.hooks import ModelCapture
    from makd_registry.data.collate import collate
    from makd_registry.engine.distributed import World
    from makd_registry.engine.run import Run, RunOptions
    from makd_registry.engine.teacher_artifact import TeacherArtifact
    from makd_registry.features import Feature

    path = write(built, "ranks.yaml", teacher=cached())
    run = Run(path, RunOptions(output=built / "unused"), Console(quiet=True))
    run.world = World(rank=1, world_size=2)
    run._check_run_dir()
    plan = run.plan()  # two processes are fine with an artifact (the in-run cache is not)
    assert run.artifact is not None and plan.teacher_eval
    artifact = TeacherArtifact.open(built / "art")
    capture = CapturePlan.from_requests(run.resolved.requires())
    order = [17, 2, 9, 23, 0, 14]  # rows of shards 0, 1 and 2
    mine = order[1::2]  # rank 1 of 2
    feats, inputs = artifact.assemble(mine, 32, capture, torch.device("cpu"), torch.float32, 4096)
    live = Run(built / "live.yaml", RunOptions(output=built / "unused"), Console(quiet=True))
    _, _, data = live._load_inputs()
    teacher, adapter, *_ = live._initial_teacher(data)
    teacher.eval()
    rows = [data.train[i] for i in mine]
    batch = collate(rows, 0)
    with ModelCapture(teacher, adapter, adapter.model_info(teacher.config), capture.teacher) as cap:
        with torch.no_grad():
            out = teacher(**model_inputs(batch))
        want = cap.features(out, batch["attention_mask"])
        want_inputs = cap.module_inputs()
    tolerance = {"rtol": 2e-3, "atol": 2e-3}  # fp16 storage
    for key in ((Feature.HIDDEN, 3), (Feature.LOGITS, None), (Feature.ATTENTION_KEY, 1)):
        torch.testing.assert_close(feats[key], want[key].float(), **tolerance)
    key = (Feature.O_PROJ, 1)
    torch.testing.assert_close(inputs[key], want_inputs[key].float(), **tolerance)
