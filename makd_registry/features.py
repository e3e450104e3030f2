"""What an aspect can ask for from inside the teacher and the student.

An aspect declares its needs as :class:`FeatureRequest` objects (side, feature, layer);
the engine captures exactly those (forward hooks at the mapped layers only) and hands them
to :meth:`makd_registry.Aspect.loss` in a :class:`FeatureSet`.

This module imports no torch: tensors are only typed by name here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Side = Literal["teacher", "student"]
SIDES: tuple[Side, ...] = ("teacher", "student")


class Feature(StrEnum):
    """Feature kinds, with the tensor shape an aspect receives.

    ``B`` batch, ``T`` sequence length, ``D`` hidden width, ``H`` attention heads,
    ``Hkv`` key/value heads (GQA), ``d`` head width, ``I`` FFN width, ``C`` classes,
    ``V`` vocabulary. Layer-wise kinds are indexed by a 0-based transformer layer.
    """

    #: (B, T, D) output of the embedding block (the input of layer 0); no layer index.
    EMBEDDINGS = "embeddings"
    #: (B, T, D) output hidden state of a layer.
    HIDDEN = "hidden"
    #: (B, H, T, T) attention probabilities, computed by the capture from the captured Q and K
    #: (equal to eager attention's; the model keeps its fast attention). Q/K are cheaper.
    ATTENTION_PROBS = "attention_probs"
    #: (B, H, T, d) queries as the attention uses them (after RoPE where the model applies it).
    ATTENTION_QUERY = "attention_query"
    #: (B, Hkv, T, d) keys as the attention uses them (after RoPE where the model applies it).
    ATTENTION_KEY = "attention_key"
    #: (B, Hkv, T, d) values, split into heads.
    ATTENTION_VALUE = "attention_value"
    #: (B, T, D_q) output of the query projection Linear.
    Q_PROJ = "q_proj"
    #: (B, T, D_k) output of the key projection Linear.
    K_PROJ = "k_proj"
    #: (B, T, D_v) output of the value projection Linear.
    V_PROJ = "v_proj"
    #: (B, T, D) output of the attention output projection Linear.
    O_PROJ = "o_proj"
    #: (B, T, I) FFN activation after the nonlinearity (act(gate) * up for gated MLPs).
    FFN_INTERMEDIATE = "ffn_intermediate"
    #: (B, T, I) gate projection output of a gated MLP (before the nonlinearity).
    FFN_GATE = "ffn_gate"
    #: (B, T, I) up projection output of a gated MLP.
    FFN_UP = "ffn_up"
    #: (B, T, D) output of the FFN block's last Linear (before residual and norm).
    FFN_OUTPUT = "ffn_output"
    #: (B, C) classification logits, (B, T, V) language-model logits, or (B, 2, T) start and
    #: end logits of extractive QA; no layer index.
    LOGITS = "logits"
    #: teacher-generated sequences (B, T_gen) token ids, or (B,) pseudo-labels; teacher only.
    GENERATED = "generated"

    @property
    def layerwise(self) -> bool:
        return self not in _MODEL_WISE


_MODEL_WISE = frozenset({Feature.EMBEDDINGS, Feature.LOGITS, Feature.GENERATED})

#: Module outputs that can also be computed on the *teacher's* input to that module
#: (``FeatureRequest.on_teacher_input``): the student's own matrix applied to what the
#: teacher's matrix saw, a local regression target as in low-rank cloning.
MATRIX_FEATURES = frozenset(
    {
        Feature.Q_PROJ,
        Feature.K_PROJ,
        Feature.V_PROJ,
        Feature.O_PROJ,
        Feature.FFN_GATE,
        Feature.FFN_UP,
        Feature.FFN_INTERMEDIATE,
        Feature.FFN_OUTPUT,
    }
)


@dataclass(frozen=True, order=True)
class FeatureRequest:
    """One captured tensor an aspect needs.

    ``layer`` is a 0-based layer index for layer-wise kinds and ``None`` for model-wise
    ones. ``teacher_input_layer`` (student side, matrix features only) asks for the
    student's module at ``layer`` applied to the input that the teacher's same module at
    teacher layer ``teacher_input_layer`` received.
    """

    side: Side
    feature: Feature
    layer: int | None = None
    teacher_input_layer: int | None = None

    @property
    def on_teacher_input(self) -> bool:
        return self.teacher_input_layer is not None

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"side must be 'teacher' or 'student', not {self.side!r}")
        feature = Feature(self.feature)
        object.__setattr__(self, "feature", feature)
        if feature.layerwise and self.layer is None:
            raise ValueError(f"feature {feature.value!r} is layer-wise and needs a layer index")
        if not feature.layerwise and self.layer is not None:
            raise ValueError(f"feature {feature.value!r} is model-wise and takes no layer index")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer index must be >= 0, not {self.layer}")
        if feature is Feature.GENERATED and self.side != "teacher":
            raise ValueError("generated sequences come from the teacher only")
        if self.on_teacher_input and (self.side != "student" or feature not in MATRIX_FEATURES):
            raise ValueError("teacher_input_layer is for student-side matrix features only")
        if self.teacher_input_layer is not None and self.teacher_input_layer < 0:
            raise ValueError(f"teacher_input_layer must be >= 0, not {self.teacher_input_layer}")

    def describe(self) -> str:
        where = "" if self.layer is None else f"@{self.layer}"
        extra = f" (on teacher input @{self.teacher_input_layer})" if self.on_teacher_input else ""
        return f"{self.side}.{self.feature.value}{where}{extra}"


def _sort_key(r: FeatureRequest) -> tuple[Any, ...]:
    return (r.side, r.feature, r.layer if r.layer is not None else -1, r.teacher_input_layer or -1)


def summarize(requests: Iterable[FeatureRequest]) -> dict[str, list[str]]:
    """Group requests per side as ``{"teacher": ["hidden@[1,3]", "logits"], ...}``."""
    grouped: dict[tuple[Side, Feature, bool], list[str]] = {}
    for r in sorted(set(requests), key=_sort_key):
        layers = grouped.setdefault((r.side, r.feature, r.on_teacher_input), [])
        if r.layer is not None:
            layers.append(
                f"{r.layer}<-{r.teacher_input_layer}" if r.on_teacher_input else str(r.layer)
            )
    out: dict[str, list[str]] = {side: [] for side in SIDES}
    for (side, feature, on_teacher), layers in grouped.items():
        text = feature.value
        if layers:
            text += "@[" + ",".join(layers) + "]"
        if on_teacher:
            text += " (on teacher input)"
        out[side].append(text)
    return out


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts about one model that aspects may need to build alignment maps."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    num_labels: int | None = None
    is_decoder: bool = False
    #: the factor the model multiplies QKᵀ by (1/sqrt(d) unless the model says otherwise)
    attention_scale: float | None = None


@dataclass(frozen=True)
class TopKLogits:
    """A teacher's ``k`` largest logits per row and their token ids; the rest of the
    vocabulary is left out (the teacher-output cache with ``top_k``).

    ``values`` is ``(..., k)`` (logits, not probabilities), ``indices`` the matching
    ``(..., k)`` distinct token ids, ``vocab`` the full vocabulary size. The distribution it
    stands for is the teacher's top-k renormalised: every other token has probability 0.
    :func:`makd_registry.losses.kd_divergence` takes it directly as the teacher's logits (the
    forward KL then costs a pass over the k kept entries, not over the vocabulary);
    :meth:`dense` gives the ``(..., V)`` logits with ``fill`` outside the top k.
    """

    values: torch.Tensor
    indices: torch.Tensor
    vocab: int
    #: ``values.shape[:-1]``: the log of the teacher's probability mass outside the top k
    #: at temperature 1 (``-inf``: none); None when unknown (the top k renormalised)
    log_residual: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if tuple(self.values.shape) != tuple(self.indices.shape):
            raise ValueError(
                f"top-k values {tuple(self.values.shape)} and indices "
                f"{tuple(self.indices.shape)} must have the same shape"
            )
        if not 0 < self.values.shape[-1] <= self.vocab:
            raise ValueError(f"k must be in [1, vocab={self.vocab}], got {self.values.shape[-1]}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense logits it stands for, ``(..., V)``."""
        return (*self.values.shape[:-1], self.vocab)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def dense(self, fill: float = -1e4) -> torch.Tensor:
        """The ``(..., V)`` logits: the kept values at their ids, ``fill`` elsewhere."""
        import torch

        full = torch.full(self.shape, fill, dtype=self.values.dtype, device=self.values.device)
        return full.scatter_(-1, self.indices.long(), self.values)


