"""Built-in architecture adapters: BERT, RoBERTa, GPT-2 and the Llama family.

Paths follow transformers 5's modeling files. Each adapter is checked against tiny models
built from configs in ``tests/test_capture_adapters.py`` (captured features equal
``output_hidden_states`` and eager ``output_attentions``).
"""

from __future__ import annotations

from typing import Any

from makd_registry import hookimpl
from makd_registry.models import ArchitectureAdapter, ArchitectureError, LayerLayout

_BERT_LAYOUT = LayerLayout(
    attention="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_act="intermediate.intermediate_act_fn",
    ffn_out="output.dense",
)


class BertAdapter(ArchitectureAdapter):
    """BERT encoders: sequence classification, question answering and masked-LM heads."""

    name = "bert"
    model_types = ("bert",)
    layers_path = "encoder.layer"
    layout = _BERT_LAYOUT
    heads = frozenset({"sequence_classification", "question_answering", "masked_lm"})

    def check_config(self, config: Any) -> None:
        kind = getattr(config, "position_embedding_type", "absolute")
        if kind not in (None, "absolute"):
            raise ArchitectureError(
                f"{self.name}: position_embedding_type {kind!r} adds relative-position terms "
                "to the attention scores that captured Q/K do not carry; only 'absolute' is "
                "supported"
            )
        if getattr(config, "is_decoder", False):
            raise ArchitectureError(
                f"{self.name}: decoder BERT (is_decoder: true) is not supported"
            )


class RobertaAdapter(BertAdapter):
    """RoBERTa encoders (BERT's layer layout)."""

    name = "roberta"
    model_types = ("roberta",)


class GPT2Adapter(ArchitectureAdapter):
    """GPT-2 decoders: fused QKV ``Conv1D`` projection, pre-norm with a final ``ln_f``."""

    name = "gpt2"
    model_types = ("gpt2",)
    layers_path = "h"
    final_norm_path = "ln_f"
    layout = LayerLayout(
        attention="attn",
        qkv="attn.c_attn",
        o="attn.c_proj",
        ffn_in="mlp.c_fc",
        ffn_act="mlp.act",
        ffn_out="mlp.c_proj",
    )
    causal = True
    heads = frozenset({"causal_lm", "sequence_classification", "question_answering"})

    def check_config(self, config: Any) -> None:
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ArchitectureError(
                f"{self.name}: scale_attn_by_inverse_layer_idx gives every layer its own "
                "attention scale, which makd does not support"
            )
        if getattr(config, "add_cross_attention", False):
            raise ArchitectureError(f"{self.name}: cross-attention GPT-2 is not supported")

    def intermediate_size(self, config: Any) -> int:
        inner = getattr(config, "n_inner", None)
        return int(inner) if inner else 4 * int(config.hidden_size)

    def attention_scale(self, config: Any) -> float:
        return super().attention_scale(config) if config.scale_attn_weights else 1.0


class LlamaAdapter(ArchitectureAdapter):
    """Llama-family decoders (Llama, Qwen2, Mistral): RoPE, grouped-query attention, gated
    SiLU MLP, RMSNorm before each block and after the last."""

    name = "llama"
    model_types = ("llama", "qwen2", "mistral")
    layers_path = "layers"
    final_norm_path = "norm"
    layout = LayerLayout(
        attention="self_attn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        ffn_gate="mlp.gate_proj",
        ffn_up="mlp.up_proj",
        ffn_act="mlp.act_fn",
        ffn_out="mlp.down_proj",
    )
    causal = True
    rope = True
    heads = frozenset({"causal_lm", "sequence_classification", "question_answering"})


@hookimpl
def makd_register_architectures(register):
    register(BertAdapter)
    register(RobertaAdapter)
    register(GPT2Adapter)
    register(LlamaAdapter)
