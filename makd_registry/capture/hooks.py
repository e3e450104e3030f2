"""Forward hooks on exactly the modules a :class:`SidePlan` needs.

:class:`ModelCapture` installs one hook per (module, input-or-output) that the plan needs,
records the tensors of one forward, and turns them into features: heads split, RoPE applied
where the model applies it, attention probabilities computed from the captured Q and K (so
the model keeps running SDPA or flash attention). Hooks never change a module's output, and
:meth:`ModelCapture.remove` (or leaving the ``with`` block) takes every one of them away.

Tensors stay in the dtype the model runs in; only the attention probabilities are computed
in fp32 (then cast back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..features import Feature, ModelInfo
from ..models.adapter import ArchitectureAdapter, ArchitectureError
from .plan import INPUT_ROLE, OUTPUT_ROLE, SidePlan

# raw capture keys: ("out", role, layer) | ("in", role, layer) | ("layer_out", layer)
#                   | ("layer_in", layer) | ("final",) | ("attn_call", layer)
RawKey = tuple[Any, ...]


class ModelCapture:
    """Capture the features of ``plan`` from ``model`` (a transformers model).

    Use as a context manager around any number of forwards; call :meth:`features` after
    each forward to collect that forward's tensors::

        with ModelCapture(model, adapter, info, plan) as cap:
            out = model(**inputs)
            feats = cap.features(out, inputs["attention_mask"])
    """

    def __init__(
        self, model: nn.Module, adapter: ArchitectureAdapter, info: ModelInfo, plan: SidePlan
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.info = info
        self.plan = plan
        self.layers = adapter.layers(model)
        self.final_norm = adapter.final_norm(model)
        self._store: dict[RawKey, Any] = {}
        self._handles: list[Any] = []
        self._features = sorted(plan.features, key=str)  # fixed order, computed once
        self.recording = True
        #: how a block's parameters are reached outside the model's forward (see
        #: :meth:`apply_module`): ``block_access(block)`` is called first; a sharded model
        #: (FSDP2) gathers the block's parameters there. None: they are ordinary tensors.
        self.block_access: Callable[[nn.Module], None] | None = None

    # -- which raw tensors -------------------------------------------------------------

    def _qkv_role(self, role: str) -> str:
        return "qkv" if self.adapter.layout.fused_qkv and role in ("q", "k", "v") else role

    def _ffn_input_role(self) -> str:
        return "ffn_gate" if self.adapter.layout.gated else "ffn_in"

    def raw_needs(self) -> set[RawKey]:
        """The raw module inputs/outputs this plan needs (:data:`CAPTURED_AT`)."""
        need: set[RawKey] = set()
        for feature, layer in self.plan.features:
            need.update(CAPTURED_AT[feature].needs(self, layer))
        for feature, layer in self.plan.module_inputs:
            need.add(self._module_input_key(feature, layer))
        return need

    def _module_input_key(self, feature: Feature, layer: int) -> RawKey:
        role = INPUT_ROLE[feature]
        role = self._ffn_input_role() if role in ("ffn_in", "ffn_gate", "ffn_up") else role
        return ("in", self._qkv_role(role), layer)

    def _hidden_key(self, layer: int | None) -> RawKey:
        assert layer is not None
        final = layer == len(self.layers) - 1 and self.final_norm is not None
        return ("final",) if final else ("layer_out", layer)

    def _qk_keys(self, layer: int | None) -> list[RawKey]:
        """Queries and keys are captured (and rotated) together."""
        keys: list[RawKey] = [("out", self._qkv_role(r), layer) for r in ("q", "k")]
        return keys + ([("attn_call", layer)] if self.adapter.rope else [])

    # -- hooks -------------------------------------------------------------------------

    def install(self) -> ModelCapture:
        if self._handles:
            return self
        for key in sorted(self.raw_needs(), key=str):
            kind = key[0]
            if kind == "final":
                assert self.final_norm is not None
                self._hook_output(self.final_norm, key)
            elif kind == "layer_out":
                self._hook_output(self.layers[key[1]], key)
            elif kind == "layer_in":
                self._hook_input(self.layers[key[1]], key)
            elif kind == "attn_call":
                self._hook_call(self.adapter.part(self.layers[key[1]], "attention"), key)
            elif kind == "out":
                self._hook_output(self.adapter.part(self.layers[key[2]], key[1]), key)
            elif kind == "in":
                self._hook_input(self.adapter.part(self.layers[key[2]], key[1]), key)
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store.clear()

    def __enter__(self) -> ModelCapture:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _hook_output(self, module: nn.Module, key: RawKey) -> None:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if self.recording:
                self._store[key] = output[0] if isinstance(output, tuple) else output

        self._handles.append(module.register_forward_hook(hook))

    def _hook_input(self, module: nn.Module, key: RawKey) -> None:
        def hook(_module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            if self.recording:
                self._store[key] = args[0] if args else _first_tensor(kwargs)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _hook_call(self, module: nn.Module, key: RawKey) -> None:
        def hook(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
            if self.recording:
                self._store[key] = {"position_embeddings": kwargs.get("position_embeddings")}

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    # -- features ----------------------------------------------------------------------

    def _raw(self, key: RawKey) -> Any:
        try:
            return self._store[key]
        except KeyError:
            raise ArchitectureError(
                f"{self.adapter.name}: the hook for {_describe(key)} did not fire during the "
                f"forward of {type(self.model).__name__}; the adapter's paths do not match "
                "how this model runs"
            ) from None

    def projection(self, role: str, layer: int) -> torch.Tensor:
        """Output ``(B, T, ·)`` of projection ``role`` at ``layer`` (fused QKV split)."""
        if self.adapter.layout.fused_qkv and role in ("q", "k", "v"):
            fused = self._raw(("out", "qkv", layer))
            q, k, v = self.adapter.split_qkv(fused, self.info)
            return {"q": q, "k": k, "v": v}[role]
        return self._raw(("out", role, layer))

    def _query_key(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.info.head_dim or self.info.hidden_size // self.info.num_heads
        q = self.adapter.heads_of(self.projection("q", layer), d)
        k = self.adapter.heads_of(self.projection("k", layer), d)
        attention = self.adapter.part(self.layers[layer], "attention")
        if self.adapter.rope:
            q, k = self.adapter.apply_rope(attention, q, k, self._raw(("attn_call", layer)))
        window = self.adapter.attention_window(attention)
        if window is not None and q.shape[2] > window:
            raise ArchitectureError(
                f"{self.adapter.name}: layer {layer} uses sliding-window attention (window "
                f"{window}) and the batch has {q.shape[2]} tokens; attention distilled from "
                f"Q/K assumes full attention: use sequences of at most {window} tokens"
            )
        return q, k

    def attention_probs(self, layer: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, H, T, T)`` attention probabilities of ``layer`` from captured Q and K."""
        from ..losses import attention_log_probs

        q, k = self._query_key(layer)
        attention = self.adapter.part(self.layers[layer], "attention")
        scale = getattr(attention, "scaling", None)
        if not isinstance(scale, float):
            scale = self.info.attention_scale
        logp = attention_log_probs(
            q, k, scale=scale, attention_mask=attention_mask, causal=self.adapter.causal
        )
        return logp.exp().to(q.dtype)

    def features(
        self, outputs: Any, attention_mask: torch.Tensor | None
    ) -> dict[tuple[Feature, int | None], torch.Tensor]:
        """The plan's features from the last forward (then the recorded tensors are freed)."""
        forward = _Forward(self, outputs, attention_mask)
        return {
            (feature, layer): CAPTURED_AT[feature].value(self, layer, forward)
            for feature, layer in self._features
        }

    def module_inputs(self) -> dict[tuple[Feature, int], torch.Tensor]:
        """Teacher side: the recorded module inputs, keyed (feature, teacher layer)."""
        return {
            (feature, layer): self._raw(self._module_input_key(feature, layer))
            for feature, layer in self.plan.module_inputs
        }

    def clear(self) -> None:
        self._store.clear()

    # -- the student's modules on the teacher's inputs ---------------------------------

    def apply_module(self, feature: Feature, layer: int, x: torch.Tensor) -> torch.Tensor:
        """This model's ``feature`` module at ``layer`` applied to ``x`` (with gradients)."""
        block = self.layers[layer]
        if self.block_access is not None:
            self.block_access(block)
        role = INPUT_ROLE[feature]
        if feature is Feature.FFN_INTERMEDIATE:
            module: nn.Module | None = None
        else:
            module = self.adapter.part(block, self._qkv_role(role))
        x = _to_dtype_of(module or self.adapter.part(block, "ffn_out"), x)
        if feature is Feature.FFN_INTERMEDIATE:
            return self.adapter.ffn_intermediate(block, x)
        assert module is not None
        y = module(x)
        if self.adapter.layout.fused_qkv and role in ("q", "k", "v"):
            y = dict(zip("qkv", self.adapter.split_qkv(y, self.info), strict=True))[role]
        return y


