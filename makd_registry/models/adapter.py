"""Architecture adapters: where the parts makd distils live inside one model family.

An adapter is a small class that tells makd, for the transformers models of one or more
``config.model_type`` values:

* where the stack of transformer layers is (``layers_path`` under ``model.base_model``) and
  the final norm whose output is the last hidden state of pre-norm models;
* per layer, the dotted paths of the attention module, the Q/K/V (or fused QKV) and output
  projections, and the feed-forward parts (:class:`LayerLayout`);
* how queries and keys are turned into what the attention uses (head split, RoPE), how the
  FFN intermediate activation is computed, and how the weight of a projection is read
  (``nn.Linear`` stores ``(out, in)``, GPT-2's ``Conv1D`` stores ``(in, out)``);
* which task heads the family has in transformers.

Built-in adapters live in ``plugins/architectures.py``; a third-party one is registered
through the ``makd_register_architectures`` hook (see ``docs/adapters.md``).

This module imports torch only inside methods, so plugin modules stay cheap to import.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ExitCode, MakdError
from ..features import ModelInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

#: task heads an adapter can declare, with the transformers Auto class that builds each
HEAD_CLASSES: dict[str, str] = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "masked_lm": "AutoModelForMaskedLM",
    "causal_lm": "AutoModelForCausalLM",
}

#: the projection roles a layer can have (see :class:`LayerLayout`)
ROLES = ("q", "k", "v", "qkv", "o", "ffn_in", "ffn_gate", "ffn_up", "ffn_out")


class ArchitectureError(MakdError):
    """A model makd cannot work with: unknown family, unsupported option, missing part."""

    exit_code = ExitCode.MODEL


@dataclass(frozen=True)
class LayerLayout:
    """Dotted paths of one transformer layer's parts, relative to the layer module.

    Attention: either ``q``, ``k`` and ``v`` (separate projections) or ``qkv`` (one fused
    projection whose output is ``[q | k | v]`` along the last axis). ``attention`` is the
    module that receives the layer's attention inputs (and, for RoPE models, the
    ``position_embeddings`` keyword). ``o`` is the attention output projection.

    Feed-forward: either ``ffn_in`` (one input projection followed by ``ffn_act``) or
    ``ffn_gate`` and ``ffn_up`` (gated: ``act(gate(x)) * up(x)``); ``ffn_out`` is the
    projection back to the hidden width.
    """

    attention: str
    o: str
    ffn_act: str
    ffn_out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    ffn_in: str | None = None
    ffn_gate: str | None = None
    ffn_up: str | None = None

    def __post_init__(self) -> None:
        separate = (self.q, self.k, self.v)
        if self.qkv is None and None in separate:
            raise ValueError("a LayerLayout needs q, k and v paths, or one fused qkv path")
        if self.qkv is not None and any(p is not None for p in separate):
            raise ValueError("give either q/k/v paths or a fused qkv path, not both")
        if self.ffn_in is None and (self.ffn_gate is None or self.ffn_up is None):
            raise ValueError("a LayerLayout needs ffn_in, or ffn_gate and ffn_up (gated MLP)")
        if self.ffn_in is not None and (self.ffn_gate is not None or self.ffn_up is not None):
            raise ValueError("give either ffn_in or ffn_gate/ffn_up, not both")

    @property
    def fused_qkv(self) -> bool:
        return self.qkv is not None

    @property
    def gated(self) -> bool:
        return self.ffn_gate is not None

    def roles(self) -> dict[str, str]:
        """The projection roles this layout has, with their paths."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in ROLES and getattr(self, f.name) is not None
        }


def get_submodule(root: Any, path: str) -> Any:
    """``root.a.b.0.c`` for ``path = "a.b.0.c"``; an :class:`ArchitectureError` naming the
    missing part otherwise."""
    module = root
    for part in path.split(".") if path else []:
        try:
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        except (AttributeError, IndexError, TypeError, KeyError):
            raise ArchitectureError(
                f"{type(root).__name__} has no part '{path}' (failed at '{part}'): the "
                "architecture adapter does not match this model"
            ) from None
    return module


def set_submodule(root: Any, path: str, new: Any) -> None:
    """Replace the module at dotted ``path`` under ``root`` with ``new``."""
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(root, parent_path)
    if name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


