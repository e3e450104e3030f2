"""``gkd``: on-policy distillation, generalized KD (Agarwal et al., 2024, "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes").

The aspect is the divergence: JSD(β) between the teacher's and the student's next-token
distributions over the response tokens of the batch,

    JSD(β) = β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m),   m = β·p_T + (1 − β)·p_S,

averaged over the positions that predict a response token (``FeatureSet.prediction_mask``).
What makes it on-policy is its ``student_samples`` requirement, served by the
``StudentSamples`` provider registered here: on a fraction λ of the optimisation steps
(drawn per step from the run's seed), the provider replaces each training row's response
by the student's own continuation of its prompt, sampled at ``temperature`` from the
current student (batched, no gradient), before the teacher and the student see the batch.
The teacher then scores the student's tokens; the other steps train on the data's
responses. Each row's sample is drawn from its own seed (run seed, step, row), so the
samples are the same after a resume and for any number of processes.

The engine knows nothing of this: the provider transforms micro-batches through the
generic :meth:`~makd_registry.providers.Provider.transform_batch`.
"""

from __future__ import annotations

from pydantic import Field

from makd_registry import Aspect, AspectConfig, Feature, FeatureRequest, hookimpl
from makd_registry.providers import Provider, Requirement, disagreements

#: the requirement kind of on-policy student samples
STUDENT_SAMPLES = "student_samples"


class GKD(Aspect):
    """JSD(β) of teacher and student on responses, a fraction λ of them the student's own
    samples (on-policy)."""

    name = "gkd"

    class Config(AspectConfig):
        lmbda: float = Field(
            default=0.5,
            ge=0,
            le=1,
            description="Fraction λ of the steps trained on the student's own samples "
            "(on-policy); the rest train on the data's responses.",
        )
        beta: float = Field(
            default=0.5,
            gt=0,
            lt=1,
            description="JSD(β) weight of the teacher: β·KL(p_T‖m) + (1−β)·KL(p_S‖m), "
            "m = β·p_T + (1−β)·p_S.",
        )
        temperature: float = Field(
            default=1.0, gt=0, le=100, description="The student's sampling temperature."
        )
        max_new_tokens: int = Field(
            default=64, ge=1, le=8192, description="Longest sampled response."
        )
        chunk_size: int | None = Field(
            default=None, ge=1, description="Rows per chunk of the divergence (large vocabularies)."
        )

    def requires(self) -> list[FeatureRequest]:
        return [
            FeatureRequest("teacher", Feature.LOGITS),
            FeatureRequest("student", Feature.LOGITS),
        ]

    def needs(self) -> list[Requirement]:
        c = self.config
        options = {
            "lmbda": c.lmbda,
            "temperature": c.temperature,
            "max_new_tokens": c.max_new_tokens,
        }
        return [Requirement(STUDENT_SAMPLES, options)]

    def loss(self, features):
        from makd_registry.losses import kd_divergence

        z_s = features.student(Feature.LOGITS)
        z_t = features.teacher(Feature.LOGITS)
        return kd_divergence(
            z_s,
            z_t,
            kind="jsd",
            beta=self.config.beta,
            mask=features.prediction_mask(),
            chunk_size=self.config.chunk_size,
        )


class StudentSamples(Provider):
    """On a fraction λ of the steps, every training row's response becomes the student's
    own sample (see the module docstring)."""

    kind = STUDENT_SAMPLES

    def check(self, needs, context):
        spec = context.spec
        node = needs[0].node
        problems = []
        if spec.data is None or spec.data.task != "instruction":
            task = spec.data.task if spec.data is not None else None
            problems.append(
                (
                    node,
                    f"gkd samples responses to prompts: it needs task: instruction, not {task}",
                )
            )
        if not context.has_teacher:
            problems.append((node, "gkd needs a teacher section (the teacher scores the samples)"))
        teacher = spec.teacher
        training = spec.training
        if (teacher is not None and getattr(teacher, "cache", None)) or (
            training is not None and training.teacher_cache is not None
        ):
            problems.append(
                (
                    node,
                    "gkd needs the live teacher: its samples change every step, so no stored "
                    "teacher output covers them (drop teacher.cache / training.teacher_cache)",
                )
            )
        return problems + disagreements(
            needs,
            "all gkd terms of one objective must use the same lmbda, temperature and "
            "max_new_tokens (one sample per row and step)",
        )

    def provide(self, needs, context):
        options = needs[0].requirement.options
        context.say(
            f"gkd: on-policy on a fraction {options['lmbda']:g} of the steps (student samples "
            f"at temperature {options['temperature']:g}, up to {options['max_new_tokens']} "
            "tokens)"
        )

    @staticmethod
    def on_policy(options, context) -> bool:
        """Whether this step trains on the student's samples (the same on every process)."""
        import torch

        lmbda = options["lmbda"]
        if lmbda <= 0:
            return False
        if lmbda >= 1:
            return True
        gen = torch.Generator().manual_seed(context.seed_for(f"gkd:on-policy:{context.step}"))
        return bool(torch.rand((), generator=gen) < lmbda)

    def transform_batch(self, needs, batch, context):
        import torch

        from makd_registry.generation import sample_continuations

        options = needs[0].requirement.options
        if not self.on_policy(options, context):
            return batch
        rows = [context.data.train[i] for i in context.indices]
        prompts = [list(r["input_ids"][: r["prompt_length"]]) for r in rows]
        samples = sample_continuations(
            context.student,
            prompts,
            [context.seed_for(f"gkd:sample:{context.step}:{i}") for i in context.indices],
            max_new_tokens=options["max_new_tokens"],
            temperature=options["temperature"],
            pad_id=context.pad_id,
            eos_id=context.eos_id,
            device=context.device,
            autocast=context.autocast,
        )
        width = max(len(p) + len(s) for p, s in zip(prompts, samples, strict=True))
        n = len(prompts)
        ids = torch.full((n, width), context.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        loss_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (p, s) in enumerate(zip(prompts, samples, strict=True)):
            ids[i, : len(p) + len(s)] = torch.tensor(p + s)
            mask[i, : len(p) + len(s)] = 1
            loss_mask[i, len(p) : len(p) + len(s)] = 1
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "loss_mask": loss_mask,
            # the student's own tokens have no reference: no hard-label term covers them
            "labels": torch.full_like(ids, -100),
        }
        out = {k: v.to(batch["input_ids"].device) for k, v in out.items()}
        out["index"] = batch["index"]
        return out


@hookimpl
def makd_register_aspects(register):
    register(GKD)


@hookimpl
def makd_register_providers(register):
    register(StudentSamples())
