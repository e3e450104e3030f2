"""Checks for architecture adapters, for makd's tests and for third-party adapter authors.

:func:`check_adapter_capture` runs a model under makd's capture (with the model's own
attention implementation, e.g. SDPA) and compares every layer with transformers' own
outputs: hidden states and embeddings with ``output_hidden_states`` of the same forward,
and attention with eager ``output_attentions``: the probabilities makd computes from the
captured Q/K (RoPE applied, GQA heads expanded), the attention output rebuilt from the
captured V through the output projection, and the FFN intermediate and output. It also checks
that the hooks are gone afterwards and that capture does not change the logits::

    from makd_registry.testing.adapters import check_adapter_capture

    def test_my_adapter():
        model = MyModelForCausalLM(tiny_config)
        check_adapter_capture(model, registry_with_my_adapter)
"""

from __future__ import annotations

from typing import Any

import torch

from ..capture import CapturePlan
from ..capture.extractor import FeatureExtractor
from ..features import Feature, FeatureRequest
from ..losses import attention_log_probs

#: tiny configs of every built-in family: ``tiny_config(name, **overrides)``
TINY: dict[str, dict[str, Any]] = {
    "bert": dict(
        model_type="bert",
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    ),
    "roberta": dict(
        model_type="roberta",
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=70,
        pad_token_id=1,
    ),
    "gpt2": dict(
        model_type="gpt2",
        vocab_size=120,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    ),
    "llama": dict(
        model_type="llama",
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        pad_token_id=0,
    ),
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        pad_token_id=0,
    ),
    "mistral": dict(
        model_type="mistral",
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=48,
        max_position_embeddings=64,
        sliding_window=None,
        pad_token_id=0,
    ),
}


def tiny_config(name: str, **overrides: Any) -> Any:
    """A transformers config of a tiny model of family ``name`` (see :data:`TINY`)."""
    import transformers

    values = {**TINY[name], **overrides}
    model_type = values.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **values)


def sample_batch(
    vocab_size: int, batch: int = 3, seq: int = 9, *, seed: int = 0, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids with right padding of different lengths (row 0 unpadded)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq - 2 * row :] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def every_feature(num_layers: int, gated: bool) -> list[FeatureRequest]:
    kinds = [
        Feature.HIDDEN,
        Feature.ATTENTION_QUERY,
        Feature.ATTENTION_KEY,
        Feature.ATTENTION_VALUE,
        Feature.ATTENTION_PROBS,
        Feature.Q_PROJ,
        Feature.K_PROJ,
        Feature.V_PROJ,
        Feature.O_PROJ,
        Feature.FFN_INTERMEDIATE,
        Feature.FFN_OUTPUT,
    ]
    if gated:
        kinds += [Feature.FFN_GATE, Feature.FFN_UP]
    out = [FeatureRequest("student", k, layer) for k in kinds for layer in range(num_layers)]
    return out + [
        FeatureRequest("student", Feature.EMBEDDINGS),
        FeatureRequest("student", Feature.LOGITS),
    ]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def check_adapter_capture(
    model: Any, registry: Any, *, atol: float = 1e-5, batch: dict[str, Any] | None = None
) -> dict[Any, torch.Tensor]:
    """Assert that makd's capture of ``model`` agrees with transformers' own outputs.

    ``model`` is a transformers model (fp32, any attention implementation); ``registry`` an
    architecture registry that has its adapter. Returns the captured features.
    """
    adapter = registry.for_model(model)
    info = adapter.model_info(model.config)
    model = model.eval()
    batch = batch or sample_batch(model.config.vocab_size)
    mask = batch["attention_mask"]
    plan = CapturePlan.from_requests(every_feature(info.num_layers, adapter.layout.gated))

    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True)  # same attention implementation
        before = _hook_count(model)  # transformers may keep hooks of its own
        with FeatureExtractor(plan, model, adapter) as fx:
            feats, captured_out = fx(batch)
            assert _hook_count(model) > before, "no hooks were installed"
        assert _hook_count(model) == before, "capture hooks were left on the model"
        torch.testing.assert_close(
            _logits(captured_out),
            _logits(plain),
            atol=0,
            rtol=0,
            msg="capture changed the model's output",
        )
        implementation = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            ref = model(**batch, output_hidden_states=True, output_attentions=True)
        finally:
            model.set_attn_implementation(implementation)

    f = feats.student_features
    valid_rows = mask.bool()[:, None, :, None]
    torch.testing.assert_close(
        f[(Feature.EMBEDDINGS, None)], plain.hidden_states[0], atol=atol, rtol=0
    )
    for layer in range(info.num_layers):
        block = adapter.layers(model)[layer]
        torch.testing.assert_close(
            f[(Feature.HIDDEN, layer)],
            plain.hidden_states[layer + 1],
            atol=atol,
            rtol=0,
            msg=lambda m, i=layer: f"hidden state of layer {i}: {m}",
        )
        eager = ref.attentions[layer]
        probs = f[(Feature.ATTENTION_PROBS, layer)]
        torch.testing.assert_close(
            torch.where(valid_rows, probs, 0),
            torch.where(valid_rows, eager, 0),
            atol=atol,
            rtol=0,
            msg=lambda m, i=layer: f"attention probs of layer {i}: {m}",
        )
        q, k = f[(Feature.ATTENTION_QUERY, layer)], f[(Feature.ATTENTION_KEY, layer)]
        from_qk = attention_log_probs(
            q, k, scale=info.attention_scale, attention_mask=mask, causal=adapter.causal
        ).exp()
        torch.testing.assert_close(
            torch.where(valid_rows, from_qk, 0),
            torch.where(valid_rows, eager, 0),
            atol=atol,
            rtol=0,
            msg=lambda m, i=layer: f"attention from Q/K, layer {i}: {m}",
        )
        # attention output rebuilt from the captured V and eager probabilities → O_PROJ
        v = f[(Feature.ATTENTION_VALUE, layer)]
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        context = (eager @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        o_proj = adapter.part(block, "o")(context)
        rows = mask.bool()[..., None]
        torch.testing.assert_close(
            torch.where(rows, f[(Feature.O_PROJ, layer)], 0),
            torch.where(rows, o_proj, 0),
            atol=atol,
            rtol=0,
            msg=lambda m, i=layer: f"O projection of layer {i}: {m}",
        )
        inter = f[(Feature.FFN_INTERMEDIATE, layer)]
        torch.testing.assert_close(
            adapter.part(block, "ffn_out")(inter),
            f[(Feature.FFN_OUTPUT, layer)],
            atol=atol,
            rtol=0,
        )
        if adapter.layout.gated:
            act = adapter.part(block, "ffn_act")
            torch.testing.assert_close(
                act(f[(Feature.FFN_GATE, layer)]) * f[(Feature.FFN_UP, layer)],
                inter,
                atol=atol,
                rtol=0,
            )
        d = info.head_dim or info.hidden_size // info.num_heads
        b, t = mask.shape
        assert f[(Feature.Q_PROJ, layer)].shape == (b, t, info.num_heads * d)
        assert f[(Feature.K_PROJ, layer)].shape == (b, t, (info.num_kv_heads or info.num_heads) * d)
    return f


def _logits(outputs: Any) -> torch.Tensor:
    from ..capture.hooks import logits_of

    return logits_of(outputs)
