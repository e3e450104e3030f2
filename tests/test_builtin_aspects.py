"""Golden values of the built-in aspects against direct computations, and their errors."""

from __future__ import annotations

import math

import pytest
import torch

from makd_registry import Feature, FeatureSet, ModelInfo
from makd_registry.testing import diagnostics, make_feature_set, registry_with, resolve

REGISTRY = registry_with()
ENC = ModelInfo(
    num_layers=4, hidden_size=16, num_heads=4, intermediate_size=32, num_labels=3, vocab_size=11
)
SMALL = ModelInfo(
    num_layers=2, hidden_size=8, num_heads=2, intermediate_size=12, num_labels=3, vocab_size=11
)


def node(text: str, teacher: int = 4, student: int = 2):
    return resolve(
        f"teacher: {{config: {{num_hidden_layers: {teacher}}}}}\n"
        f"student: {{config: {{num_hidden_layers: {student}}}}}\nobjective: {text}\n",
        REGISTRY,
    ).root


def direct_attention(q, k, mask):
    """Row-wise softmax(q kᵀ/√d) over valid keys, with explicit loops: (H, T, T) per example."""
    h, t, d = q.shape
    out = torch.zeros(h, t, t, dtype=torch.float64)
    for head in range(h):
        for i in range(t):
            scores = [
                float(q[head, i] @ k[head, j]) / math.sqrt(d) if mask[j] else None for j in range(t)
            ]
            m = max(s for s in scores if s is not None)
            z = sum(math.exp(s - m) for s in scores if s is not None)
            for j, s in enumerate(scores):
                out[head, i, j] = 0.0 if s is None else math.exp(s - m) / z
    return out


def direct_kl_rows(p, q, mask):
    """Mean over heads and valid queries of KL(p‖q) over valid keys."""
    total, rows = 0.0, 0
    for head in range(p.shape[0]):
        for i in range(p.shape[1]):
            if not mask[i]:
                continue
            rows += 1
            total += sum(
                float(p[head, i, j]) * (math.log(p[head, i, j]) - math.log(q[head, i, j]))
                for j in range(p.shape[2])
                if mask[j]
            )
    return total, rows


def test_attention_kl_matches_direct_computation():
    aspect = node("{type: attention_kl, layers: uniform}")
    f = make_feature_set(aspect, ENC, seed=4, batch=2, seq=5, lengths=[5, 3])
    expected = 0.0
    for s, t in aspect.pairs:
        total, rows = 0.0, 0
        for b in range(2):
            m = f.attention_mask[b].bool()
            a_t = direct_attention(
                f.teacher(Feature.ATTENTION_QUERY, t)[b].double(),
                f.teacher(Feature.ATTENTION_KEY, t)[b].double(),
                m,
            )
            a_s = direct_attention(
                f.student(Feature.ATTENTION_QUERY, s)[b].double(),
                f.student(Feature.ATTENTION_KEY, s)[b].double(),
                m,
            )
            kl, n = direct_kl_rows(a_t, a_s, m)
            total, rows = total + kl, rows + n
        expected += total / rows
    expected /= len(aspect.pairs)
    assert aspect.loss(f).item() == pytest.approx(expected, rel=1e-5)


def test_attention_kl_relation_heads_split_concatenated_heads():
    aspect = node("{type: attention_kl, layers: [[1, 3]], relation_heads: 2}")
    aspect.build(ENC, SMALL)
    f = make_feature_set(aspect, ENC, SMALL, seed=1, batch=1, seq=4, lengths=[4])
    m = torch.ones(4, dtype=torch.bool)

    def relation(q, k):  # (1, H, T, d) → concatenate heads → 2 relation heads
        qc = q[0].transpose(0, 1).reshape(4, -1)
        kc = k[0].transpose(0, 1).reshape(4, -1)
        w = qc.shape[1] // 2
        qs = torch.stack([qc[:, :w], qc[:, w:]])
        ks = torch.stack([kc[:, :w], kc[:, w:]])
        return direct_attention(qs.double(), ks.double(), m)

    a_t = relation(f.teacher(Feature.ATTENTION_QUERY, 3), f.teacher(Feature.ATTENTION_KEY, 3))
    a_s = relation(f.student(Feature.ATTENTION_QUERY, 1), f.student(Feature.ATTENTION_KEY, 1))
    total, rows = direct_kl_rows(a_t, a_s, m)
    assert aspect.loss(f).item() == pytest.approx(total / rows, rel=1e-5)


