"""Student recipes: layer selection, low-rank factorization, saving, loading, dense export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from makd_registry.lowrank import LowRankLinear
from makd_registry.models import ArchitectureError, make_architecture_registry
from makd_registry.models.loading import ModelError
from makd_registry.models.serialization import (
    FACTORIZED_WEIGHTS,
    STUDENT_RECORD,
    export_dense,
    load_student,
    save_student,
)
from makd_registry.models.students import (
    factorize,
    parameter_counts,
    select_layers,
    solve_rank,
)
from makd_registry.testing.adapters import sample_batch, tiny_config

CASES = [
    ("bert", "AutoModelForSequenceClassification"),
    ("roberta", "AutoModelForMaskedLM"),
    ("gpt2", "AutoModelForCausalLM"),
    ("llama", "AutoModelForCausalLM"),
    ("qwen2", "AutoModelForCausalLM"),
    ("mistral", "AutoModelForCausalLM"),
]


@pytest.fixture(scope="module")
def registry():
    return make_architecture_registry()


def build(family: str, head: str, seed: int = 0):
    torch.manual_seed(seed)
    return getattr(transformers, head).from_config(tiny_config(family)).eval()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(("family", "head"), CASES, ids=[c[0] for c in CASES])
def test_full_rank_factorization_reproduces_the_teacher(registry, family, head):
    teacher = build(family, head)
    student = copy.deepcopy(teacher)
    report = factorize(student, registry.for_model(student), rank="full")
    batch = sample_batch(120)
    torch.testing.assert_close(logits(student, batch), logits(teacher, batch), atol=1e-5, rtol=0)
    n_layers = teacher.config.num_hidden_layers
    # attention (q, k, v, o; GPT-2: fused qkv, o) + FFN (in, out; gated: gate, up, down)
    per_layer = {"gpt2": 2 + 2, "bert": 4 + 2, "roberta": 4 + 2}.get(family, 4 + 3)
    assert len(report.modules) == n_layers * per_layer
    assert sum(isinstance(m, LowRankLinear) for m in student.modules()) == len(report.modules)


@pytest.mark.parametrize(("family", "head"), CASES, ids=[c[0] for c in CASES])
def test_budget_gives_the_largest_uniform_rank_that_fits(registry, family, head):
    model = build(family, head)
    before = parameter_counts(model)
    report = factorize(model, registry.for_model(model), budget=0.4)
    assert report.before == before
    assert report.after.non_embedding <= 0.4 * before.non_embedding
    assert report.after.embedding == before.embedding
    ranks = {m.rank for m in report.modules}
    assert len(ranks) == 1
    rank = ranks.pop()
    shapes = [(m.out_features, m.in_features) for m in report.modules]
    # one more rank would not fit
    over = before.non_embedding - sum(max(o * i - (rank + 1) * (i + o), 0) for o, i in shapes)
    assert over > 0.4 * before.non_embedding


def test_factorized_matrices_are_the_truncated_svd(registry):
    teacher = build("bert", "AutoModelForSequenceClassification")
    student = copy.deepcopy(teacher)
    factorize(student, registry.for_model(student), modules=["q"], rank=5)
    w = teacher.bert.encoder.layer[1].attention.self.query.weight.detach()
    low = student.bert.encoder.layer[1].attention.self.query
    s = torch.linalg.svdvals(w)
    err = torch.linalg.matrix_norm(low.to_dense().weight - w)
    assert err.item() == pytest.approx(s[5:].square().sum().sqrt().item(), rel=1e-4)
    assert isinstance(student.bert.encoder.layer[1].attention.self.key, torch.nn.Linear)


def test_factorize_errors_are_clear(registry):
    gpt2 = build("gpt2", "AutoModelForCausalLM")
    adapter = registry.for_model(gpt2)
    with pytest.raises(ArchitectureError, match="one fused matrix .*attn.c_attn"):
        factorize(gpt2, adapter, modules=["q"], rank=2)
    with pytest.raises(ArchitectureError, match="no gated MLP"):
        factorize(gpt2, adapter, modules=["ffn_gate"], rank=2)
    llama = build("llama", "AutoModelForCausalLM")
    with pytest.raises(ArchitectureError, match="gated MLP: its FFN input projections"):
        factorize(llama, registry.for_model(llama), modules=["ffn_in"], rank=2)
    with pytest.raises(ArchitectureError, match="rank 40 exceeds the full rank 32"):
        factorize(llama, registry.for_model(llama), modules=["q"], rank=40)
    with pytest.raises(ArchitectureError, match="out of reach"):
        factorize(llama, registry.for_model(llama), modules=["q"], budget=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        factorize(llama, registry.for_model(llama), rank=2, budget=0.5)


def test_solve_rank_edges():
    assert solve_rank([(100, 100)], 10_000, 1.0) == 100
    assert solve_rank([(100, 100)], 10_000, 0.5) == 25  # 25 * 200 = 5000
    assert solve_rank([(100, 100)], 10_000, 0.0201) == 1


@pytest.mark.parametrize(("family", "head"), CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_layer_selection_copies_the_chosen_teacher_layers(registry, family, head):
    teacher = build(family, head)
    adapter = registry.for_model(teacher)
    student = select_layers(teacher, adapter, [2, 0])
    assert student.config.num_hidden_layers == 2
    s_layers, t_layers = adapter.layers(student), adapter.layers(teacher)
    for s, t in ((0, 2), (1, 0)):
        for (name, p), (_, q) in zip(
            s_layers[s].named_parameters(), t_layers[t].named_parameters(), strict=True
        ):
            assert torch.equal(p, q), name
    # keeping every layer in order is the teacher itself
    same = select_layers(teacher, adapter, [0, 1, 2])
    batch = sample_batch(120)
    torch.testing.assert_close(logits(same, batch), logits(teacher, batch))
    with pytest.raises(ArchitectureError, match="distinct layers of the teacher"):
        select_layers(teacher, adapter, [0, 0])


@pytest.mark.parametrize(("family", "head"), CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_plain_student_round_trips_through_plain_transformers(registry, family, head, tmp_path):
    teacher = build(family, head)
    student = select_layers(teacher, registry.for_model(teacher), [0, 2])
    save_student(student, tmp_path / "s", record={"recipe": {"teacher_layers": [0, 2]}})
    assert (tmp_path / "s" / "model.safetensors").is_file()
    record = json.loads((tmp_path / "s" / STUDENT_RECORD).read_text())
    assert record["recipe"] == {"teacher_layers": [0, 2]} and record["factorized"] == {}
    reloaded = getattr(transformers, head).from_pretrained(tmp_path / "s").eval()
    batch = sample_batch(120)
    torch.testing.assert_close(logits(reloaded, batch), logits(student, batch))
    assert not list(tmp_path.glob(".s.*"))  # no temporary directories left


@pytest.mark.parametrize(("family", "head"), CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_factorized_student_saves_loads_and_exports_dense(registry, family, head, tmp_path):
    model = build(family, head)
    report = factorize(model, registry.for_model(model), budget=0.5)
    with torch.no_grad():  # move away from the SVD init, as training would
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.up.weight.mul_(1.1)
    save_student(model, tmp_path / "f")
    assert (tmp_path / "f" / FACTORIZED_WEIGHTS).is_file()
    assert not (tmp_path / "f" / "model.safetensors").exists()
    loaded = load_student(tmp_path / "f")
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == len(report.modules)
    assert parameter_counts(loaded) == report.after
    batch = sample_batch(120)
    expected = logits(model, batch)
    torch.testing.assert_close(logits(loaded, batch), expected)
    # plain transformers refuses the factorized directory instead of loading random weights
    with pytest.raises(OSError):
        getattr(transformers, head).from_pretrained(tmp_path / "f")
    export_dense(tmp_path / "f", tmp_path / "d", registry)
    dense = getattr(transformers, head).from_pretrained(tmp_path / "d").eval()
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    torch.testing.assert_close(logits(dense, batch), expected, atol=1e-5, rtol=0)


def test_a_failed_save_keeps_the_previous_student(registry, tmp_path):
    model = build("bert", "AutoModelForSequenceClassification")
    save_student(model, tmp_path / "s")
    before = (tmp_path / "s" / "model.safetensors").read_bytes()

    class Broken:
        def save_pretrained(self, directory):
            (directory / "partial").write_text("x")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_student(model, tmp_path / "s", tokenizer=Broken())
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "s" / "partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_load_student_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_student(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / STUDENT_RECORD).write_text('{"format": 99}')
    with pytest.raises(ModelError, match="format 1"):
        load_student(tmp_path / "bad")
