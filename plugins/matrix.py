"""Matrix distillation: ``mha_matrix`` (Q/K/V/O projections) and ``ffn_matrix`` (FFN block).

Each compares, per mapped layer pair, the outputs of the student's and the teacher's
matrices: MSE after an alignment map, or (``relation: true``) the KL between MiniLMv2
self-relations softmax(XXᵀ/√d_r), which needs no alignment. With ``input: teacher`` the
student's matrix is applied to the input the teacher's matrix received (a local regression
target, as in low-rank cloning); input widths must then be equal (factorized students).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from makd_registry import Aspect, Feature, FeatureRequest, ModelInfo, hookimpl
from makd_registry.strict import raise_at

from .alignment import AlignedConfig, Aligner


class MatrixConfig(AlignedConfig):
    relation: bool = Field(
        default=False,
        description="Compare MiniLMv2 self-relations with KL instead of outputs with MSE "
        "(width-agnostic: no alignment).",
    )
    relation_heads: int = Field(default=1, ge=1, description="Relation heads when relation: true.")
    input: Literal["student", "teacher"] = Field(
        default="student",
        description="student: each model on its own input; teacher: the student's matrix "
        "applied to the teacher's input (needs equal input widths).",
    )

    @model_validator(mode="after")
    def _relation_without_alignment(self) -> MatrixConfig:
        if self.relation and self.align != "identity":
            raise_at(
                ("align",),
                "relation_align",
                "relation: true compares relations and takes no alignment",
                self.align,
            )
        return self


class _MatrixAspect(Aspect):
    #: option value → (feature, width function on ModelInfo, width of the matrix's input)
    KINDS: ClassVar[dict[str, tuple[Feature, Any, Any]]] = {}
    selector: ClassVar[str] = ""

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.aligner = Aligner(config)

    def _selected(self) -> list[str]:
        return list(getattr(self.config, self.selector))

    def requires(self) -> list[FeatureRequest]:
        on_teacher = self.config.input == "teacher"
        out = []
        for s, t in self.pairs:
            for kind in self._selected():
                feature = self.KINDS[kind][0]
                out.append(FeatureRequest("teacher", feature, t))
                out.append(
                    FeatureRequest(
                        "student", feature, s, teacher_input_layer=t if on_teacher else None
                    )
                )
        return out

    def build(self, teacher: ModelInfo, student: ModelInfo) -> None:
        for kind in self._selected():
            _, out_width, in_width = self.KINDS[kind]
            if self.config.input == "teacher" and in_width(student) != in_width(teacher):
                raise ValueError(
                    f"{self.name}: input: teacher needs equal input widths for '{kind}', but "
                    f"the student's is {in_width(student)} and the teacher's {in_width(teacher)}"
                )
            if self.config.relation:
                for side, info in (("student", student), ("teacher", teacher)):
                    if out_width(info) % self.config.relation_heads:
                        raise ValueError(
                            f"{self.name}: relation_heads={self.config.relation_heads} does not "
                            f"divide the {side}'s '{kind}' width {out_width(info)}"
                        )
                continue
            for pair in self.pairs:
                self.aligner.add(
                    kind, pair, out_width(student), out_width(teacher), f"{self.name} '{kind}'"
                )

    def modules(self) -> dict[str, Any]:
        return self.aligner.modules()

    def _term(self, features, kind: str, s: int, t: int):
        from makd_registry import losses

        feature = self.KINDS[kind][0]
        x_t = features.teacher(feature, t)
        x_s = features.student(
            feature, s, teacher_input_layer=t if self.config.input == "teacher" else None
        )
        mask = features.attention_mask
        rows = features.token_mask()  # the tokens in the loss; relation keys: every real one
        if self.config.relation:
            r, causal = self.config.relation_heads, features.causal
            return losses.attention_kl(
                losses.relation_log_probs(x_t, r, attention_mask=mask, causal=causal),
                losses.relation_log_probs(x_s, r, attention_mask=mask, causal=causal),
                mask,
                query_mask=rows,
            )
        return losses.hidden_mse(self.aligner(kind, (s, t), x_s), x_t, rows)

    def loss(self, features):
        terms = [
            self._term(features, kind, s, t) for s, t in self.pairs for kind in self._selected()
        ]
        return sum(terms[1:], terms[0]) / len(terms) if terms else features.zero()


def _unique(values: list[str]) -> list[str]:
    for i, v in enumerate(values):
        if v in values[:i]:
            raise_at((i,), "duplicate_item", "'{v}' is listed twice", v, v=v)
    return values


def _q_width(info: ModelInfo) -> int:
    return info.num_heads * (info.head_dim or info.hidden_size // info.num_heads)


def _kv_width(info: ModelInfo) -> int:
    heads = info.num_kv_heads or info.num_heads
    return heads * (info.head_dim or info.hidden_size // info.num_heads)


def _hidden(info: ModelInfo) -> int:
    return info.hidden_size


def _intermediate(info: ModelInfo) -> int:
    if info.intermediate_size is None:
        raise ValueError("ffn_matrix needs the models' intermediate_size")
    return info.intermediate_size


class MHAMatrix(_MatrixAspect):
    """Per mapped layer, MSE (or relation KL) between Q, K, V, O projection outputs."""

    name = "mha_matrix"
    selector = "projections"
    KINDS = {
        "q": (Feature.Q_PROJ, _q_width, _hidden),
        "k": (Feature.K_PROJ, _kv_width, _hidden),
        "v": (Feature.V_PROJ, _kv_width, _hidden),
        "o": (Feature.O_PROJ, _hidden, _q_width),
    }

    class Config(MatrixConfig):
        projections: list[Literal["q", "k", "v", "o"]] = Field(
            default=["q", "k", "v", "o"],
            min_length=1,
            description="Which attention projections to compare.",
        )

        _unique = field_validator("projections")(classmethod(lambda cls, v: _unique(v)))


class FFNMatrix(_MatrixAspect):
    """Per mapped layer, MSE (or relation KL) between FFN intermediate activations and outputs."""

    name = "ffn_matrix"
    selector = "parts"
    KINDS = {
        "intermediate": (Feature.FFN_INTERMEDIATE, _intermediate, _hidden),
        "gate": (Feature.FFN_GATE, _intermediate, _hidden),
        "up": (Feature.FFN_UP, _intermediate, _hidden),
        "output": (Feature.FFN_OUTPUT, _hidden, _intermediate),
    }

    class Config(MatrixConfig):
        parts: list[Literal["intermediate", "gate", "up", "output"]] = Field(
            default=["intermediate", "output"],
            min_length=1,
            description="Which parts of the feed-forward block to compare (gate/up: gated "
            "MLPs only).",
        )

        _unique = field_validator("parts")(classmethod(lambda cls, v: _unique(v)))


@hookimpl
def makd_register_aspects(register):
    register(MHAMatrix)
    register(FFNMatrix)
