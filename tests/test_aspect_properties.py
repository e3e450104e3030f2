"""Property checks of every built-in aspect (and the example plugin's) via makd_registry.testing.

Each case resolves a real objective node and runs ``check_aspect_invariants`` on random
features over hypothesis-chosen seeds, batch sizes and sequence lengths.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from makd_registry import ModelInfo
from makd_registry.testing import check_aspect_invariants, registry_with, resolve

REGISTRY = registry_with(entrypoints=True)

ENC = ModelInfo(
    num_layers=4, hidden_size=16, num_heads=4, intermediate_size=32, num_labels=3, vocab_size=11
)
ENC_SMALL = ModelInfo(
    num_layers=2, hidden_size=8, num_heads=2, intermediate_size=12, num_labels=3, vocab_size=11
)
DEC = ModelInfo(
    num_layers=4,
    hidden_size=16,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=32,
    vocab_size=23,
    is_decoder=True,
)
DEC_STUDENT = ModelInfo(
    num_layers=2,
    hidden_size=16,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=32,
    vocab_size=23,
    is_decoder=True,
)

# (id, objective node YAML, teacher, student, zero when equal, causal)
CASES = [
    ("attention_kl", "{type: attention_kl, layers: uniform}", ENC, None, True, False),
    (
        "attention_kl-reverse-tau",
        "{type: attention_kl, layers: uniform, direction: reverse, temperature: 2.0}",
        ENC,
        None,
        True,
        False,
    ),
    (
        "attention_kl-probs",
        "{type: attention_kl, layers: uniform, source: probs}",
        ENC,
        None,
        True,
        False,
    ),
    (
        "attention_kl-probs-tau-causal",
        "{type: attention_kl, layers: uniform, source: probs, temperature: 3.0}",
        DEC,
        None,
        True,
        True,
    ),
    (
        "attention_kl-relation-heads",
        "{type: attention_kl, layers: uniform, relation_heads: 2}",
        ENC,
        ENC_SMALL,
        False,
        False,
    ),
    (
        "attention_kl-gqa-causal",
        "{type: attention_kl, layers: uniform, relation_heads: 4}",
        DEC,
        DEC_STUDENT,
        False,
        True,
    ),
    ("hidden_mse", "{type: hidden_mse, layers: uniform, embeddings: true}", ENC, None, True, False),
    (
        "hidden_mse-cosine",
        "{type: hidden_mse, layers: uniform, distance: cosine}",
        ENC,
        None,
        True,
        False,
    ),
    (
        "hidden_mse-linear",
        "{type: hidden_mse, layers: uniform, align: linear}",
        ENC,
        ENC_SMALL,
        False,
        False,
    ),
    (
        "hidden_mse-lowrank-per-pair",
        "{type: hidden_mse, layers: uniform, align: lowrank, "
        "rank: 4, share_alignment: false, reduction: sum}",
        ENC,
        ENC_SMALL,
        False,
        False,
    ),
    ("mha_matrix", "{type: mha_matrix, layers: uniform}", ENC, None, True, False),
    (
        "mha_matrix-gqa",
        "{type: mha_matrix, layers: uniform, projections: [k, v]}",
        DEC,
        None,
        True,
        True,
    ),
    (
        "mha_matrix-relation",
        "{type: mha_matrix, layers: uniform, relation: true, relation_heads: 2}",
        ENC,
        ENC_SMALL,
        False,
        False,
    ),
    (
        "mha_matrix-relation-equal",
        "{type: mha_matrix, layers: uniform, relation: true, "
        "relation_heads: 2, projections: [q, v]}",
        ENC,
        None,
        True,
        False,
    ),
    (
        "mha_matrix-teacher-input",
        "{type: mha_matrix, layers: identity, input: teacher}",
        ENC,
        None,
        True,
        False,
    ),
    (
        "mha_matrix-lowrank",
        "{type: mha_matrix, layers: uniform, align: lowrank, rank: 2}",
        ENC,
        ENC_SMALL,
        False,
        False,
    ),
    ("ffn_matrix", "{type: ffn_matrix, layers: uniform}", ENC, None, True, False),
    (
        "ffn_matrix-gated",
        "{type: ffn_matrix, layers: uniform, parts: [gate, up, intermediate, output]}",
        DEC,
        None,
        True,
        True,
    ),
    (
        "ffn_matrix-relation",
        "{type: ffn_matrix, layers: uniform, relation: true, relation_heads: 4}",
        ENC,
        ENC_SMALL,
        False,
        False,
    ),
    ("logits_kd", "{type: logits_kd, temperature: 2.0}", ENC, None, True, False),
    ("logits_kd-reverse", "{type: logits_kd, divergence: reverse}", ENC, None, True, False),
    ("logits_kd-jsd-lm", "{type: logits_kd, divergence: jsd, beta: 0.3}", DEC, None, True, True),
    (
        "logits_kd-chunked-lm",
        "{type: logits_kd, chunk_size: 4, temperature: 4.0}",
        DEC,
        None,
        True,
        True,
    ),
    ("logits_kd-alpha", "{type: logits_kd, alpha: 0.5}", ENC, None, False, False),
    ("ce", "{type: ce}", ENC, None, False, False),
    ("ce-lm", "{type: ce}", DEC, None, False, True),
    ("seqkd", "{type: seqkd}", ENC, None, False, False),
    ("seqkd-lm", "{type: seqkd, decoding: sample, top_p: 0.9}", DEC, None, False, True),
    ("hidden_cosine-plugin", "{type: hidden_cosine, layers: uniform}", ENC, None, True, False),
]


def build(node: str, teacher: ModelInfo, student: ModelInfo):
    text = (
        f"teacher: {{config: {{num_hidden_layers: {teacher.num_layers}}}}}\n"
        f"student: {{config: {{num_hidden_layers: {student.num_layers}}}}}\n"
        f"objective: {node}\n"
    )
    return resolve(text, REGISTRY).root


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(2, 4), seq=st.integers(3, 7))
def test_aspect_invariants(case, seed, batch, seq):
    _, node, teacher, student, zero_when_equal, causal = case
    student = student or teacher
    aspect = build(node, teacher, student)
    check_aspect_invariants(
        aspect,
        teacher,
        student,
        zero_when_equal=zero_when_equal,
        seed=seed,
        batch=batch,
        seq=seq,
        causal=causal,
    )
