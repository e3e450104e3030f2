"""The teacher-output cache: features stored once, reused in later epochs."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from test_engine import write_objective

from makd_registry.capture import CapturePlan
from makd_registry.capture.extractor import FeatureExtractor
from makd_registry.engine.run import Run, RunOptions
from makd_registry.engine.teacher_cache import TeacherCache
from makd_registry.features import Feature, FeatureRequest, FeatureSet, TopKLogits

TERMS = """\
  type: sum
  layers: uniform
  terms:
    - {type: attention_kl}
    - {type: hidden_mse}
    - {type: mha_matrix, projections: [q, o], input: teacher}
    - {type: logits_kd, temperature: 2.0}
"""


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "makd-cache"))


def run(path, out, monkeypatch):
    calls = []
    original = FeatureExtractor.run_teacher

    def counting(self, inputs):
        if self.teacher is not None:  # not the teacher's own fine-tuning (no teacher there)
            calls.append(1)
        return original(self, inputs)

    monkeypatch.setattr(FeatureExtractor, "run_teacher", counting)
    summary = Run(path, RunOptions(output=out), Console(quiet=True)).execute()
    return summary, len(calls)


def test_later_epochs_read_the_cache_instead_of_running_the_teacher(tmp_path, monkeypatch):
    plain = write_objective(tmp_path, steps=8, objective=TERMS, teacher_layers=2, student_layers=2)
    text = plain.read_text().replace("train_limit: 96", "train_limit: 32")
    plain.write_text(text)
    cached = tmp_path / "cached.yaml"
    cached.write_text(text.replace("  eval_every: 3\n", "  eval_every: 3\n  teacher_cache: {}\n"))
    a, calls_plain = run(plain, tmp_path / "plain", monkeypatch)
    b, calls_cached = run(cached, tmp_path / "cached", monkeypatch)
    assert calls_plain == 8  # one teacher forward per step
    assert calls_cached == 4  # the first epoch (32 rows / 8) only
    assert (tmp_path / "cached" / "teacher_cache-0.safetensors").is_file()
    la = [
        json.loads(x)["loss"]
        for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
        if '"train"' in x
    ]
    lb = [
        json.loads(x)["loss"]
        for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()
        if '"train"' in x
    ]
    assert la[:4] == lb[:4]  # first epoch: the same computation
    assert lb[4:] == pytest.approx(la[4:], rel=2e-2)  # later: fp16 teacher features


@pytest.mark.parametrize("logits", ["example", "token", "span"])
def test_store_then_assemble_gives_back_the_features_without_padding(tmp_path, logits):
    gen = torch.Generator().manual_seed(0)
    b, t, d, h, v = 3, 6, 8, 2, 11
    lengths = [6, 4, 2]
    shapes = {"example": (b, v), "token": (b, t, v), "span": (b, 2, t)}
    feats = {
        (Feature.HIDDEN, 1): torch.randn(b, t, d, generator=gen),
        (Feature.ATTENTION_QUERY, 1): torch.randn(b, h, t, 4, generator=gen),
        (Feature.ATTENTION_PROBS, 1): torch.rand(b, h, t, t, generator=gen),
        (Feature.LOGITS, None): torch.randn(*shapes[logits], generator=gen),
    }
    inputs = {(Feature.O_PROJ, 1): torch.randn(b, t, d, generator=gen)}
    plan = CapturePlan.from_requests(
        [FeatureRequest("teacher", f, layer) for f, layer in feats]
        + [FeatureRequest("student", Feature.O_PROJ, 0, teacher_input_layer=1)]
    )
    cache = TeacherCache(tmp_path / "c.safetensors", 3, logits=logits)
    cache.store([7, 8, 9], lengths, feats, inputs)
    assert cache.complete and cache.path.is_file()
    got, got_inputs = cache.assemble([9, 7], t, plan, torch.device("cpu"), torch.float32, v)
    for key, value in {**feats, **inputs}.items():
        table = got_inputs if key in inputs else got
        for out_row, row in ((0, 2), (1, 0)):
            expected = value[row].half().float()
            actual = table[key][out_row]
            n = lengths[row]
            if key[0] is Feature.LOGITS and logits == "example":
                torch.testing.assert_close(actual, expected)
            elif key[0] is Feature.LOGITS and logits == "span":
                torch.testing.assert_close(actual[:, :n], expected[:, :n])
                assert (actual[:, n:] == -1e4).all()
            elif key[0] is Feature.ATTENTION_PROBS:
                torch.testing.assert_close(actual[:, :n, :n], expected[:, :n, :n])
                assert (actual[:, n:] == 0).all() and (actual[:, :, n:] == 0).all()
            elif key[0] is Feature.ATTENTION_QUERY:
                torch.testing.assert_close(actual[:, :n], expected[:, :n])
            else:
                torch.testing.assert_close(actual[:n], expected[:n])
                assert (actual[n:] == 0).all()


def test_top_k_keeps_the_largest_teacher_logits(tmp_path):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 20, generator=gen)
    plan = CapturePlan.from_requests([FeatureRequest("teacher", Feature.LOGITS)])
    cache = TeacherCache(tmp_path / "c.safetensors", 2, top_k=5, logits="token")
    cache.store([0, 1], [3, 4], {(Feature.LOGITS, None): logits}, {})
    (got, _) = cache.assemble([1, 0], 4, plan, torch.device("cpu"), torch.float32, 20)
    top = got[(Feature.LOGITS, None)]
    assert isinstance(top, TopKLogits) and top.shape == (2, 4, 20)
    assert top.values.shape == (2, 4, 5) and top.vocab == 20  # never the (B, T, V) table
    for out_row, row, n in ((0, 1, 4), (1, 0, 3)):
        want = logits[row, :n].topk(5, dim=-1)
        torch.testing.assert_close(top.values[out_row, :n], want.values.half().float())
        assert torch.equal(top.indices[out_row, :n], want.indices)
        assert (top.values[out_row, n:] == 0).all()  # padded rows
    dense = FeatureSet(teacher_features=got).teacher(Feature.LOGITS)
    kept = dense[1, :3] > -1e4
    assert (kept.sum(-1) == 5).all()
    assert torch.equal(
        kept.nonzero()[:, 1].reshape(3, 5).sort(-1).values,
        logits[0, :3].topk(5, -1).indices.sort(-1).values,
    )


def test_logits_kd_from_a_top_k_cache_equals_kd_from_its_dense_form():
    """The sparse path (k entries read) gives the loss and gradients that the dense form,
    every other teacher logit at -1e4, gives through the same aspect."""
    from makd_plugins.logits_kd import LogitsKD

    gen = torch.Generator().manual_seed(3)
    z_t = torch.randn(2, 6, 40, generator=gen)
    values, ids = z_t.topk(8, dim=-1)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    top = TopKLogits(values, ids, 40)
    for config in ({"temperature": 2.0}, {"temperature": 1.0, "alpha": 0.3}):
        aspect = LogitsKD(LogitsKD.Config(type="logits_kd", **config))
        grads = []
        for teacher in (top, top.dense()):
            z_s = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(4))
            z_s.requires_grad_(True)
            features = FeatureSet(
                teacher_features={(Feature.LOGITS, None): teacher},
                student_features={(Feature.LOGITS, None): z_s},
                attention_mask=mask,
                labels=torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(5)),
                causal=True,
            )
            loss = aspect.loss(features)
            loss.backward()
            grads.append((loss.detach(), z_s.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0])
        torch.testing.assert_close(grads[0][1], grads[1][1])


def test_a_top_k_cache_keeps_the_rest_of_the_mass_and_logits_kd_uses_it_at_tau_1(tmp_path):
    from makd_plugins.logits_kd import LogitsKD

    from makd_registry.losses import kd_divergence

    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 4, 30, generator=gen) * 2
    plan = CapturePlan.from_requests([FeatureRequest("teacher", Feature.LOGITS)])
    cache = TeacherCache(tmp_path / "c.safetensors", 1, top_k=6, logits="token")
    cache.store([0], [4], {(Feature.LOGITS, None): logits}, {})
    (got, _) = cache.assemble([0], 4, plan, torch.device("cpu"), torch.float32, 30)
    top = got[(Feature.LOGITS, None)]
    p = logits[0].softmax(-1)
    rest = 1 - p.gather(-1, p.topk(6, -1).indices).sum(-1)
    torch.testing.assert_close(top.log_residual[0].exp(), rest, rtol=1e-4, atol=1e-6)
    z_s = torch.randn(1, 4, 30, generator=gen)
    features = FeatureSet(
        teacher_features={(Feature.LOGITS, None): top},
        student_features={(Feature.LOGITS, None): z_s},
        causal=True,
    )
    for tau, residual in ((1.0, top.log_residual), (2.0, None)):
        aspect = LogitsKD(LogitsKD.Config(type="logits_kd", temperature=tau))
        want = kd_divergence(
            z_s,
            top.values,
            temperature=tau,
            teacher_indices=top.indices,
            teacher_log_residual=residual,
        )
        torch.testing.assert_close(aspect.loss(features), want)