class ArchitectureAdapter:
    """Where the parts of one model family live, and how to read them.

    Subclass it, set the class attributes and override the methods whose defaults do not fit;
    register the class through the ``makd_register_architectures`` hook.
    """

    #: a short unique name, e.g. ``"bert"``
    name: ClassVar[str] = ""
    #: the ``config.model_type`` values this adapter handles
    model_types: ClassVar[tuple[str, ...]] = ()
    #: dotted path of the ``nn.ModuleList`` of layers, relative to ``model.base_model``
    layers_path: ClassVar[str] = ""
    #: dotted path of the final norm (pre-norm models), relative to ``model.base_model``
    final_norm_path: ClassVar[str | None] = None
    #: the parts of each layer
    layout: ClassVar[LayerLayout]
    #: whether the models attend causally (decoders)
    causal: ClassVar[bool] = False
    #: whether queries and keys are rotated (RoPE) between the projection and the attention
    rope: ClassVar[bool] = False
    #: task heads of the family (keys of :data:`HEAD_CLASSES`)
    heads: ClassVar[frozenset[str]] = frozenset()

    # -- structure ---------------------------------------------------------------------

    def base_model(self, model: nn.Module) -> nn.Module:
        """The body of ``model`` without its task head (transformers' ``base_model``)."""
        return getattr(model, "base_model", model)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The transformer layers of ``model``, in order."""
        return list(get_submodule(self.base_model(model), self.layers_path))

    def layers_prefix(self, model: nn.Module) -> str:
        """The state-dict key prefix of the layer list, e.g. ``"bert.encoder.layer"``."""
        base = self.base_model(model)
        prefix = next((n for n, m in model.named_modules() if m is base), "")
        return f"{prefix}.{self.layers_path}" if prefix else self.layers_path

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The norm applied after the last layer (its output is the last hidden state)."""
        if self.final_norm_path is None:
            return None
        return get_submodule(self.base_model(model), self.final_norm_path)

    def part(self, layer: nn.Module, role: str) -> nn.Module:
        """The module playing ``role`` (``q``, ``ffn_out``, ``attention``...) in ``layer``."""
        path = getattr(self.layout, role, None)
        if path is None:
            raise ArchitectureError(f"{self.name} layers have no '{role}' part")
        return get_submodule(layer, path)

    def num_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    # -- shapes ------------------------------------------------------------------------

    def check_config(self, config: Any) -> None:
        """Raise :class:`ArchitectureError` for a configuration makd cannot capture
        faithfully. The default accepts everything."""

    def head_dim(self, config: Any) -> int:
        explicit = getattr(config, "head_dim", None)
        if isinstance(explicit, int) and explicit > 0:
            return explicit
        return int(config.hidden_size) // int(config.num_attention_heads)

    def model_info(self, config: Any) -> ModelInfo:
        """Shape facts of a model with ``config``."""
        heads = int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = self.head_dim(config)
        return ModelInfo(
            num_layers=self.num_layers(config),
            hidden_size=int(config.hidden_size),
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=head_dim,
            intermediate_size=self.intermediate_size(config),
            vocab_size=getattr(config, "vocab_size", None),
            num_labels=getattr(config, "num_labels", None),
            is_decoder=self.causal,
            attention_scale=self.attention_scale(config),
        )

    def intermediate_size(self, config: Any) -> int | None:
        size = getattr(config, "intermediate_size", None)
        return int(size) if size else None

    def attention_scale(self, config: Any) -> float:
        """The factor QKᵀ is multiplied by before the softmax."""
        return float(self.head_dim(config)) ** -0.5

    # -- tensors -----------------------------------------------------------------------

    def split_qkv(
        self, fused: torch.Tensor, info: ModelInfo
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split a fused QKV projection output ``(B, T, ·)`` into q, k, v."""
        d = info.head_dim or info.hidden_size // info.num_heads
        kv = (info.num_kv_heads or info.num_heads) * d
        return fused.split([info.num_heads * d, kv, kv], dim=-1)

    def heads_of(self, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        """``(B, T, n·d)`` → ``(B, n, T, d)``."""
        b, t, _ = x.shape
        return x.view(b, t, -1, head_dim).transpose(1, 2)

    def apply_rope(
        self,
        attention: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        call_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``query`` ``(B, H, T, d)`` and ``key`` ``(B, Hkv, T, d)`` as the attention
        module does. ``call_kwargs`` are the keyword arguments the attention module was
        called with. The default uses ``position_embeddings = (cos, sin)`` and the
        ``apply_rotary_pos_emb`` function of the module's own modeling file."""
        pe = call_kwargs.get("position_embeddings")
        if pe is None:
            raise ArchitectureError(
                f"{self.name}: the attention module was called without position_embeddings, "
                "so the rotary embedding cannot be applied to the captured queries and keys"
            )
        cos, sin = pe
        fn = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
        if fn is None:
            fn = rotate_with_rope
        return fn(query, key, cos, sin)

    def ffn_intermediate(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The FFN activation (the input of ``ffn_out``) computed from the FFN input ``x``."""
        act = self.part(layer, "ffn_act")
        if self.layout.gated:
            return act(self.part(layer, "ffn_gate")(x)) * self.part(layer, "ffn_up")(x)
        return act(self.part(layer, "ffn_in")(x))

    def attention_window(self, attention: nn.Module) -> int | None:
        """The sliding-window size of an attention module, or None for full attention: the
        module's own ``sliding_window`` when it has one (Qwen2 sets it per layer), else its
        config's (Mistral reads it from the config at call time)."""
        if hasattr(attention, "sliding_window"):
            window = attention.sliding_window
        else:
            window = getattr(getattr(attention, "config", None), "sliding_window", None)
        return int(window) if isinstance(window, int) and window > 0 else None

    # -- weights -----------------------------------------------------------------------

    def linear_weight(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight (out, in), bias)`` of a projection module (``nn.Linear`` layout)."""
        from torch import nn

        if isinstance(module, nn.Linear):
            return module.weight, module.bias
        if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projection: (in, out)
            return module.weight.t(), module.bias
        raise ArchitectureError(
            f"{self.name}: cannot read the weight of a {type(module).__name__} (expected "
            "nn.Linear or Conv1D)"
        )

    def dense_like(
        self, original_kind: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        """A dense module of kind ``original_kind`` (``"linear"`` or ``"conv1d"``) holding
        ``weight`` ``(out, in)`` and ``bias``: the inverse of :meth:`linear_weight`."""
        import torch
        from torch import nn

        out_f, in_f = weight.shape
        if original_kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            module = Conv1D(out_f, in_f).to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                module.weight.copy_(weight.t())
                if bias is not None:
                    module.bias.copy_(bias)
                else:
                    module.bias.zero_()
            return module
        module = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device)
        module = module.to(weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    @staticmethod
    def module_kind(module: nn.Module) -> str:
        """``"conv1d"`` for transformers' Conv1D, ``"linear"`` otherwise."""
        return "conv1d" if type(module).__name__ == "Conv1D" else "linear"


def rotate_with_rope(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard RoPE (rotate-half convention): ``x·cos + rotate_half(x)·sin``, with ``cos``
    and ``sin`` of shape ``(B, T, d)`` broadcast over heads."""
    import torch

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin
