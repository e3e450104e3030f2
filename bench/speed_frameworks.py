"""The frameworks ``speed.py`` compares, each computing the same update on a case of
:mod:`speed_cases` (same models, weights, batch, objective, AdamW and clipping).

Each runner builds its own models (:func:`speed_cases.build_models`) and exposes ``step()``
(one optimisation step on the fixed batch) and ``student`` (the trained model).

* ``loop``: hand-written PyTorch. enc: both models with eager attention and
  ``output_hidden_states`` / ``output_attentions``, the four losses in plain torch. dec: SDPA
  (nothing but logits is needed), ``log_softmax`` of both logits and ``F.kl_div`` (no division
  at tau 1), plus the next-token CE with the targets shifted (``-100`` at the last position,
  so the logits are not copied), at tau 1 ``F.nll_loss`` of the same student log-probabilities.
  Then backward, ``clip_grad_norm_``, AdamW.
* ``makd``: makd's engine, ``Trainer.train_step``, driven by the YAML objective of
  :func:`speed_cases.makd_objective_text` resolved by ``makd_registry.testing.resolve``
  (``training:`` included); its training set is exactly the batch's rows, so one step is one
  epoch (the data order permutes the rows; every loss is a mean, so the update is the same).
  Models run SDPA; the capture hooks the mapped layers and the attention KL recomputes the
  distributions from the captured Q and K.
* ``makd_cache``: ``makd`` with ``training.teacher_cache`` (enc: ``{}``, fp16 features; dec:
  ``{top_k: DEC_TOP_K}``). The first step fills the cache; steps after it (epochs after the
  first) read the teacher's features from the memory-mapped file instead of running it.
  An approximation by design (fp16 storage; dec: top-k renormalised teacher).
* ``makd_bf16``: ``makd`` with ``training.precision: bf16``: both models' forwards under
  CPU bf16 autocast (the teacher keeps fp32 weights), the losses in fp32.
* ``textbrewer``: TextBrewer's ``GeneralDistiller``: ``train_on_batch`` (its forwards on
  separate teacher/student batches, adaptors, intermediate matches and kd loss) and then the
  body of its ``train_with_num_steps`` loop (``write_loss``, backward, clip of the student's
  parameters, AdamW step, ``zero_grad``). Differences forced by TextBrewer, none of which
  changes the gradient: its ``kd_loss`` ``ce`` is the cross-entropy H(p_T, p_S) without the
  tau^2 factor, so its weight is tau^2 and the value is off by the teacher's entropy; its
  ``attention_ce`` takes attention logits, so the adaptors hand it the log of the eager
  attention probabilities (clamped at the smallest normal float), weight 0.5 per pair;
  hard-label CE is the student's own ``outputs.loss`` (``hard_label_weight`` 1).
* ``trl`` (dec): ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0``, ``beta=0``,
  ``seq_kd=False``, temperature 1, ``optim`` ``adamw_torch_fused`` or ``adamw_torch`` (the
  AdamW kernel makd's engine uses, as every framework here), ``lr_scheduler_type="constant"``,
  ``max_grad_norm=1``, ``bf16=False`` (TRL's default is bf16 autocast; all run fp32). Its
  ``training_step`` (accelerate backward) and then the body of
  ``Trainer._run_epoch``'s optimisation step (``_clip_grad_norm``, ``_get_grad_norm``,
  optimizer and scheduler step, ``zero_grad``) without callbacks and logging. TRL's
  ``generalized_jsd_loss`` with ``beta=0`` is ``F.kl_div(log p_S, log p_T)`` summed over the
  vocabulary and averaged over unmasked tokens: exactly the forward KL the others compute.
  GKD's ``compute_loss`` has no next-token CE and drops the last position (``[:, :-1]``);
  :class:`GKDWithCE` overrides ``compute_loss`` with the same forwards and the same
  ``generalized_jsd_loss`` on every position, plus the student's own ``outputs.loss``
  (labels passed to its forward: transformers' next-token CE).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from speed_cases import (  # noqa: E402  (bench/ on sys.path)
    BETAS,
    CASES,
    DEC_TAU,
    ENC_PAIRS,
    ENC_TAU,
    EPS,
    LR,
    MAX_GRAD_NORM,
    WEIGHT_DECAY,
    adamw,
    adamw_kernel,
    adamw_options,
    build_models,
    makd_objective_text,
    no_decay,
)

FRAMEWORKS = {
    "enc": ["loop", "makd", "makd_cache", "makd_bf16", "textbrewer"],
    "dec": ["loop", "makd", "makd_cache", "makd_bf16", "textbrewer", "trl"],
}
TINY = torch.finfo(torch.float32).tiny


# -- the hand-written loop ---------------------------------------------------------------


class Loop:
    def __init__(self, case: str, batch: dict[str, torch.Tensor]) -> None:
        self.case = case
        self.teacher, self.student, _ = build_models(case, "eager" if case == "enc" else "sdpa")
        self.opt = adamw(self.student)
        self.batch = batch

    def loss(self) -> torch.Tensor:
        b = self.batch
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        if self.case == "dec":
            with torch.no_grad():
                t = self.teacher(**inputs).logits
            s = self.student(**inputs).logits
            vocab = s.shape[-1]
            zs, zt = s.reshape(-1, vocab), t.reshape(-1, vocab)
            if DEC_TAU != 1.0:  # no full-size division at tau 1
                zs, zt = zs / DEC_TAU, zt / DEC_TAU
            log_s = F.log_softmax(zs, -1)
            kd = F.kl_div(log_s, F.log_softmax(zt, -1), log_target=True, reduction="batchmean")
            kd = kd * (DEC_TAU**2)
            # next-token CE with the targets shifted, not the logits (no copy of the logits);
            # at tau 1 from the same student log-probabilities
            targets = F.pad(b["labels"][:, 1:], (0, 1), value=-100).reshape(-1)
            if DEC_TAU == 1.0:
                ce = F.nll_loss(log_s, targets)
            else:
                ce = F.cross_entropy(s.reshape(-1, vocab), targets)
            return kd + ce
        flags = {"output_hidden_states": True, "output_attentions": True}
        with torch.no_grad():
            t = self.teacher(**inputs, **flags)
        s = self.student(**inputs, **flags)
        mask = b["attention_mask"].to(s.logits.dtype)
        tokens = mask.sum()
        loss = 0.0
        # hidden_states[0] is the embedding output, [i + 1] the output of layer i
        for sl, tl in [(-1, -1), *ENC_PAIRS]:
            diff = (s.hidden_states[sl + 1] - t.hidden_states[tl + 1]).pow(2).mean(-1)
            loss = loss + (diff * mask).sum() / tokens
        queries = mask[:, None, :].expand(-1, t.attentions[0].shape[1], -1)
        for sl, tl in ENC_PAIRS:
            a_t, a_s = t.attentions[tl], s.attentions[sl]
            kl = (a_t * (a_t.clamp_min(TINY).log() - a_s.clamp_min(TINY).log())).sum(-1)
            loss = loss + (kl * queries).sum() / queries.sum() / len(ENC_PAIRS)
        kd = F.kl_div(
            F.log_softmax(s.logits / ENC_TAU, -1),
            F.log_softmax(t.logits / ENC_TAU, -1),
            log_target=True,
            reduction="batchmean",
        ) * (ENC_TAU**2)
        return loss + kd + F.cross_entropy(s.logits, b["labels"])

    def step(self) -> None:
        self.loss().backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), MAX_GRAD_NORM)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


# -- makd --------------------------------------------------------------------------------


def makd_dataset(case: str, batch: dict[str, torch.Tensor]):
    """The batch's rows, unpadded, as the engine's training set (one batch per epoch): a
    list of row dicts, the in-memory data every framework here is given (``makd run``
    reads files through ``datasets``, whose import is not part of the training step)."""

    class Data:
        task = CASES[case].task
        validation = None

    lengths = batch["attention_mask"].sum(-1).tolist()
    ids = batch["input_ids"].tolist()
    labels = batch["labels"].tolist()
    Data.train = [
        {
            "input_ids": row[:n],
            "attention_mask": [1] * n,
            "labels": label if case == "enc" else label[:n],
        }
        for row, n, label in zip(ids, lengths, labels, strict=True)
    ]
    return Data()


class Makd:
    def __init__(
        self, case: str, batch: dict[str, torch.Tensor], cache: bool = False, bf16: bool = False
    ) -> None:
        from makd_registry.engine.trainer import Trainer
        from makd_registry.testing import registry_with, resolve

        teacher, student, adapter = build_models(case, "sdpa")
        resolved = resolve(makd_objective_text(case, cache), registry_with())
        self._tmp = tempfile.TemporaryDirectory(prefix="makd-speed-") if cache else None
        self.trainer = Trainer(
            student=student,
            student_adapter=adapter,
            root=resolved.root,
            data=makd_dataset(case, batch),
            training=resolved.spec.training,
            pad_id=0,
            device=torch.device("cpu"),
            teacher=teacher,
            teacher_adapter=adapter,
            cache_dir=Path(self._tmp.name) if self._tmp else None,
            source=resolved.source,
            # training.precision: bf16 (what makd run passes): bf16 autocast of both models'
            # forwards, the teacher's weights kept fp32 on the CPU, the losses in fp32
            autocast=(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            if bf16
            else contextlib.nullcontext,
        )
        self.student = student

    def step(self) -> float:
        return self.trainer.train_step().loss

    def ready(self) -> None:
        """After the warm-up: the teacher cache (if any) must be complete."""
        cache = self.trainer.teacher_cache
        if self._tmp is not None and not (cache is not None and cache.complete):
            raise RuntimeError("makd_cache: the teacher cache is not complete after warm-up")


# -- TextBrewer --------------------------------------------------------------------------


class TextBrewer:
    def __init__(self, case: str, batch: dict[str, torch.Tensor]) -> None:
        import textbrewer
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

        self.version = textbrewer.__version__
        enc = case == "enc"
        self.teacher, self.student, _ = build_models(case, "eager" if enc else "sdpa")
        matches = []
        t_layers = {t for _, t in ENC_PAIRS}
        s_layers = {s for s, _ in ENC_PAIRS}
        if enc:
            for s, t in [(-1, -1), *ENC_PAIRS]:  # hidden_states[0] is the embedding output
                matches.append(
                    {
                        "layer_T": t + 1,
                        "layer_S": s + 1,
                        "feature": "hidden",
                        "loss": "hidden_mse",
                        "weight": 1,
                    }
                )
            for s, t in ENC_PAIRS:
                matches.append(
                    {
                        "layer_T": t,
                        "layer_S": s,
                        "feature": "attention",
                        "loss": "attention_ce",
                        "weight": 1 / len(ENC_PAIRS),
                    }
                )

        def adaptor(student: bool):
            mapped = s_layers if student else t_layers

            def adapt(batch, out):
                result = {"logits": out.logits}
                if student:
                    result["losses"] = out.loss
                if enc:
                    # attention_ce softmaxes its inputs: the log of the probabilities has the
                    # same softmax. Only the mapped layers.
                    result["attention"] = [
                        a.clamp_min(TINY).log() if i in mapped else None
                        for i, a in enumerate(out.attentions)
                    ]
                    result["hidden"] = out.hidden_states
                    result["inputs_mask"] = batch["attention_mask"]
                return result

            return adapt

        tau = ENC_TAU if enc else DEC_TAU
        self._out = tempfile.TemporaryDirectory(prefix="textbrewer-speed-")
        self.distiller = GeneralDistiller(
            train_config=TrainingConfig(device="cpu", log_dir=None, output_dir=self._out.name),
            distill_config=DistillationConfig(
                temperature=tau,
                kd_loss_type="ce",
                kd_loss_weight=tau * tau,  # its ce has no tau^2 factor
                hard_label_weight=1.0,
                intermediate_matches=matches,
            ),
            model_T=self.teacher,
            model_S=self.student,
            adaptor_T=adaptor(False),
            adaptor_S=adaptor(True),
        )
        self.opt = adamw(self.student)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        self.batch = {"teacher": inputs, "student": {**inputs, "labels": batch["labels"]}}
        self.flags = {"output_hidden_states": True, "output_attentions": True} if enc else {}
        self.writer_step = 0

    def step(self) -> None:
        # the body of BasicDistiller.train_with_num_steps for one batch (no accumulation, no
        # fp16, no scheduler; its tensorboard writer is the no-op one with log_dir=None)
        d = self.distiller
        total_loss, losses_dict = d.train_on_batch(self.batch, self.flags)
        d.write_loss(total_loss, self.writer_step, losses_dict)
        self.writer_step += 1
        total_loss /= d.t_config.gradient_accumulation_steps
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(d.model_S.parameters(), MAX_GRAD_NORM)
        self.opt.step()
        self.opt.zero_grad()


# -- TRL ---------------------------------------------------------------------------------


def _gkd_with_ce():
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.utils import empty_cache

    class GKDWithCE(GKDTrainer):
        """GKD's compute_loss on every position, plus the student's next-token CE."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            student_outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                labels=inputs["labels"],  # transformers' shifted next-token CE
            )
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_outputs = self.teacher_model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            # stock GKD: logits[:, :-1] against labels[:, 1:]; here every position, as the
            # other frameworks (labels only mask: all tokens are valid)
            kd = self.generalized_jsd_loss(
                student_logits=student_outputs.logits,
                teacher_logits=teacher_outputs.logits,
                labels=inputs["labels"],
                beta=self.beta,
                temperature=self.temperature,
                num_items_in_batch=num_items_in_batch,
            )
            loss = kd + student_outputs.loss
            empty_cache()
            return (loss, student_outputs) if return_outputs else loss

    return GKDWithCE


