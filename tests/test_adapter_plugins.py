"""A third-party architecture adapter (OPT, as in docs/adapters.md) through the plugin hook."""

from __future__ import annotations

import types

import pytest
import torch
import transformers

from makd_registry import hookimpl
from makd_registry.models import (
    ArchitectureAdapter,
    ArchitectureError,
    LayerLayout,
    make_architecture_registry,
)
from makd_registry.models.students import factorize
from makd_registry.plugins import make_plugin_manager
from makd_registry.testing.adapters import check_adapter_capture, sample_batch


class OPTAdapter(ArchitectureAdapter):
    """OPT decoders (the example of docs/adapters.md)."""

    name = "opt"
    model_types = ("opt",)
    layers_path = "decoder.layers"
    final_norm_path = "decoder.final_layer_norm"
    layout = LayerLayout(
        attention="self_attn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        ffn_in="fc1",
        ffn_act="activation_fn",
        ffn_out="fc2",
    )
    causal = True
    heads = frozenset({"causal_lm"})

    def intermediate_size(self, config):
        return config.ffn_dim


def plugin(*classes, name="makd-opt"):
    module = types.ModuleType(name)

    @hookimpl
    def makd_register_architectures(register):
        for cls in classes:
            register(cls)

    module.makd_register_architectures = makd_register_architectures
    return module


def opt_model():
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=3,
        ffn_dim=48,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return transformers.OPTForCausalLM(config).eval()


def test_a_plugin_adapter_makes_a_new_family_capturable():
    model = opt_model()
    with pytest.raises(ArchitectureError, match="no architecture adapter for model_type 'opt'"):
        make_architecture_registry(make_plugin_manager(entrypoints=False)).for_model(model)
    registry = make_architecture_registry(
        make_plugin_manager([plugin(OPTAdapter)], entrypoints=False)
    )
    check_adapter_capture(model, registry)
    # and students can be factorized with it
    report = factorize(model, registry.for_model(model), rank="full")
    assert len(report.modules) == 3 * 6
    with torch.no_grad():
        model(**sample_batch(120))


def test_two_plugins_claiming_one_model_type_is_an_error_naming_both():
    class Other(OPTAdapter):
        name = "opt2"

    pm = make_plugin_manager(
        [plugin(OPTAdapter, name="first"), plugin(Other, name="second")], entrypoints=False
    )
    registry = make_architecture_registry(pm)
    (failure,) = registry.failures
    assert failure.plugin == "second" and failure.stage == "conflict"
    assert "'opt' is claimed twice" in failure.error and "first" in failure.error
    assert registry.get("opt").name == "opt"


def test_a_builtin_model_type_cannot_be_taken_over():
    class Bert(OPTAdapter):
        name = "mybert"
        model_types = ("bert",)

    registry = make_architecture_registry(make_plugin_manager([plugin(Bert)], entrypoints=False))
    assert registry.get("bert").name == "bert"
    assert "claimed twice" in registry.failures[0].error


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"name": ""}, "has no 'name'"),
        ({"model_types": "opt"}, "model_types must be a non-empty tuple"),
        ({"layout": None}, "layout must be a LayerLayout"),
        ({"heads": frozenset({"seq2seq"})}, "unknown head"),
    ],
)
def test_malformed_adapters_are_reported_against_their_plugin(attrs, message):
    bad = type("Bad", (OPTAdapter,), attrs)
    registry = make_architecture_registry(
        make_plugin_manager([plugin(bad, name="bad-plugin")], entrypoints=False)
    )
    (failure,) = registry.failures
    assert failure.plugin == "bad-plugin" and message in failure.error
    assert "opt" not in registry.model_types()


def test_layer_layouts_are_checked():
    with pytest.raises(ValueError, match="q, k and v paths, or one fused qkv"):
        LayerLayout(attention="a", q="a.q", o="a.o", ffn_in="f", ffn_act="g", ffn_out="h")
    with pytest.raises(ValueError, match="ffn_in, or ffn_gate and ffn_up"):
        LayerLayout(attention="a", qkv="a.qkv", o="a.o", ffn_gate="g", ffn_act="x", ffn_out="h")