@dataclass
class FeatureSet:
    """The captured features of one batch, handed to :meth:`Aspect.loss`.

    ``attention_mask`` is the (B, T) padding mask (1 = real token). ``causal`` tells
    whether the models attend causally (decoders). ``labels`` holds the batch's hard
    labels when the task has them. ``step`` is the global optimisation step.

    ``loss_mask`` (B, T) marks the tokens that token-level terms average over when the
    data restricts them (instruction data: the response tokens, ``data.loss_on:
    response``); None means every real token. Aspects read it through
    :meth:`token_mask` (hidden states, attention rows, relations: the tokens in the loss)
    and :meth:`prediction_mask` (per-token logits: the positions whose prediction is in
    the loss; for a causal model the one before each such token). Attention keys stay
    ``attention_mask``: a response token attends to its prompt.
    """

    teacher_features: Mapping[tuple[Feature, int | None], torch.Tensor] = field(
        default_factory=dict
    )
    student_features: Mapping[tuple[Feature, int | None], torch.Tensor] = field(
        default_factory=dict
    )
    #: student matrix outputs computed on the teacher's module inputs, keyed
    #: (feature, student layer, teacher layer)
    student_on_teacher_input: Mapping[tuple[Feature, int, int], torch.Tensor] = field(
        default_factory=dict
    )
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    causal: bool = False
    step: int = 0
    teacher_info: ModelInfo | None = None
    student_info: ModelInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # per-instance memos: never passed on by dataclasses.replace (a copy computes afresh)
    _dense: dict[int, tuple[Any, Any]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _shared: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # read-only for aspects: the tables are views of copies
        from types import MappingProxyType

        for name in ("teacher_features", "student_features", "student_on_teacher_input"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def get(self, request: FeatureRequest) -> torch.Tensor:
        """The tensor for ``request``; a ``KeyError`` naming it when it was not captured."""
        key: tuple[Any, ...] = (request.feature, request.layer)
        if request.on_teacher_input:
            table: Mapping[Any, Any] = self.student_on_teacher_input
            key = (request.feature, request.layer, request.teacher_input_layer)
        else:
            table = self.teacher_features if request.side == "teacher" else self.student_features
        try:
            value = table[key]
        except KeyError:
            raise KeyError(f"feature {request.describe()} was not captured") from None
        if isinstance(value, TopKLogits):  # aspects that need dense logits get them, once
            dense = self._dense.get(id(value))
            if dense is None or dense[0] is not value:
                dense = self._dense[id(value)] = (value, value.dense())
            return dense[1]
        return value

    def token_mask(self) -> torch.Tensor | None:
        """The (B, T) tokens token-level terms average over (hidden states, attention
        query rows, relations): ``loss_mask`` when the data sets one, else
        ``attention_mask``. The one policy every built-in token-level aspect follows."""
        return self.loss_mask if self.loss_mask is not None else self.attention_mask

    def prediction_mask(self) -> torch.Tensor | None:
        """The (B, T) positions whose per-token logits are in the loss: ``token_mask()``
        for a bidirectional model; for a causal one, with a ``loss_mask``, the positions
        just before each token in the loss (position t predicts token t + 1). Without a
        ``loss_mask``: ``attention_mask`` (every real position)."""
        if self.loss_mask is None:
            return self.attention_mask
        if not self.causal:
            return self.loss_mask
        import torch

        m = self.loss_mask.bool()
        shifted = torch.zeros_like(m)
        shifted[:, :-1] = m[:, 1:]
        if self.attention_mask is not None:
            shifted &= self.attention_mask.bool()
        return shifted.to(self.loss_mask.dtype)

    def shared(self, key: Any, compute: Any) -> Any:
        """A value computed once per batch and shared between aspects: ``compute()`` the
        first time ``key`` is asked for, the same object afterwards. Built-ins use it to
        compute the KD and the CE of the same logits in one pass (``logits_kd`` stores the
        CE it computed; ``ce`` finds it). Keys should name the owner, e.g. ``("mypkg",
        ...)``."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def offer(self, key: Any, value: Any) -> None:
        """Make ``value`` the shared value of ``key`` if nothing computed it yet (see
        :meth:`shared`)."""
        self._shared.setdefault(key, value)

    def teacher_top_k(self, feature: Feature | str = "logits") -> TopKLogits | None:
        """The teacher's logits as :class:`TopKLogits` when they come from a top-k cache
        (pass them to :func:`~makd_registry.losses.kd_divergence` as they are); None when
        the teacher's logits are dense (then use :meth:`teacher`)."""
        value = self.teacher_features.get((Feature(feature), None))
        return value if isinstance(value, TopKLogits) else None

    def zero(self) -> torch.Tensor:
        """A scalar fp32 zero on the device of the captured features."""
        import torch

        for table in (self.student_features, self.teacher_features):
            for tensor in table.values():
                return torch.zeros((), dtype=torch.float32, device=tensor.device)
        return torch.zeros((), dtype=torch.float32)

    def teacher(self, feature: Feature | str, layer: int | None = None) -> torch.Tensor:
        return self.get(FeatureRequest("teacher", Feature(feature), layer))

    def student(
        self,
        feature: Feature | str,
        layer: int | None = None,
        *,
        teacher_input_layer: int | None = None,
    ) -> torch.Tensor:
        """The student's feature; with ``teacher_input_layer``, the student's module at
        ``layer`` applied to the input of the teacher's module at that teacher layer."""
        return self.get(
            FeatureRequest(
                "student", Feature(feature), layer, teacher_input_layer=teacher_input_layer
            )
        )