def test_hidden_mse_linear_alignment_is_a_trainable_module():
    aspect = node("{type: hidden_mse, layers: uniform, align: linear}")
    aspect.build(ENC, SMALL)
    ((key, module),) = aspect.modules().items()
    assert key == "hidden" and tuple(module.weight.shape) == (16, 8)
    f = make_feature_set(aspect, ENC, SMALL, seed=2, batch=2, seq=4, lengths=[4, 2])
    mask = f.attention_mask.bool()
    expected = 0.0
    for s, t in aspect.pairs:
        diff = module(f.student(Feature.HIDDEN, s)) - f.teacher(Feature.HIDDEN, t)
        expected += (diff[mask] ** 2).mean().item()
    assert aspect.loss(f).item() == pytest.approx(expected / 2, rel=1e-5)
    aspect.loss(f).backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_unshared_lowrank_alignment_has_one_map_per_pair():
    aspect = node(
        "{type: hidden_mse, layers: uniform, align: lowrank, rank: 3, share_alignment: false}"
    )
    aspect.build(ENC, SMALL)
    modules = aspect.modules()
    assert sorted(modules) == ["hidden.s0_t1", "hidden.s1_t3"]
    assert all(m.rank == 3 for m in modules.values())


def test_logits_kd_alpha_mixes_tau_squared_kl_and_ce():
    aspect = node("{type: logits_kd, temperature: 2.0, alpha: 0.25}")
    z_s, z_t = torch.randn(3, 5), torch.randn(3, 5)
    labels = torch.tensor([0, 4, 2])
    f = FeatureSet(
        teacher_features={(Feature.LOGITS, None): z_t},
        student_features={(Feature.LOGITS, None): z_s},
        labels=labels,
    )
    p_t = torch.softmax(z_t / 2, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(z_s / 2, -1))).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(z_s, labels)
    assert aspect.loss(f).item() == pytest.approx((0.75 * 4 * kl + 0.25 * ce).item(), rel=1e-5)


def test_seqkd_lm_is_next_token_ce_on_generated_tokens():
    aspect = node("{type: seqkd}")
    logits = torch.randn(2, 4, 7)
    generated = torch.tensor([[-100, 3, 5, 1], [-100, -100, 2, 6]])  # prompt positions: -100
    mask = torch.ones(2, 4, dtype=torch.long)
    f = FeatureSet(
        teacher_features={(Feature.GENERATED, None): generated},
        student_features={(Feature.LOGITS, None): logits},
        attention_mask=mask,
        causal=True,
    )
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), generated[:, 1:].reshape(-1), ignore_index=-100
    )
    assert aspect.loss(f).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mha_matrix_teacher_input_uses_student_matrix_on_teacher_input():
    aspect = node(
        "{type: mha_matrix, layers: identity, input: teacher, projections: [q]}",
        teacher=2,
        student=2,
    )
    requests = [r for r in aspect.requires() if r.side == "student"]
    assert requests and all(r.on_teacher_input for r in requests)
    f = make_feature_set(aspect, SMALL, seed=0, batch=2, seq=3)
    assert f.student_on_teacher_input and not f.student_features
    shifted = {k: v + 1.0 for k, v in f.student_on_teacher_input.items()}
    assert all(len(k) == 3 for k in shifted)  # (feature, student layer, teacher layer)
    f.student_on_teacher_input = {k: f.teacher(k[0], k[2]) for k in shifted}
    assert aspect.loss(f).item() == pytest.approx(0.0, abs=1e-7)
    f.student_on_teacher_input = {k: f.teacher(k[0], k[2]) + 1.0 for k in shifted}
    assert aspect.loss(f).item() == pytest.approx(1.0, rel=1e-6)


def test_stages_switch_objective_at_the_step_budget():
    aspect = node(
        "{type: stages, stages: [{name: a, steps: 10, objective: {type: ce}}, "
        "{name: b, objective: {type: logits_kd, weight: 3}}]}"
    )
    assert aspect.boundaries() == [(0, 10), (10, None)]
    assert [aspect.stage_at(s) for s in (0, 9, 10, 10_000)] == [0, 0, 1, 1]
    z_s, z_t = torch.randn(2, 3), torch.randn(2, 3)
    f = FeatureSet(
        teacher_features={(Feature.LOGITS, None): z_t},
        student_features={(Feature.LOGITS, None): z_s},
        labels=torch.tensor([0, 1]),
    )
    ce = aspect.children[0].loss(f)
    kd = aspect.children[1].loss(f)
    f.step = 9
    assert aspect.loss(f).item() == pytest.approx(ce.item())
    f.step = 10
    assert aspect.loss(f).item() == pytest.approx(3 * kd.item())
    assert [c.path for c in aspect.children] == ["stages/a", "stages/b"]


def test_sum_skips_zero_weight_terms():
    aspect = node("{type: sum, terms: [{type: ce, weight: 0}, {type: logits_kd, weight: 2}]}")
    z = torch.randn(2, 3)
    f = FeatureSet(
        teacher_features={(Feature.LOGITS, None): z},
        student_features={(Feature.LOGITS, None): z + 1},
    )  # no labels: ce would fail
    assert aspect.loss(f).item() == pytest.approx(2 * aspect.children[1].loss(f).item())


@pytest.mark.parametrize(
    "text, teacher, student, message",
    [
        ("{type: attention_kl, layers: uniform}", ENC, SMALL, "set relation_heads"),
        ("{type: attention_kl, layers: uniform, relation_heads: 3}", ENC, SMALL, "does not divide"),
        ("{type: hidden_mse, layers: uniform}", ENC, SMALL, "align: identity needs equal widths"),
        (
            "{type: hidden_mse, layers: uniform, align: lowrank, rank: 9}",
            ENC,
            SMALL,
            "rank 9 exceeds",
        ),
        (
            "{type: mha_matrix, layers: uniform, input: teacher, align: linear}",
            ENC,
            SMALL,
            "input: teacher needs equal input widths",
        ),
        (
            "{type: ffn_matrix, layers: uniform, relation: true, relation_heads: 5}",
            ENC,
            SMALL,
            "does not divide",
        ),
    ],
)
def test_build_rejects_incompatible_models(text, teacher, student, message):
    aspect = node(text)
    with pytest.raises(ValueError, match=message):
        aspect.build(teacher, student)


@pytest.mark.parametrize(
    "text, path, message",
    [
        (
            "{type: hidden_mse, layers: last, align: lowrank}",
            "objective.rank",
            "align: lowrank needs 'rank'",
        ),
        ("{type: hidden_mse, layers: last, rank: 4}", "objective.rank", "only applies"),
        (
            "{type: mha_matrix, layers: last, relation: true, align: linear}",
            "objective.align",
            "takes no alignment",
        ),
        (
            "{type: mha_matrix, layers: last, projections: [q, q]}",
            "objective.projections[1]",
            "listed twice",
        ),
        (
            "{type: mha_matrix, layers: last, projections: [x]}",
            "objective.projections[0]",
            "Input should be 'q', 'k', 'v' or 'o'",
        ),
        ("{type: logits_kd, beta: 0.3}", "objective.beta", "only applies to divergence: jsd"),
        ("{type: logits_kd, divergence: jsd, beta: 1.0}", "objective.beta", "less than 1"),
        ("{type: seqkd, num_beams: 4}", "objective.num_beams", "only applies to decoding: beam"),
        ("{type: seqkd, top_p: 0.5}", "objective.top_p", "only applies to decoding: sample"),
        (
            "{type: attention_kl, layers: last, source: probs, relation_heads: 2}",
            "objective.relation_heads",
            "needs source: qk",
        ),
        ("{type: logits_kd, layers: last}", "objective.layers", "unknown key 'layers'"),
    ],
)
def test_aspect_options_are_validated_with_locations(text, path, message):
    (diag,) = diagnostics(f"objective: {text}", REGISTRY)
    assert diag.path == path
    assert message in diag.message


@pytest.mark.parametrize("order", ["kd-first", "ce-first"])
@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.0), (2.0, 0.25)])
def test_logits_kd_and_ce_share_one_pass_over_the_logits(monkeypatch, order, temperature, alpha):
    """`ce` after `logits_kd` reads the CE of logits_kd's pass (no second pass over the
    logits); the summed loss and its gradient equal the two computed separately."""
    import torch
    from makd_plugins.logits_kd import CrossEntropy, LogitsKD

    from makd_registry import Feature, FeatureSet, losses

    gen = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 6, 30, generator=gen)
    labels = torch.randint(0, 30, (2, 6), generator=gen)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    start = torch.randn(2, 6, 30, generator=gen)

    def features(z_s):
        return FeatureSet(
            teacher_features={(Feature.LOGITS, None): z_t},
            student_features={(Feature.LOGITS, None): z_s},
            attention_mask=mask,
            labels=labels,
            causal=True,
        )

    ref_s = start.clone().requires_grad_(True)
    kd = losses.kd_divergence(ref_s, z_t, temperature=temperature, mask=mask)
    ce = losses.next_token_cross_entropy(ref_s, labels, mask)
    want = (1 - alpha) * kd + alpha * ce + ce
    want.backward()

    kd_aspect = LogitsKD(LogitsKD.Config(type="logits_kd", temperature=temperature, alpha=alpha))
    ce_aspect = CrossEntropy(CrossEntropy.Config(type="ce"))
    calls = {"n": 0}
    real = losses.next_token_cross_entropy

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "next_token_cross_entropy", counted)
    z_s = start.clone().requires_grad_(True)
    fs = features(z_s)
    aspects = [kd_aspect, ce_aspect] if order == "kd-first" else [ce_aspect, kd_aspect]
    got = sum(a.loss(fs) for a in aspects)
    got.backward()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_s.grad, ref_s.grad, rtol=1e-5, atol=1e-7)
    fused = order == "kd-first" and (temperature == 1.0 or alpha > 0)
    assert calls["n"] == (0 if fused else 1)
