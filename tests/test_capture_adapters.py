"""Feature capture on tiny models of every built-in architecture (no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from makd_registry.capture import CapturePlan
from makd_registry.capture.extractor import FeatureExtractor
from makd_registry.capture.hooks import ModelCapture
from makd_registry.features import Feature, FeatureRequest
from makd_registry.models import ArchitectureError, make_architecture_registry
from makd_registry.testing.adapters import check_adapter_capture, sample_batch, tiny_config

FAMILIES = ["bert", "roberta", "gpt2", "llama", "qwen2", "mistral"]
HEADS = {
    "bert": [
        "AutoModelForSequenceClassification",
        "AutoModelForQuestionAnswering",
        "AutoModelForMaskedLM",
    ],
    "roberta": [
        "AutoModelForSequenceClassification",
        "AutoModelForQuestionAnswering",
        "AutoModelForMaskedLM",
    ],
    "gpt2": ["AutoModelForCausalLM", "AutoModelForSequenceClassification"],
    "llama": ["AutoModelForCausalLM", "AutoModelForSequenceClassification"],
    "qwen2": ["AutoModelForCausalLM"],
    "mistral": ["AutoModelForCausalLM"],
}


@pytest.fixture(scope="module")
def registry():
    return make_architecture_registry()


def build(family: str, head: str = "AutoModelForCausalLM", **overrides):
    torch.manual_seed(0)
    config = tiny_config(family, **overrides)
    return getattr(transformers, head).from_config(config).eval()


@pytest.mark.parametrize(
    ("family", "head"), [(f, h) for f in FAMILIES for h in HEADS[f]], ids=lambda x: str(x)
)
def test_captured_features_equal_transformers_outputs(registry, family, head):
    model = build(family, head)
    assert model.config._attn_implementation == "sdpa"  # capture does not need eager
    check_adapter_capture(model, registry)
    assert model.config._attn_implementation == "sdpa"


def test_gqa_and_rope_are_really_exercised(registry):
    model = build("llama")
    info = registry.for_model(model).model_info(model.config)
    assert info.num_kv_heads == 2 < info.num_heads == 4
    feats = check_adapter_capture(model, registry)
    q_proj = feats[(Feature.Q_PROJ, 1)]
    b, t, _ = q_proj.shape
    unrotated = q_proj.view(b, t, 4, -1).transpose(1, 2)
    # RoPE changes every position except the first: the captured query is post-rotation
    assert not torch.allclose(feats[(Feature.ATTENTION_QUERY, 1)][:, :, 1:], unrotated[:, :, 1:])
    assert feats[(Feature.ATTENTION_KEY, 1)].shape[1] == 2


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_only_the_planned_modules_are_hooked_and_hooks_are_removed(registry, family):
    model = build(
        family, "AutoModelForSequenceClassification" if family == "bert" else "AutoModelForCausalLM"
    )
    adapter = registry.for_model(model)
    plan = CapturePlan.from_requests(
        [FeatureRequest("student", Feature.HIDDEN, 1), FeatureRequest("student", Feature.LOGITS)]
    )
    with ModelCapture(model, adapter, adapter.model_info(model.config), plan.student) as cap:
        hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        assert len(cap._handles) == 1
    assert hooked == [adapter.layers_prefix(model) + ".1"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_last_hidden_state_of_pre_norm_models_is_the_final_norm_output(registry):
    model = build("gpt2")
    adapter = registry.for_model(model)
    plan = CapturePlan.from_requests([FeatureRequest("student", Feature.HIDDEN, 2)])
    batch = sample_batch(120)
    with torch.no_grad(), FeatureExtractor(plan, model, adapter) as fx:
        feats, out = fx(batch)
        ref = model(**batch, output_hidden_states=True)
    torch.testing.assert_close(feats.student(Feature.HIDDEN, 2), ref.hidden_states[-1])


def test_teacher_runs_without_gradients_and_student_with_them(registry):
    teacher = build("bert", "AutoModelForSequenceClassification")
    student = copy.deepcopy(teacher).train()
    adapter = registry.for_model(teacher)
    requests = [
        FeatureRequest(side, kind, 1)
        for side in ("teacher", "student")
        for kind in (Feature.HIDDEN, Feature.ATTENTION_QUERY, Feature.ATTENTION_KEY)
    ] + [FeatureRequest("teacher", Feature.LOGITS), FeatureRequest("student", Feature.LOGITS)]
    plan = CapturePlan.from_requests(requests)
    with FeatureExtractor(plan, student, adapter, teacher, adapter) as fx:
        feats, _ = fx(sample_batch(120))
    assert all(not t.requires_grad for t in feats.teacher_features.values())
    assert all(t.requires_grad for t in feats.student_features.values())
    assert feats.teacher_info.num_layers == 3 and not feats.causal


def test_features_stay_in_the_model_dtype(registry):
    model = build("llama").to(torch.bfloat16)
    adapter = registry.for_model(model)
    requests = [
        FeatureRequest("student", k, 0)
        for k in (Feature.HIDDEN, Feature.ATTENTION_QUERY, Feature.ATTENTION_PROBS, Feature.FFN_UP)
    ]
    with (
        torch.no_grad(),
        FeatureExtractor(CapturePlan.from_requests(requests), model, adapter) as fx,
    ):
        feats, _ = fx(sample_batch(120))
    assert {t.dtype for t in feats.student_features.values()} == {torch.bfloat16}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_student_matrices_on_teacher_inputs(registry, family):
    """With a student identical to the teacher, its layer-2 modules applied to the teacher's
    layer-2 module inputs give exactly the teacher's module outputs, with gradients; its
    layer-0 modules on the same inputs give something else."""
    head = "AutoModelForSequenceClassification" if family == "bert" else "AutoModelForCausalLM"
    teacher = build(family, head)
    student = copy.deepcopy(teacher)
    adapter = registry.for_model(teacher)
    kinds = [
        Feature.Q_PROJ,
        Feature.K_PROJ,
        Feature.V_PROJ,
        Feature.O_PROJ,
        Feature.FFN_INTERMEDIATE,
        Feature.FFN_OUTPUT,
    ]
    if adapter.layout.gated:
        kinds += [Feature.FFN_GATE, Feature.FFN_UP]
    requests = []
    for kind in kinds:
        requests.append(FeatureRequest("teacher", kind, 2))
        requests.append(FeatureRequest("student", kind, 2, teacher_input_layer=2))
        requests.append(FeatureRequest("student", kind, 0, teacher_input_layer=2))
    with FeatureExtractor(
        CapturePlan.from_requests(requests), student, adapter, teacher, adapter
    ) as fx:
        feats, _ = fx(sample_batch(120))
    for kind in kinds:
        got = feats.student(kind, 2, teacher_input_layer=2)
        assert got.requires_grad
        torch.testing.assert_close(got, feats.teacher(kind, 2), atol=1e-6, rtol=0)
        other = feats.student(kind, 0, teacher_input_layer=2)
        assert other.shape == got.shape and not torch.allclose(other, got)


def test_plan_problems_are_reported_before_running(registry):
    bert = build("bert", "AutoModelForSequenceClassification")
    adapter = registry.for_model(bert)
    plan = CapturePlan.from_requests(
        [
            FeatureRequest("student", Feature.HIDDEN, 7),
            FeatureRequest("student", Feature.FFN_GATE, 0),
        ]
    )
    with pytest.raises(ArchitectureError) as info:
        FeatureExtractor(plan, bert, adapter)
    text = str(info.value)
    assert "student layer 7 does not exist" in text and "(0..2)" in text
    assert "no gated MLP" in text


def test_unknown_architecture_lists_supported_ones_and_how_to_add_one(registry):
    config = transformers.AutoConfig.for_model(
        "opt", hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, vocab_size=50
    )
    with pytest.raises(ArchitectureError) as info:
        registry.for_config(config)
    text = str(info.value)
    assert "'opt'" in text
    assert "bert, gpt2, llama, mistral, qwen2, roberta" in text
    assert "makd_register_architectures" in text and "docs/adapters.md" in text


def test_sliding_window_longer_than_the_batch_is_refused(registry):
    model = build("mistral", sliding_window=4)
    adapter = registry.for_model(model)
    plan = CapturePlan.from_requests([FeatureRequest("student", Feature.ATTENTION_QUERY, 0)])
    with torch.no_grad(), FeatureExtractor(plan, model, adapter) as fx:
        with pytest.raises(ArchitectureError, match="sliding-window attention \\(window 4\\)"):
            fx(sample_batch(120, seq=9))


def test_qa_logits_are_start_and_end_stacked(registry):
    model = build("bert", "AutoModelForQuestionAnswering")
    adapter = registry.for_model(model)
    plan = CapturePlan.from_requests([FeatureRequest("student", Feature.LOGITS)])
    batch = sample_batch(120)
    with torch.no_grad(), FeatureExtractor(plan, model, adapter) as fx:
        feats, out = fx(batch)
    logits = feats.student(Feature.LOGITS)
    assert logits.shape == (3, 2, 9)
    torch.testing.assert_close(logits[:, 0], out.start_logits)
    torch.testing.assert_close(logits[:, 1], out.end_logits)


def test_gpt2_per_layer_attention_scaling_is_refused(registry):
    config = tiny_config("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ArchitectureError, match="scale_attn_by_inverse_layer_idx"):
        registry.for_config(config)


def test_every_feature_kind_has_exactly_one_source():
    """One table says where each kind is captured; the data-carried kinds are listed apart."""
    from makd_registry.capture.extractor import BATCH_COLUMNS
    from makd_registry.capture.hooks import CAPTURED_AT
    from makd_registry.features import Feature

    for feature in Feature:
        assert (feature in CAPTURED_AT) != (feature in BATCH_COLUMNS), feature
