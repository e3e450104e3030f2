"""``seqkd``: sequence-level KD, CE of the student on teacher-generated outputs.

The aspect declares a ``teacher_targets`` requirement (its decoding options); the
``TeacherTargets`` provider registered here serves it before training: the teacher
generates once over the training set (batched, cached on disk under a hash of everything
the targets depend on), and the rows carry the generated tokens as the ``GENERATED``
feature. For classifiers the "generation" is the teacher's argmax: pseudo-labels.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from makd_registry import Aspect, AspectConfig, Feature, FeatureRequest, hookimpl
from makd_registry.providers import Provider, Requirement, disagreements
from makd_registry.strict import raise_at

#: the requirement kind of teacher-generated targets
TEACHER_TARGETS = "teacher_targets"


class SeqKD(Aspect):
    """CE of the student on teacher-generated sequences (or teacher pseudo-labels), cached."""

    name = "seqkd"

    class Config(AspectConfig):
        decoding: Literal["greedy", "beam", "sample"] = Field(
            default="greedy", description="How the teacher generates."
        )
        num_beams: int = Field(default=4, ge=2, le=64, description="Beams for decoding: beam.")
        max_new_tokens: int = Field(default=128, ge=1, le=8192)
        temperature: float = Field(default=1.0, gt=0, le=100, description="Sampling temperature.")
        top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
        cache_dir: str | None = Field(
            default=None,
            min_length=1,
            description="Where generations are cached, relative to the objective file "
            "(default: $MAKD_CACHE_DIR/seqkd).",
        )

        @model_validator(mode="after")
        def _options_match_decoding(self) -> SeqKD.Config:
            given = self.model_fields_set
            if "num_beams" in given and self.decoding != "beam":
                raise_at(
                    ("num_beams",),
                    "unused",
                    "'num_beams' only applies to decoding: beam",
                    self.num_beams,
                )
            for key in ("temperature", "top_p"):
                if key in given and self.decoding != "sample":
                    raise_at(
                        (key,),
                        "unused",
                        "'{key}' only applies to decoding: sample",
                        getattr(self, key),
                        key=key,
                    )
            return self

    def requires(self) -> list[FeatureRequest]:
        return [
            FeatureRequest("teacher", Feature.GENERATED),
            FeatureRequest("student", Feature.LOGITS),
        ]

    def needs(self) -> list[Requirement]:
        options = self.config.model_dump(mode="json", exclude={"name", "weight", "type"})
        return [Requirement(TEACHER_TARGETS, options)]

    def loss(self, features):
        from makd_registry import losses

        targets = features.teacher(Feature.GENERATED)
        logits = features.student(Feature.LOGITS)
        if logits.dim() == 2:
            return losses.cross_entropy(logits, targets)
        if not features.causal and targets.dim() == 2 and targets.shape == logits.shape[:2]:
            return losses.cross_entropy(logits, targets)  # QA: (B, 2, T) start/end
        mask = features.attention_mask
        if features.causal:  # targets shifted, the logits never copied
            return losses.next_token_cross_entropy(logits, targets, mask)
        return losses.cross_entropy(logits, targets, mask)


class TeacherTargets(Provider):
    """The teacher's targets on the training set, generated once before training: one set
    of decoding options per objective (every ``seqkd`` term trains on the same targets)."""

    kind = TEACHER_TARGETS

    def check(self, needs, context):
        problems = []
        if not context.has_teacher:
            problems.append(
                (needs[0].node, "seqkd needs a teacher section (the teacher generates the targets)")
            )
        return problems + disagreements(
            needs,
            "all seqkd terms of one objective must use the same decoding options "
            "(the teacher generates its targets once, before training)",
        )

    def provide(self, needs, context):
        import time

        from makd_registry.generation import (
            apply_targets,
            cache_key,
            generate_targets,
            load_or_generate,
        )

        config = needs[0].node.config
        training = context.spec.training
        batch_size = training.eval_batch_size or training.batch_size
        generation = {
            "seed": training.seed,
            "batch_size": batch_size,
            "device": context.device.type,
            "bf16": context.bf16,
        }
        options = config.model_dump(mode="json", exclude={"name", "weight", "cache_dir"})
        key = cache_key(
            context.teacher_id, context.spec.data, context.tokenizer, options, generation, "seqkd"
        )
        directory = (
            context.base_dir / config.cache_dir
            if config.cache_dir
            else context.cache_root / "seqkd"
        )
        cache_file = directory / f"{key}.safetensors"
        data = context.data

        def make():
            start = time.perf_counter()
            with context.random_stream("seqkd"):
                targets = generate_targets(
                    context.teacher,
                    data,
                    context.tokenizer,
                    config,
                    batch_size=batch_size,
                    device=context.device,
                    autocast=context.autocast,
                    max_length=context.spec.data.max_length,
                )
            context.say(
                f"seqkd: the teacher labelled {len(data.train)} training rows in "
                f"{time.perf_counter() - start:.0f}s"
            )
            return targets

        if context.main:
            targets, cached = load_or_generate(cache_file, make)
            if cached:
                context.say(f"seqkd: reusing the teacher's targets from {cache_file}")
        context.barrier()
        if not context.main:
            targets, _ = load_or_generate(cache_file, make)
        apply_targets(data, targets)


@hookimpl
def makd_register_aspects(register):
    register(SeqKD)


@hookimpl
def makd_register_providers(register):
    register(TeacherTargets())
