"""The sections of an objective file: teacher, student, data, training, objective.

Only the objective tree (``objective:``) is complete here; the model, data and training
sections hold what is needed to validate a file (model references and their depths, data
files) and grow with the engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..aspect import AspectNode
from ..callbacks import CallbackNode
from ..strict import StrictModel, raise_at


def _exactly_one(model: StrictModel, fields: tuple[str, ...]) -> None:
    given = [f for f in fields if getattr(model, f) is not None]
    if len(given) != 1:
        where = given[1] if len(given) > 1 else None
        raise_at(
            (where,) if where else (),
            "model_source",
            "give exactly one of {fields} (got {given})",
            None,
            fields=", ".join(fields),
            given=", ".join(given) or "none",
        )


class FinetuneSection(StrictModel):
    """Training of the teacher itself before distillation (CE on the task's labels)."""

    steps: int = Field(ge=1, description="Optimisation steps of the teacher's training.")
    learning_rate: float = Field(default=1e-4, gt=0, le=1, allow_inf_nan=False)
    batch_size: int | None = Field(default=None, ge=1, description="Default: training's.")
    warmup_steps: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0)


class TeacherSection(StrictModel):
    """Where the teacher comes from."""

    model: str | None = Field(
        default=None,
        min_length=1,
        description="A local model directory (relative to this file) or a hub model id.",
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="An inline transformers config (with model_type) for a model built "
        "from scratch, e.g. a tiny test model.",
    )
    tokenizer: str | None = Field(
        default=None,
        min_length=1,
        description="A local tokenizer directory or hub id (default: the model's own).",
    )
    finetune: FinetuneSection | None = Field(
        default=None,
        description="Train the teacher on the task first (hard-label CE), cached by its "
        "settings and reused by later runs.",
    )
    cache: str | None = Field(
        default=None,
        min_length=1,
        description="A teacher artifact written by `makd teacher cache` (a directory, "
        "relative to this file): training reads the teacher's outputs from it and never "
        "loads the teacher's weights. Alone, or with the model/config it was built from "
        "(then checked against it).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSection:
        if self.cache is not None and self.model is None and self.config is None:
            if self.finetune is not None:
                raise_at(
                    ("finetune",),
                    "finetune_needs_model",
                    "finetune trains a teacher given by 'model' or 'config'; with 'cache' "
                    "alone there is no teacher to train (give the model or config the cache "
                    "was built from, or drop finetune)",
                    None,
                )
            return self
        _exactly_one(self, ("model", "config"))
        return self


FactorizeModule = Literal[
    "attention", "ffn", "q", "k", "v", "o", "ffn_in", "ffn_gate", "ffn_up", "ffn_out"
]


class FactorizeSection(StrictModel):
    """Low-rank factorization of the student's projections (MaKD reading A)."""

    modules: list[FactorizeModule] = Field(
        default=["attention", "ffn"],
        min_length=1,
        description="Projections to factorize: attention (Q, K, V, O), ffn, or single roles.",
    )
    rank: int | Literal["full"] | None = Field(
        default=None,
        description="Rank of every factorized matrix ('full': each matrix's full rank).",
    )
    budget: float | None = Field(
        default=None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Fraction of the non-embedding parameters to keep; the largest uniform "
        "rank that fits is solved for.",
    )
    layers: list[int] | None = Field(
        default=None, min_length=1, description="Layers to factorize (default: all)."
    )

    @model_validator(mode="after")
    def _rank_or_budget(self) -> FactorizeSection:
        if (self.rank is None) == (self.budget is None):
            where = ("budget",) if self.rank is not None else ()
            raise_at(where, "rank_or_budget", "give exactly one of 'rank' and 'budget'", None)
        if isinstance(self.rank, int) and self.rank < 1:
            raise_at(("rank",), "rank_positive", "rank must be at least 1", self.rank)
        return self


class StudentSection(StrictModel):
    """Where the student comes from."""

    model: str | None = Field(
        default=None, min_length=1, description="A local model directory or a hub model id."
    )
    config: dict[str, Any] | None = Field(
        default=None, description="An inline transformers config for a student built from scratch."
    )
    teacher_layers: list[int] | None = Field(
        default=None,
        min_length=1,
        description="Build the student from the teacher by keeping these teacher layers "
        "(0-based, DistilBERT-style initialisation).",
    )
    factorize: FactorizeSection | None = Field(
        default=None,
        description="Replace projections by SVD-initialised low-rank factors; alone, the "
        "student is a factorized copy of the teacher.",
    )
    tokenizer: str | None = Field(
        default=None,
        min_length=1,
        description="A local tokenizer directory or hub id (default: the model's own, or "
        "the teacher's).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StudentSection:
        sources = ("model", "config", "teacher_layers")
        if self.factorize is not None and self.config is not None:
            raise_at(
                ("factorize",),
                "factorize_needs_weights",
                "factorize starts from trained weights: use it alone (a copy of the "
                "teacher), with teacher_layers, or with model",
                None,
            )
        if self.factorize is None or any(getattr(self, f) is not None for f in sources):
            _exactly_one(self, sources)
        return self


Task = Literal["classification", "pair_classification", "qa", "causal_lm", "instruction"]


class DataSection(StrictModel):
    """The training and evaluation data."""

    task: Task = Field(description="What the data is for.")
    train: str | None = Field(
        default=None, min_length=1, description="Training data: a local file or a hub dataset."
    )
    validation: str | None = Field(
        default=None, min_length=1, description="Evaluation data: a local file or a hub dataset."
    )
    subset: str | None = Field(
        default=None, min_length=1, description="Hub datasets: the configuration name."
    )
    train_split: str = Field(default="train", min_length=1, description="Hub datasets: split.")
    validation_split: str = Field(
        default="validation", min_length=1, description="Hub datasets: evaluation split."
    )
    text_column: str = Field(
        default="sentence",
        min_length=1,
        description="Text (classification), raw text (causal_lm).",
    )
    text_pair_column: str | None = Field(
        default=None, min_length=1, description="Second text of pair_classification."
    )
    label_column: str = Field(default="label", min_length=1)
    labels: list[str | int] | None = Field(
        default=None,
        min_length=2,
        description="Classification: the label values in class-id order (e.g. [neg, pos]); "
        "default: integer labels as given, or the sorted distinct string labels of train.",
    )
    question_column: str = Field(default="question", min_length=1, description="qa: question.")
    context_column: str = Field(default="context", min_length=1, description="qa: context.")
    answers_column: str = Field(default="answers", min_length=1, description="qa: answers.")
    instruction_column: str = Field(default="instruction", min_length=1)
    input_column: str = Field(default="input", min_length=1)
    output_column: str = Field(default="output", min_length=1)
    max_length: int = Field(default=128, ge=8, le=32768, description="Tokens per example.")
    train_limit: int | None = Field(
        default=None, ge=1, description="Use only the first N training examples."
    )
    validation_limit: int | None = Field(
        default=None, ge=1, description="Evaluate on the first N examples only."
    )
    max_new_tokens: int = Field(
        default=64, ge=1, le=4096, description="instruction: tokens generated per answer."
    )
    messages_column: str | None = Field(
        default=None,
        min_length=1,
        description="instruction: a column of chat messages ([{role, content}], the last "
        "one the assistant's response), rendered with the tokenizer's chat template.",
    )
    template: Literal["plain", "chat"] = Field(
        default="plain",
        description="instruction: how a prompt is written: plain ('instruction\\n\\n"
        "input\\n\\n') or the tokenizer's chat template (a user turn, then the "
        "assistant's).",
    )
    loss_on: Literal["response", "all"] = Field(
        default="response",
        description="instruction: the tokens every token-level term (CE, logits KD, "
        "attention KL, hidden MSE, matrix terms) averages over: the response tokens, or "
        "all tokens of prompt and response.",
    )
    extra_validation: dict[str, str] = Field(
        default_factory=dict,
        max_length=16,
        description="More evaluation sets of the same task, {name: file or hub dataset}, "
        "evaluated with the validation set; their metrics are reported as name.metric "
        "(e.g. Self-Instruct for instruction data).",
    )

    @model_validator(mode="after")
    def _instruction_options(self) -> DataSection:
        if self.task != "instruction":
            for name in ("messages_column", "template", "loss_on"):
                if name in self.model_fields_set:
                    raise_at(
                        (name,),
                        "instruction_only",
                        "'{name}' applies to task: instruction, not to {task}",
                        getattr(self, name),
                        name=name,
                        task=self.task,
                    )
        if self.messages_column is not None and "template" in self.model_fields_set:
            if self.template != "chat":
                raise_at(
                    ("template",),
                    "messages_need_chat",
                    "messages_column is rendered with the chat template: drop template: "
                    "plain (or give instruction/output columns instead)",
                    self.template,
                )
        for name in self.extra_validation:
            if not name.isidentifier():
                raise_at(
                    ("extra_validation", name),
                    "eval_set_name",
                    "evaluation set names must be identifiers (letters, digits, _), got '{name}'",
                    name,
                    name=name,
                )
        return self

    @model_validator(mode="after")
    def _labels_for_classifiers(self) -> DataSection:
        if self.labels is None:
            return self
        if self.task not in ("classification", "pair_classification"):
            raise_at(
                ("labels",),
                "labels_task",
                "'labels' names the classes of classification tasks, not of {task}",
                None,
                task=self.task,
            )
        seen: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            key = str(label).strip()  # a cell 1 matches 1 and "1": they would be one class
            if key in seen:
                raise_at(
                    ("labels", i),
                    "duplicate_label",
                    "label {label} is already labels[{first}]",
                    label,
                    label=repr(label),
                    first=seen[key],
                )
            seen[key] = i
        return self


Schedule = Literal["linear", "cosine", "constant"]


class TeacherCacheSection(StrictModel):
    """Store the teacher's features once and reuse them in later epochs."""

    dtype: Literal["float16", "bfloat16"] = Field(
        default="float16", description="Storage precision of the cached features."
    )
    top_k: int | None = Field(
        default=None,
        ge=1,
        description="Language models: keep only the top-k teacher logits per token "
        "(the rest become a large negative value: top-k renormalised, an approximation).",
    )


class DistributedSection(StrictModel):
    """How several processes (``torchrun``) share the student and the teacher."""

    strategy: Literal["auto", "replicate", "ddp", "fsdp"] = Field(
        default="auto",
        description="replicate: every process holds the whole student, and the gradients "
        "are averaged in one all-reduce after the backward. ddp: PyTorch's "
        "DistributedDataParallel (bucketed all-reduce overlapping the backward). fsdp: FSDP2, "
        "the student sharded per transformer block (alignment modules with its root), "
        "parameters gathered only while a block runs. auto: fsdp when the student's "
        "training state (weights, gradients, AdamW) would take more than a quarter of a "
        "process's device memory, else ddp. One process: the plain single-process loop.",
    )
    teacher: Literal["auto", "replicate", "fsdp"] = Field(
        default="auto",
        description="replicate: every process holds the whole teacher. fsdp: the teacher "
        "sharded with FSDP2 for inference only (no gradients, no optimizer state). auto: "
        "fsdp when its weights would take more than a quarter of a process's device memory.",
    )
    teacher_offload: bool = Field(
        default=False,
        description="With teacher fsdp on CUDA: keep the teacher's shards in CPU memory, "
        "copied to the device block by block as it runs.",
    )
    reshard_after_forward: bool = Field(
        default=True,
        description="fsdp: free each student block's gathered parameters after its forward "
        "(gathered again for its backward); false keeps them until the backward, for speed.",
    )


class TrainingSection(StrictModel):
    """How long and how fast to train."""

    steps: int = Field(default=1000, ge=1, description="Total optimisation steps.")
    batch_size: int = Field(default=32, ge=1, description="Examples per optimisation step.")
    gradient_accumulation: int = Field(
        default=1, ge=1, description="Micro-batches per step (batch_size must divide by it)."
    )
    learning_rate: float = Field(default=5e-5, gt=0, le=1, allow_inf_nan=False)
    weight_decay: float = Field(default=0.01, ge=0, le=1, allow_inf_nan=False)
    schedule: Schedule = Field(default="linear", description="Learning-rate decay after warm-up.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps.")
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, allow_inf_nan=False, description="Gradient clipping (null: off)."
    )
    seed: int = Field(default=0, ge=0)
    eval_every: int | None = Field(
        default=None, ge=1, description="Evaluate every N steps (and always at the end)."
    )
    eval_batch_size: int | None = Field(default=None, ge=1)
    log_every: int = Field(default=10, ge=1, description="Write metrics every N steps.")
    checkpoint_every: int | None = Field(
        default=None, ge=1, description="Save a resumable checkpoint every N steps."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 autocast (teacher in bf16) on CUDA, fp32 on CPU."
    )
    compile: bool = Field(default=False, description="torch.compile the student's forward.")
    embeddings: Literal["train", "freeze"] = Field(
        default="train",
        description="The student's word embeddings: train them, or freeze them (no gradient "
        "and no optimizer state; an output layer tied to them is frozen too).",
    )
    teacher_cache: TeacherCacheSection | None = Field(
        default=None,
        description="Cache the teacher's features ({} for the defaults): epochs after the "
        "first read them instead of running the teacher.",
    )
    distributed: DistributedSection = Field(
        default_factory=DistributedSection,
        description="Several processes under torchrun: how the student and the teacher are "
        "placed (see docs/running.md).",
    )
    callbacks: list[CallbackNode] = Field(
        default_factory=list,
        max_length=64,
        description="Plugin callbacks around the training steps, in order: "
        "[{type: NAME, ...options}] (see `makd plugins`).",
    )

    @model_validator(mode="after")
    def _accumulation_divides(self) -> TrainingSection:
        if self.batch_size % self.gradient_accumulation:
            raise_at(
                ("gradient_accumulation",),
                "accumulation",
                "batch_size ({b}) must be a multiple of gradient_accumulation ({a})",
                self.gradient_accumulation,
                b=self.batch_size,
                a=self.gradient_accumulation,
            )
        if self.warmup_steps >= self.steps:
            raise_at(
                ("warmup_steps",),
                "warmup",
                "warmup_steps ({w}) must be fewer than steps ({s})",
                self.warmup_steps,
                w=self.warmup_steps,
                s=self.steps,
            )
        return self


class ObjectiveFile(StrictModel):
    """A makd objective file."""

    version: Literal[1] = Field(default=1, description="Objective file format version.")
    teacher: TeacherSection | None = None
    student: StudentSection | None = None
    data: DataSection | None = None
    training: TrainingSection | None = None
    objective: AspectNode = Field(description="The root of the objective tree.")