def logits_of(outputs: Any) -> torch.Tensor:
    """The model's logits: ``(B, C)`` classification, ``(B, T, V)`` LM, or ``(B, 2, T)``
    start/end logits of extractive QA."""
    logits = getattr(outputs, "logits", None)
    if logits is not None:
        return logits
    start = getattr(outputs, "start_logits", None)
    end = getattr(outputs, "end_logits", None)
    if start is not None and end is not None:
        return torch.stack([start, end], dim=1)
    raise ArchitectureError(
        f"the model output ({type(outputs).__name__}) has no logits: the model has no task head"
    )


def _first_tensor(kwargs: dict[str, Any]) -> Any:
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    return None


def _to_dtype_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):
        return x
    for p in module.parameters():
        return x.to(p.dtype) if p.is_floating_point() else x
    return x


def _describe(key: RawKey) -> str:
    kind = key[0]
    if kind in ("out", "in"):
        return f"the {'output' if kind == 'out' else 'input'} of '{key[1]}' at layer {key[2]}"
    if kind == "final":
        return "the final norm's output"
    if kind == "attn_call":
        return f"the attention call at layer {key[1]}"
    return f"the {'output' if kind == 'layer_out' else 'input'} of layer {key[1]}"


class _Forward:
    """One forward's outputs and mask; queries and keys computed once per layer."""

    def __init__(self, cap: ModelCapture, outputs: Any, mask: torch.Tensor | None) -> None:
        self.outputs, self.mask = outputs, mask
        self.head_dim = cap.info.head_dim or cap.info.hidden_size // cap.info.num_heads
        self._cap = cap
        self._qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def query_key(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._qk:
            self._qk[layer] = self._cap._query_key(layer)
        return self._qk[layer]


@dataclass(frozen=True)
class CaptureSource:
    """Where one feature kind is captured: the raw hook points it needs at a layer, and
    how its tensor is made from what they recorded."""

    needs: Callable[[ModelCapture, int | None], list[RawKey]]
    value: Callable[[ModelCapture, int | None, _Forward], torch.Tensor]


def _projection_source(role: str) -> CaptureSource:
    return CaptureSource(
        lambda c, layer: [("out", c._qkv_role(role), layer)],
        lambda c, layer, f: c.projection(role, layer),
    )


#: The one table from each captured feature kind to where it comes from. ``GENERATED`` is
#: not captured: the training data carries it (``extractor.BATCH_COLUMNS``).
CAPTURED_AT: dict[Feature, CaptureSource] = {
    Feature.EMBEDDINGS: CaptureSource(
        lambda c, layer: [("layer_in", 0)], lambda c, layer, f: c._raw(("layer_in", 0))
    ),
    Feature.HIDDEN: CaptureSource(
        lambda c, layer: [c._hidden_key(layer)], lambda c, layer, f: c._raw(c._hidden_key(layer))
    ),
    Feature.LOGITS: CaptureSource(lambda c, layer: [], lambda c, layer, f: logits_of(f.outputs)),
    Feature.ATTENTION_QUERY: CaptureSource(
        lambda c, layer: c._qk_keys(layer), lambda c, layer, f: f.query_key(layer)[0]
    ),
    Feature.ATTENTION_KEY: CaptureSource(
        lambda c, layer: c._qk_keys(layer), lambda c, layer, f: f.query_key(layer)[1]
    ),
    Feature.ATTENTION_VALUE: CaptureSource(
        lambda c, layer: [("out", c._qkv_role("v"), layer)],
        lambda c, layer, f: c.adapter.heads_of(c.projection("v", layer), f.head_dim),
    ),
    Feature.ATTENTION_PROBS: CaptureSource(
        lambda c, layer: c._qk_keys(layer),
        lambda c, layer, f: c.attention_probs(layer, f.mask),
    ),
    Feature.FFN_INTERMEDIATE: CaptureSource(
        lambda c, layer: [("in", "ffn_out", layer)],
        lambda c, layer, f: c._raw(("in", "ffn_out", layer)),
    ),
    **{feature: _projection_source(role) for feature, role in OUTPUT_ROLE.items()},
}