class TRL:
    def __init__(self, case: str, batch: dict[str, torch.Tensor]) -> None:
        if case != "dec":
            raise ValueError("trl runs the dec case only")
        import datasets
        import transformers
        import trl
        from trl.experimental.gkd import GKDConfig

        self.version = trl.__version__
        teacher, self.student, _ = build_models(case, "sdpa")
        self._out = tempfile.TemporaryDirectory(prefix="trl-speed-")
        c = CASES[case]
        args = GKDConfig(
            output_dir=self._out.name,
            lmbda=0.0,
            beta=0.0,
            seq_kd=False,
            temperature=DEC_TAU,
            learning_rate=LR,
            weight_decay=WEIGHT_DECAY,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            adam_epsilon=EPS,
            max_grad_norm=MAX_GRAD_NORM,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch_fused" if adamw_kernel() == "fused" else "adamw_torch",
            per_device_train_batch_size=c.batch,
            gradient_accumulation_steps=1,
            max_steps=10**6,
            use_cpu=True,
            report_to="none",
            logging_steps=10**6,
            save_strategy="no",
            disable_dropout=True,
            max_length=None,
            bf16=False,  # TRL's default is bf16 autocast; every framework here runs fp32
            fp16=False,
        )
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(
            str(Path(__file__).resolve().parents[1] / "data" / "tokenizers" / "shakespeare-bpe")
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or "<pad>"
        rows = datasets.Dataset.from_dict({"input_ids": batch["input_ids"].tolist()})
        self.trainer = _gkd_with_ce()(
            model=self.student,
            teacher_model=teacher,
            args=args,
            data_collator=lambda rows: rows,  # unused: the fixed batch is fed directly
            train_dataset=rows,
            processing_class=tokenizer,
        )
        t = self.trainer
        # what Trainer._inner_training_loop does before its first step
        t.state.max_steps = args.max_steps
        self.model, _ = t._prepare_for_training(args.max_steps, None, None)
        t.current_gradient_accumulation_steps = 1
        self.model.zero_grad()
        if adamw_kernel() == "foreach":
            for group in t.optimizer.optimizer.param_groups:
                group["foreach"] = True
        self._check_optimizer()
        self.batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def _check_optimizer(self) -> None:
        """TRL's own AdamW must match the others' (groups and hyper-parameters)."""
        opt = self.trainer.optimizer.optimizer  # accelerate's wrapper
        if type(opt) is not torch.optim.AdamW:
            raise RuntimeError(f"trl built {type(opt).__name__}, not torch.optim.AdamW")
        ids = {id(p): n for n, p in self.student.named_parameters()}
        for group in opt.param_groups:
            names = [ids[id(p)] for p in group["params"]]
            wrong = [
                n
                for n, p in zip(names, group["params"], strict=True)
                if (0.0 if no_decay(n, p) else WEIGHT_DECAY) != group["weight_decay"]
            ]
            if wrong:
                raise RuntimeError(f"trl's weight-decay groups differ from makd's: {wrong[:5]}")
            if (group["lr"], tuple(group["betas"]), group["eps"]) != (LR, BETAS, EPS):
                raise RuntimeError(f"trl's AdamW settings differ: {group['lr']}, {group['betas']}")
            kernel = adamw_options()
            if any(bool(group.get(k)) != v for k, v in kernel.items()):
                raise RuntimeError(f"trl's AdamW kernel differs from makd's ({adamw_kernel()})")

    def step(self) -> None:
        t, model = self.trainer, self.model
        t.accelerator.gradient_state._set_sync_gradients(True)
        t.training_step(model, dict(self.batch), None)
        grad_norm = t._clip_grad_norm(model)
        t._get_grad_norm(model, grad_norm=grad_norm)
        t.optimizer.step()
        if not t.accelerator.optimizer_step_was_skipped:
            t.lr_scheduler.step()
        model.zero_grad()
        t.state.global_step += 1


def build(case: str, framework: str, batch: dict[str, torch.Tensor]):
    if framework == "loop":
        return Loop(case, batch)
    if framework == "makd":
        return Makd(case, batch)
    if framework == "makd_cache":
        return Makd(case, batch, cache=True)
    if framework == "makd_bf16":
        return Makd(case, batch, bf16=True)
    if framework == "textbrewer":
        return TextBrewer(case, batch)
    if framework == "trl":
        return TRL(case, batch)
    raise ValueError(framework)
