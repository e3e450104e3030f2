"""Masked, numerically stable distillation losses (plain torch, no other makd import).

Conventions shared by every function here:

* ``B`` batch, ``T`` sequence length, ``H`` attention (query) heads, ``Hkv`` key/value heads,
  ``d`` head width, ``D`` hidden width, ``C`` classes, ``V`` vocabulary.
* ``attention_mask`` / ``mask`` is ``(B, T)`` (bool or 0/1 ints): 1 = real token, 0 = padding.
* Everything is computed in fp32 whatever the input dtype (inputs are cast with ``.float()``)
  and every loss returns a scalar fp32 tensor.
* Padded content never reaches an arithmetic operation: it is replaced by a finite constant
  (``masked_fill`` / ``torch.where``) or dropped by indexing *before* any product, softmax or
  log. Padded positions therefore have no influence on the value, even when they hold
  ``inf``/``nan``/huge numbers, and they receive exactly zero gradient.
* Excluded attention keys get the finite score :data:`MASK_VALUE` (not ``-inf``) so that
  ``0 * log 0`` style products are ``0 * finite`` and never ``nan``.
* Every mean divides its sum by :func:`global_count` of the number of elements it averages.
  Alone that is the count itself (at least 1); inside :func:`global_mean_scope` (the trainer,
  with several processes) it is the count summed over all processes divided by their number,
  so that averaging the processes' losses and gradients gives the mean over the *global*
  batch exactly, however the valid tokens are spread over the processes. Each function
  calls :func:`global_count` exactly once per call, whatever its inputs, so every process
  makes the same collective calls in the same order.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "MASK_VALUE",
    "attention_kl",
    "attention_kl_from_scores",
    "attention_log_probs",
    "attention_scores",
    "cross_entropy",
    "global_count",
    "global_mean_scope",
    "hidden_mse",
    "kd_and_cross_entropy",
    "kd_divergence",
    "masked_mean",
    "next_token_cross_entropy",
    "probs_to_log_probs",
    "relation_log_probs",
    "shift_for_causal_lm",
]

#: Finite stand-in for ``-inf``: the score/log-probability given to excluded keys, and the
#: floor applied to log-probabilities before they enter a KL (so ``-inf`` inputs stay finite).
#: Its magnitude keeps sums of a few such terms far from fp32 overflow (max ~3.4e38).
MASK_VALUE: float = -1e30

Direction = Literal["forward", "reverse"]
DivergenceKind = Literal["forward", "reverse", "jsd"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _fp32(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run ``fn`` with autocast disabled on the device of its first tensor argument.

    Casting inputs with ``.float()`` is not enough inside an autocast region: autocast
    would still run the matmuls in fp16/bf16. The models' forwards stay autocast; the losses
    computed from their features do not.
    """

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> torch.Tensor:
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        device = tensor.device.type if tensor is not None else "cpu"
        if torch.is_autocast_enabled(device):
            with torch.autocast(device_type=device, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _as_bool_mask(mask: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """Check ``mask`` has ``shape`` and return it as a bool tensor."""
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _mask_or_all(
    mask: torch.Tensor | None, shape: tuple[int, ...], name: str, device: Any
) -> torch.Tensor:
    """``mask`` as a bool tensor on ``device``, or all true when it is None."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return _as_bool_mask(mask, shape, name).to(device)


def _check_positive(value: float, name: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _key_validity(
    batch: int,
    seq: int,
    attention_mask: torch.Tensor | None,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """``(B, 1, T, T)`` bool, True where query ``i`` may attend key ``j``; None = all."""
    valid: torch.Tensor | None = None
    if attention_mask is not None:
        keys = _as_bool_mask(attention_mask, (batch, seq), "attention_mask").to(device)
        valid = keys[:, None, None, :].expand(batch, 1, seq, seq)
    if causal:
        tril = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        tril = tril[None, None].expand(batch, 1, seq, seq)
        valid = tril if valid is None else valid & tril
    return valid


# --------------------------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------------------------

#: the active count reduction (see :func:`global_mean_scope`); None = this batch alone
_COUNT_REDUCER: ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = ContextVar(
    "makd_count_reducer", default=None
)


def global_count(count: torch.Tensor | int | float, device: Any = None) -> torch.Tensor:
    r"""The denominator of a mean over ``count`` elements of this batch (fp32 scalar).

    Outside :func:`global_mean_scope` it is ``max(count, 1)``. Inside, it is what the scope's
    reducer returns for it: for data parallelism over :math:`R` processes,
    :math:`\max(\sum_r n_r, 1) / R`, so that :math:`\frac1R\sum_r S_r / (N/R) = \sum_r S_r / N`
    is the mean over the global batch. An aspect that computes a mean itself should divide
    by ``global_count(n)`` too (and call it on every process, also when ``n`` is 0).
    """
    if not isinstance(count, torch.Tensor):
        count = torch.tensor(float(count), dtype=torch.float32, device=device)
    count = count.detach().to(torch.float32)
    reducer = _COUNT_REDUCER.get()
    if reducer is None:
        return count.clamp_min(1.0)
    return reducer(count)


@contextlib.contextmanager
def global_mean_scope(reducer: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, :func:`global_count` returns ``reducer(count)``."""
    token = _COUNT_REDUCER.set(reducer)
    try:
        yield
    finally:
        _COUNT_REDUCER.reset(token)


@_fp32
def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    r"""Mean of ``values`` over valid tokens and all trailing elements, in fp32.

    .. math::
        \mathrm{mean} = \frac{\sum_{b,t:\,M_{bt}=1} \sum_{\text{trailing}} v_{bt\ldots}}
                             {n_\text{valid} \cdot \prod \text{trailing dims}}

    Args:
        values: ``(B, T, ...)``, any trailing dimensions, any float dtype.
        mask: ``(B, T)`` bool/int, 1 = valid token; ``None`` = plain mean over everything.

    Returns:
        Scalar fp32 tensor. With no valid token it is ``0`` (not ``nan``) and still connected
        to the autograd graph (zero gradient). Values at invalid tokens never enter the sum
        (``torch.where``), so they may be ``inf``/``nan`` and get exactly zero gradient.
    """
    values = values.float()
    if mask is None:
        return values.sum() / global_count(values.numel(), values.device)
    if values.dim() < 2:
        raise ValueError(
            f"values must be (B, T, ...) when a mask is given, got {tuple(values.shape)}"
        )
    m = _as_bool_mask(mask, tuple(values.shape[:2]), "mask").to(values.device)
    trailing = math.prod(values.shape[2:])
    m_full = m.reshape(m.shape + (1,) * (values.dim() - 2))
    total = torch.where(m_full, values, values.new_zeros(())).sum()
    count = m.sum().to(torch.float32) * trailing
    return total / global_count(count)


# --------------------------------------------------------------------------------------------
# attention distributions
# --------------------------------------------------------------------------------------------


@_fp32
def attention_log_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    r"""Attention log-probabilities over keys, from queries and keys, in fp32.

    .. math::
        \log A_{bhij} = \operatorname{log\,softmax}_{j \in \mathcal{V}_{bi}}
            \Big(\frac{s}{\tau}\, q_{bhi} \cdot k_{b,g(h),j}\Big),
        \qquad s = 1/\sqrt{d} \text{ by default},

    where :math:`\mathcal{V}_{bi}` are the keys that are not padding (and, when ``causal``,
    :math:`j \le i`), and :math:`g(h) = \lfloor h / (H/H_{kv}) \rfloor` is the key head serving
    query head ``h`` (grouped-query attention, like transformers' ``repeat_kv``).

    Args:
        query: ``(B, H, T, d)``.
        key: ``(B, Hkv, T, d)`` with ``H % Hkv == 0``.
        scale: multiplier of the dot products; default ``1 / sqrt(d)``.
        attention_mask: ``(B, T)``, 1 = real token. Padded keys are excluded.
        causal: also exclude future keys (``j > i``).
        temperature: divides the scores (``> 0``).

    Returns:
        ``(B, H, T, T)`` fp32 log-probabilities; excluded keys hold about :data:`MASK_VALUE`
        (finite). Padded queries and keys are zeroed before the product, so rows of padded
        queries are the uniform distribution over their allowed keys; a row with no allowed
        key at all is uniform over all ``T`` keys. Every entry is finite.
    """
    scores = attention_scores(
        query,
        key,
        scale=scale,
        attention_mask=attention_mask,
        causal=causal,
        temperature=temperature,
    )
    return F.log_softmax(scores, dim=-1)


@_fp32
def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The pre-softmax attention scores ``(B, H, T, T)`` of :func:`attention_log_probs`, in fp32.

    ``log_softmax`` of the result over the last dimension is :func:`attention_log_probs`;
    excluded keys hold exactly :data:`MASK_VALUE`. The student side of
    :func:`attention_kl_from_scores` takes these.
    """
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"query and key must be 4-D (B, H, T, d) / (B, Hkv, T, d), got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    b, h, t, d = query.shape
    bk, hkv, tk, dk = key.shape
    if (bk, tk, dk) != (b, t, d):
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree in batch, "
            "sequence length and head width"
        )
    if hkv < 1 or h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key heads ({hkv})")
    _check_positive(temperature, "temperature")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not (isinstance(scale, int | float) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")

    # scale the (B, H, T, d) queries rather than the (B, H, T, T) scores: T/d times cheaper
    q = query.float() * (scale / temperature)
    k = key.float()
    if attention_mask is not None:
        pad = ~_as_bool_mask(attention_mask, (b, t), "attention_mask").to(q.device)
        pad = pad[:, None, :, None]
        q = q.masked_fill_(pad, 0.0)  # q is a fresh tensor here
        k = k.masked_fill(pad, 0.0)
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2))
    valid = _key_validity(b, t, attention_mask, causal, q.device)
    if valid is not None:
        # An additive bias, not masked_fill: adding MASK_VALUE to a finite score gives exactly
        # MASK_VALUE, and a broadcast add is about 10x faster on CPU than a masked_fill with a
        # broadcast mask. The scores are finite (padded q and k were zeroed above).
        if causal:
            bias = torch.zeros(valid.shape, dtype=scores.dtype, device=scores.device)
        else:  # key padding only: one (B, 1, 1, T) row per example is enough
            valid = valid[:, :, :1, :]
            bias = torch.zeros(valid.shape, dtype=scores.dtype, device=scores.device)
        bias = bias.masked_fill_(~valid, MASK_VALUE)
        scores = scores.add_(bias)  # in place: matmul's backward needs q and k only
    return scores


@_fp32
def probs_to_log_probs(
    probs: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    r"""Log of given attention probabilities ``(B, H, T, T)``, in fp32.

    :math:`\log \max(A, \text{tiny})` at allowed keys and :data:`MASK_VALUE` at excluded keys
    (padding, and future keys when ``causal``). Rows of padded queries (whose content is
    ignored) are replaced by the log of the uniform distribution over their allowed keys, so
    ``nan`` rows produced by a model for all-padding queries cannot leak. No renormalisation is
    done: the rows are assumed to already sum to 1 over the allowed keys.
    """
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"probs must be (B, H, T, T), got {tuple(probs.shape)}")
    b, _, t, _ = probs.shape
    p = probs.float()
    tiny = torch.finfo(torch.float32).tiny
    valid = _key_validity(b, t, attention_mask, causal, p.device)
    if valid is None:
        return p.clamp_min(tiny).log()
    # Sanitize first (finite constant at excluded keys), then log.
    logp = torch.where(valid, p, 1.0).clamp_min(tiny).log()
    logp = logp.masked_fill(~valid, MASK_VALUE)
    if attention_mask is not None:
        n_allowed = valid.sum(-1, keepdim=True).clamp_min(1).float()  # (B, 1, T, 1)
        uniform = torch.where(valid, -n_allowed.log(), MASK_VALUE)  # (B, 1, T, T)
        q_pad = ~_as_bool_mask(attention_mask, (b, t), "attention_mask").to(p.device)
        logp = torch.where(q_pad[:, None, :, None], uniform, logp)
    return logp


# --------------------------------------------------------------------------------------------
# attention / relation KL
# --------------------------------------------------------------------------------------------


@_fp32
def attention_kl(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    direction: Direction = "forward",
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""KL divergence between attention (or relation) distributions, averaged over rows.

    forward (MiniLM, teacher first):
    :math:`\mathrm{KL}(A_T \| A_S) = \sum_j A_{T,j} (\log A_{T,j} - \log A_{S,j})`;
    reverse: :math:`\mathrm{KL}(A_S \| A_T)`. The per-row KL is over the valid keys of row
    ``(b, h, i)`` and the result is

    .. math::
        \frac{1}{H \cdot n_\text{valid queries}} \sum_{b,h} \sum_{i:\,M_{bi}=1}
            \mathrm{KL}_{bhi}.

    Args:
        teacher_logp, student_logp: ``(B, H, T, T)`` log-probabilities over keys, same shape
            (e.g. from :func:`attention_log_probs`, :func:`relation_log_probs` or
            :func:`probs_to_log_probs`).
        attention_mask: ``(B, T)``; padded queries are not averaged and padded keys contribute
            nothing. ``None`` = every query and key is valid. Future keys of a causal model
            need no mask here: they carry probability ``exp(MASK_VALUE) = 0`` on both sides.
        direction: ``"forward"`` or ``"reverse"``.
        query_mask: ``(B, T)``, the query rows averaged over (e.g. the response tokens of
            instruction data); default ``attention_mask``. Keys stay ``attention_mask``.

    Returns:
        Scalar fp32 tensor (``0`` when there is no valid query). Log-probabilities are floored
        at :data:`MASK_VALUE` so ``-inf`` inputs cannot produce ``0 * inf``.
    """
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(
            f"teacher_logp {tuple(teacher_logp.shape)} and student_logp "
            f"{tuple(student_logp.shape)} must have the same shape"
        )
    if teacher_logp.dim() != 4 or teacher_logp.shape[-1] != teacher_logp.shape[-2]:
        raise ValueError(f"log-probabilities must be (B, H, T, T), got {tuple(teacher_logp.shape)}")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    b, h, t, _ = teacher_logp.shape
    lt = teacher_logp.float()
    ls = student_logp.float()
    if attention_mask is None and query_mask is None:
        valid = None
        n_rows = torch.tensor(float(b * h * t), device=lt.device)
    else:
        keys = _mask_or_all(attention_mask, (b, t), "attention_mask", lt.device)
        m = keys if query_mask is None else _as_bool_mask(query_mask, (b, t), "query_mask")
        m = m.to(lt.device) & keys
        valid = m[:, None, :, None] & keys[:, None, None, :]  # (B, 1, T, T): query & key valid
        # Replace excluded entries (padded query rows, padded key columns) by the constant 0
        # before anything else: their term becomes exp(0) * (0 - 0) = 0, nothing non-finite can
        # leak, and the original entries get exactly zero gradient.
        lt = torch.where(valid, lt, 0.0)
        ls = torch.where(valid, ls, 0.0)
        n_rows = m.sum().to(torch.float32) * h
    lt = lt.clamp_min(MASK_VALUE)
    ls = ls.clamp_min(MASK_VALUE)
    if direction == "forward":
        terms = lt.exp() * (lt - ls)
    else:
        terms = ls.exp() * (ls - lt)
    return terms.sum() / global_count(n_rows)


class _FusedAttentionKL(torch.autograd.Function):
    """Attention KL from the student's scores with the scores' gradient computed in the same
    pass, block by block over the ``(B·H·T, T)`` rows (about 4 MiB of fp32 per work buffer,
    so the transients stay small and in cache), into one ``(B, H, T, T)`` buffer kept for
    backward instead of the log-softmax output, the masks and the KL's intermediates.
    ``d/ds`` of ``KL(A_T‖A_S)`` per row is ``A_S − A_T``; of ``KL(A_S‖A_T)`` it is
    ``A_S ⊙ (log A_S − log A_T − KL_row)``."""

    @staticmethod
    def forward(ctx, scores, teacher_logp, query_valid, n_rows, reverse):  # type: ignore[override]
        b, h, t, _ = scores.shape
        s_rows, t_rows = scores.reshape(-1, t), teacher_logp.reshape(-1, t)
        grad = torch.empty_like(s_rows)
        # per row: 1/n, or 0 for a padded query (a product: no masked_fill pass)
        weight = None
        if query_valid is not None:
            weight = (query_valid.expand(b, h, t).reshape(-1).to(grad.dtype) / n_rows)[:, None]
        total = torch.zeros((), dtype=torch.float32, device=scores.device)
        for a, z in _blocks([(0, s_rows.shape[0])], _block_rows(t, None)):
            s = s_rows[a:z]
            # Probabilities come from softmax, never from exp(log p): excluded keys hold
            # about MASK_VALUE, and a plain exp of such underflowing inputs takes a slow
            # path on CPU (several times slower than the whole softmax kernel).
            ls = F.log_softmax(s, dim=-1)
            ps = torch.softmax(s, dim=-1)
            lt = t_rows[a:z].float().clamp_min(MASK_VALUE)
            out = grad[a:z]
            if reverse:
                diff = ls.sub_(lt)
                kl = (ps * diff).sum(-1, keepdim=True)
                torch.mul(diff.sub_(kl), ps, out=out)
            else:
                pt = torch.softmax(lt, dim=-1)  # = exp(lt): the rows are normalised
                kl = lt.sub_(ls).mul_(pt).sum(-1, keepdim=True)  # lt is a fresh tensor
                torch.sub(ps, pt, out=out)
            if weight is None:
                total += kl.sum()
                out.div_(n_rows)
            else:
                w = weight[a:z]
                total += torch.where(w > 0, kl, 0.0).sum()
                out.mul_(w)
        ctx.save_for_backward(grad.view(b, h, t, t))
        return total / n_rows

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        # in place, like _FusedLogitLosses: a second backward (retain_graph) fails autograd's check
        return grad.mul_(grad_output), None, None, None, None


@_fp32
def attention_kl_from_scores(
    teacher_logp: torch.Tensor,
    student_scores: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    direction: Direction = "forward",
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":func:`attention_kl` with the student given as pre-softmax scores (from
    :func:`attention_scores`): the same value, computed with about half the memory traffic.

    When the scores need a gradient, the log-softmax, the KL and the scores' gradient are
    computed in one fused pass, and only that gradient is kept for backward (the teacher gets
    no gradient). Otherwise this is ``attention_kl(teacher_logp, log_softmax(scores))``.
    Excluded keys must hold :data:`MASK_VALUE` on both sides (as :func:`attention_scores`
    and :func:`attention_log_probs` produce), and ``teacher_logp`` must be finite everywhere
    (:func:`attention_log_probs` guarantees it); for arbitrary log-probabilities, with
    ``-inf``/``nan`` in excluded entries, use :func:`attention_kl`.
    """
    if teacher_logp.shape != student_scores.shape:
        raise ValueError(
            f"teacher_logp {tuple(teacher_logp.shape)} and student_scores "
            f"{tuple(student_scores.shape)} must have the same shape"
        )
    if teacher_logp.dim() != 4 or teacher_logp.shape[-1] != teacher_logp.shape[-2]:
        raise ValueError(f"log-probabilities must be (B, H, T, T), got {tuple(teacher_logp.shape)}")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if not (torch.is_grad_enabled() and student_scores.requires_grad):
        return attention_kl(
            teacher_logp,
            F.log_softmax(student_scores.float(), dim=-1),
            attention_mask,
            direction=direction,
            query_mask=query_mask,
        )
    b, h, t, _ = teacher_logp.shape
    if attention_mask is None and query_mask is None:
        query_valid = None
        n_rows = global_count(b * h * t, student_scores.device)
    else:  # the row count stays a tensor: no host synchronisation on accelerators
        device = student_scores.device
        m = _mask_or_all(attention_mask, (b, t), "attention_mask", device)
        if query_mask is not None:
            m = m & _as_bool_mask(query_mask, (b, t), "query_mask").to(device)
        query_valid = m[:, None, :]
        n_rows = global_count(m.sum().to(torch.float32) * h)
    return _FusedAttentionKL.apply(
        student_scores.float(), teacher_logp.detach(), query_valid, n_rows, direction == "reverse"
    )


@_fp32
def relation_log_probs(
    x: torch.Tensor,
    num_heads: int,
    *,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    r"""MiniLMv2 self-relation log-probabilities.

    ``x`` ``(B, T, D)`` (e.g. the concatenated queries, keys or values of all heads) is split
    into ``num_heads`` relation heads :math:`X_h` of width :math:`d_r = D / \text{num\_heads}`:

    .. math::
        R_h = \operatorname{softmax}\big(X_h X_h^\top / \sqrt{d_r}\big)
        \quad\text{over the valid keys.}

    Returns ``(B, num_heads, T, T)`` fp32 log-probabilities (see :func:`attention_log_probs`
    for masking). Teacher and student may have different ``D`` as long as both use the same
    ``num_heads``; compare them with :func:`attention_kl`.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, D), got {tuple(x.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    b, t, dim = x.shape
    if dim % num_heads != 0:
        raise ValueError(f"hidden width D={dim} is not divisible by num_heads={num_heads}")
    d_r = dim // num_heads
    xh = x.reshape(b, t, num_heads, d_r).transpose(1, 2)
    return attention_log_probs(
        xh, xh, scale=1.0 / math.sqrt(d_r), attention_mask=attention_mask, causal=causal
    )


# --------------------------------------------------------------------------------------------
# hidden states
# --------------------------------------------------------------------------------------------


@_fp32
def hidden_mse(
    student: torch.Tensor,
    teacher: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Masked mean squared error between hidden states ``(B, T, D)`` (student already mapped
    to the teacher width): :math:`\frac{1}{n_\text{valid} D}\sum_{b,t:\,M_{bt}=1}
    \lVert s_{bt} - t_{bt} \rVert^2`. Scalar fp32."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} hidden states "
            "must have the same shape (map the student to the teacher width first)"
        )
    s = student.float()
    t = teacher.float()
    m = None
    if attention_mask is not None:
        if s.dim() < 2:
            raise ValueError(f"hidden states must be (B, T, D), got {tuple(s.shape)}")
        m = _as_bool_mask(attention_mask, tuple(s.shape[:2]), "attention_mask").to(s.device)
    if torch.is_grad_enabled() and s.requires_grad and not t.requires_grad:
        if m is None:
            count = global_count(s.numel(), s.device)
        else:
            count = global_count(m.sum().to(torch.float32) * math.prod(s.shape[2:]))
        return _FusedMSE.apply(s, t, m, count)
    if m is not None:
        m = m.reshape(m.shape + (1,) * (s.dim() - 2))
        s = torch.where(m, s, 0.0)
        t = torch.where(m, t, 0.0)
    return masked_mean((s - t).square(), attention_mask)


class _FusedMSE(torch.autograd.Function):
    """Masked MSE with its gradient ``2·(s − t)/n`` (0 at masked tokens) computed in the
    forward, into the difference's own buffer: one subtraction, one masking, one
    reduction, one scaling, instead of autograd's passes over masks, squares and sums.
    Masked tokens never reach the value or the gradient (``inf``/``nan`` there included)."""

    @staticmethod
    def forward(ctx, student, teacher, mask, count):  # type: ignore[override]
        diff = student - teacher
        if mask is not None:
            diff = torch.where(mask.reshape(mask.shape + (1,) * (diff.dim() - 2)), diff, 0.0)
        flat = diff.reshape(-1)
        total = torch.dot(flat, flat)
        ctx.save_for_backward(diff.mul_(2.0 / count))
        return total / count

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        return _scaled_by(ctx, grad_output), None, None, None


# --------------------------------------------------------------------------------------------
# output distributions
# --------------------------------------------------------------------------------------------


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1).clamp_min(MASK_VALUE)


def _kl_rows(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(a || b) from log-probabilities ``(N, V)`` -> ``(N,)``."""
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def _divergence_sum(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    kind: str,
    beta: float,
) -> torch.Tensor:
    """Sum over rows of the divergence between ``(N, V)`` logits (all fp32 inside)."""
    ls = _log_probs(student, temperature)
    lt = _log_probs(teacher, temperature)
    if kind == "forward":
        rows = _kl_rows(lt, ls)
    elif kind == "reverse":
        rows = _kl_rows(ls, lt)
    else:
        log_m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        rows = beta * _kl_rows(lt, log_m) + (1.0 - beta) * _kl_rows(ls, log_m)
    return rows.sum()


#: the logit that stands for "not in the teacher's top k" in the dense form
_TOP_K_FILL = -1e4

#: bytes of fp32 work buffer per block of logit rows: small blocks stay in the allocator's
#: reused memory and in cache (a fresh buffer of many MB costs page faults on every pass)
_BLOCK_BYTES = 4 * 1024 * 1024


def _row_runs(valid: torch.Tensor | None, rows: int) -> list[tuple[int, int]]:
    """The contiguous runs ``[start, stop)`` of valid rows (every row when ``valid`` is
    None). Rows are then read as slices: no gather, even when a mask excludes some."""
    if valid is None:
        return [(0, rows)] if rows else []
    v = valid.reshape(-1).to(torch.int8)
    edges = torch.diff(v, prepend=v.new_zeros(1), append=v.new_zeros(1))
    starts = (edges == 1).nonzero().reshape(-1).tolist()
    stops = (edges == -1).nonzero().reshape(-1).tolist()
    return list(zip(starts, stops, strict=True))


def _blocks(runs: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, stop)) for start, stop in runs for a in range(start, stop, size)]


def _block_rows(width: int, chunk_size: int | None) -> int:
    rows = max(1, _BLOCK_BYTES // (4 * max(width, 1)))
    return min(rows, chunk_size) if chunk_size else rows


def _grad_buffer(like: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """The gradient buffer of ``like``'s rows: every valid row is written by the caller, so
    only the rows between the runs are zeroed (no pass over the whole buffer)."""
    grad = torch.empty_like(like)
    previous = 0
    for start, stop in runs:
        if start > previous:
            grad[previous:start].zero_()
        previous = stop
    if previous < like.shape[0]:
        grad[previous:].zero_()
    return grad


def _scaled_by(
    ctx: Any, grad_output: torch.Tensor, grad: torch.Tensor | None = None
) -> torch.Tensor:
    """The saved gradient times ``grad_output``, in place: the buffer serves one backward.
    The multiplication is skipped when the factor is exactly 1 on the CPU (a check there
    costs no device synchronisation); a second backward through the same graph is refused."""
    if getattr(ctx, "makd_used", False):
        raise RuntimeError(
            "this fused loss's gradient buffer was already used by a backward: it was "
            "modified by an inplace operation; compute the loss again for a second backward"
        )
    ctx.makd_used = True
    if grad is None:
        (grad,) = ctx.saved_tensors
    if grad_output.device.type == "cpu" and grad_output.numel() == 1 and float(grad_output) == 1.0:
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


def _kd_blocks(
    student: torch.Tensor,
    teacher: torch.Tensor,
    indices: torch.Tensor | None,
    runs: list[tuple[int, int]],
    block: int,
    temperature: float,
    reverse: bool,
    grad: torch.Tensor | None,
    scale: float | torch.Tensor,
    ce: tuple[torch.Tensor, torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over the valid rows of the KL between ``(N, V)`` logits, block by block (rows read
    as slices); with ``grad``, its gradient ``scale·(p_S − p_T)`` (forward) or
    ``scale·p_S ⊙ (log p_S − log p_T − KL_row)`` (reverse) is written into the valid rows.
    With ``indices`` the teacher is its top-k logits ``(N, k)``, renormalised over them (the
    forward KL only); with ``residual`` (N,), the log of the teacher's probability mass
    outside them, that mass is kept as one bucket (:func:`kd_divergence`). With ``ce`` =
    (targets, CE-valid) per row, at τ 1, also
    Σ −log p_S[target] over the CE-valid rows among them (read off the same log-softmax).
    Returns both sums."""
    total = torch.zeros((), dtype=torch.float32, device=student.device)
    nll = torch.zeros((), dtype=torch.float32, device=student.device)
    for a, b in _blocks(runs, block):
        s, t = student[a:b].float(), teacher[a:b].float()
        if temperature != 1.0:
            s, t = s / temperature, t / temperature
        ls = F.log_softmax(s, dim=-1)
        if ce is not None:
            picked = ls.gather(1, ce[0][a:b, None].long())[:, 0]
            nll -= torch.where(ce[1][a:b], picked, 0.0).sum()
        ls = ls.clamp_min_(MASK_VALUE)
        lt = F.log_softmax(t, dim=-1).clamp_min_(MASK_VALUE)
        dest = None if grad is None else grad[a:b]  # written in place, never copied
        # the gradient is computed in fp32: directly into an fp32 buffer, else in a block
        # scratch copied into the (bf16/fp16) buffer at the end
        out = dest if dest is None or dest.dtype == torch.float32 else torch.empty_like(ls)
        if indices is not None and residual is not None:
            total += _bucket_block(ls, lt, indices[a:b].long(), residual[a:b], out, scale)
        elif indices is not None:
            pt = lt.exp()
            idx = indices[a:b].long()
            total += (pt * (lt - ls.gather(1, idx))).sum()
            if out is not None:
                torch.exp(ls, out=out)
                out.scatter_add_(1, idx, pt.neg_())
                out.mul_(scale)
        elif reverse:
            diff = ls - lt
            ps = ls.exp_()
            kl = (ps * diff).sum(-1)
            total += kl.sum()
            if out is not None:
                diff.sub_(kl[:, None]).mul_(ps)
                torch.mul(diff, scale, out=out)
        else:
            pt = lt.exp()
            if out is not None:
                torch.exp(ls, out=out)
            total += lt.sub_(ls).mul_(pt).sum()
            if out is not None:
                out.sub_(pt).mul_(scale)
        if out is not dest:
            dest.copy_(out)
    return total, nll


def _bucket_block(
    ls: torch.Tensor,
    lt_top: torch.Tensor,
    idx: torch.Tensor,
    log_residual: torch.Tensor,
    out: torch.Tensor | None,
    scale: float | torch.Tensor,
) -> torch.Tensor:
    """Σ over the block's rows of KL(p_T ‖ p_S) over the top-k support plus one residual
    bucket. ``ls``: the student's log-probabilities (n, V); ``lt_top``: log-softmax of the
    teacher's k kept logits (n, k); ``log_residual`` (n,): log r_T, the teacher's mass
    outside them (−inf: none). With ``out``, writes ``scale·(p_S − p̃_T)`` into it, where
    p̃_T is p_T on the support and r_T·p_S/r_S off it."""
    r_t = log_residual.float().exp()[:, None]
    lt = lt_top + torch.log1p(-r_t).clamp_min(MASK_VALUE)  # the teacher's true log-probs
    pt = lt.exp()
    ps = ls.exp() if out is None else torch.exp(ls, out=out)
    ps_top = ps.gather(1, idx)
    ps.scatter_(1, idx, 0.0)  # the student's probabilities off the support
    r_s = ps.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    support = (pt * (lt - ls.gather(1, idx))).sum()
    bucket = torch.where(r_t > 0, r_t * (log_residual.float()[:, None] - r_s.log()), 0.0).sum()
    if out is not None:
        out.mul_(1.0 - r_t / r_s)
        out.scatter_(1, idx, ps_top - pt)
        out.mul_(scale)
    return support + bucket


class _FusedLogitLosses(torch.autograd.Function):
    """The KD divergence over ``(N, V)`` logits (dense or top-k teacher) and, optionally,
    the student's CE on the same rows' targets, in one blocked pass: the student's gradient
    is written into one buffer during the forward (no recomputation, no per-block
    full-size gradients), ``d/dz_S`` of ``τ²·KL/n`` being ``τ·(p_S − p_T)/n`` (forward) or
    ``τ·p_S ⊙ (log p_S − log p_T − KL_row)/n`` (reverse). At τ 1 the CE is read off the KD
    pass's log-softmax (rows the KD does not cover, or any τ ≠ 1, get their own); its
    gradient ``(softmax(z) − onehot(y))/n`` is added into the same buffer in the backward,
    and only when the CE is used, so the two terms' gradients are never two full-size
    tensors summed by autograd. Outputs: the KD value and the CE value (0 without CE). The
    teacher gets no gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, student, teacher, indices, runs, block, temperature, reverse, denominator, ce, residual
    ):
        ctx.set_materialize_grads(False)
        grad = _grad_buffer(student, runs)
        ride = None if ce is None or temperature != 1.0 else (ce[0], ce[3])
        total, nll = _kd_blocks(
            student,
            teacher,
            indices,
            runs,
            block,
            temperature,
            reverse,
            grad,
            temperature / denominator,
            ride,
            residual,
        )
        kd = total * (temperature**2) / denominator
        ctx.ce = ce
        if ce is None:
            ctx.save_for_backward(grad)
            return kd, torch.zeros((), dtype=torch.float32, device=student.device)
        targets, ce_runs, ce_denominator, _ = ce
        rest = _subtract(ce_runs, runs) if ride is not None else ce_runs
        nll = nll + _ce_blocks(student, targets, rest, block, 1.0, None)
        ctx.save_for_backward(grad, student, targets)
        return kd, nll / ce_denominator

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):  # type: ignore[override]
        saved = ctx.saved_tensors  # read once: the buffer is then modified in place
        if grad_kd is None:  # only the CE output was used
            if getattr(ctx, "makd_used", False):
                _scaled_by(ctx, saved[0], saved[0])  # refuses the second backward
            grad = saved[0].zero_()
            ctx.makd_used = True
        else:
            grad = _scaled_by(ctx, grad_kd, saved[0])
        if ctx.ce is not None and grad_ce is not None:
            _, student, targets = saved
            _, ce_runs, ce_denominator, _ = ctx.ce
            factor = grad_ce.to(torch.float32) / ce_denominator
            for a, b in _blocks(ce_runs, _block_rows(student.shape[-1], None)):
                out = grad[a:b]
                out.add_(F.softmax(student[a:b].float(), dim=-1).mul_(factor))
                y = targets[a:b].long()[:, None]
                out.scatter_add_(1, y, (-factor).expand(y.shape).to(out.dtype))
        return grad, None, None, None, None, None, None, None, None, None


def _subtract(runs: list[tuple[int, int]], cover: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``runs`` outside ``cover`` (both sorted, disjoint intervals)."""
    out = []
    for a, b in runs:
        pos = a
        for c, d in cover:
            if d <= pos or c >= b:
                continue
            if c > pos:
                out.append((pos, c))
            pos = max(pos, d)
        if pos < b:
            out.append((pos, b))
    return out


def _check_top_k(values: torch.Tensor, indices: torch.Tensor, vocab: int) -> None:
    if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"teacher_indices must be integer token ids, got {indices.dtype}")
    if values.requires_grad:
        raise ValueError("top-k teacher logits must not require gradients")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(f"teacher_indices must lie in [0, {vocab}) (the student's vocabulary)")


def _ce_blocks(
    logits: torch.Tensor,
    targets: torch.Tensor,
    runs: list[tuple[int, int]],
    block: int,
    denominator: torch.Tensor,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Σ −log softmax(z)_y over the valid rows, block by block; with ``grad``, also writes
    ``(softmax(z) − onehot(y)) / denominator`` into its valid rows."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for a, b in _blocks(runs, block):
        ls = F.log_softmax(logits[a:b].float(), dim=-1)
        y = targets[a:b].long()[:, None]
        total -= ls.gather(1, y).sum()
        if grad is not None:
            out = grad[a:b]
            torch.exp(ls, out=out)
            out.scatter_add_(1, y, out.new_full(y.shape, -1.0))
            out.div_(denominator)
    return total / denominator


class _FusedCE(torch.autograd.Function):
    """Cross-entropy over ``(N, C)`` logits and targets, its gradient ``softmax − onehot``
    computed in the same blocked pass (no log-softmax output kept, no gather of rows)."""

    @staticmethod
    def forward(ctx, logits, targets, runs, block, denominator):  # type: ignore[override]
        grad = _grad_buffer(logits, runs)
        value = _ce_blocks(logits, targets, runs, block, denominator, grad)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        return _scaled_by(ctx, grad_output), None, None, None, None


def _chunk_divergence(
    fn: Callable[..., torch.Tensor],
    student: torch.Tensor,
    teacher: torch.Tensor,
    index: torch.Tensor | None,
) -> torch.Tensor:
    if index is not None:
        student, teacher = student.index_select(0, index), teacher.index_select(0, index)
    return fn(student, teacher)


def _kd_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_indices: torch.Tensor | None,
    teacher_log_residual: torch.Tensor | None,
    temperature: float,
    kind: str,
    beta: float,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check :func:`kd_divergence`'s arguments; a top-k teacher for the reverse KL or JSD
    comes back in its dense form."""
    _check_residual(teacher_log_residual, teacher_logits, teacher_indices, temperature, kind)
    if teacher_indices is not None:
        if tuple(teacher_indices.shape) != tuple(teacher_logits.shape):
            raise ValueError(
                f"teacher_indices {tuple(teacher_indices.shape)} and teacher_logits "
                f"{tuple(teacher_logits.shape)} must have the same shape"
            )
        if tuple(teacher_logits.shape[:-1]) != tuple(student_logits.shape[:-1]):
            raise ValueError(
                f"top-k teacher_logits {tuple(teacher_logits.shape)} must match the student's "
                f"{tuple(student_logits.shape)} in all but the last dimension"
            )
        if not 0 < teacher_logits.shape[-1] <= student_logits.shape[-1]:
            raise ValueError(
                f"top-k teacher_logits keep k={teacher_logits.shape[-1]} entries; k must be in "
                f"[1, {student_logits.shape[-1]}] (the student's vocabulary)"
            )
        if kind != "forward":  # the dense form: every other logit very large and negative
            full = teacher_logits.new_full(student_logits.shape, _TOP_K_FILL)
            teacher_logits = full.scatter_(-1, teacher_indices.long(), teacher_logits)
            teacher_indices = None
    if teacher_indices is None and student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (B, C) or (B, T, V), got {tuple(student_logits.shape)}")
    _check_positive(temperature, "temperature")
    if kind not in ("forward", "reverse", "jsd"):
        raise ValueError(f"kind must be 'forward', 'reverse' or 'jsd', got {kind!r}")
    if kind == "jsd" and not (isinstance(beta, int | float) and 0.0 < beta < 1.0):
        raise ValueError(f"beta must be in the open interval (0, 1) for kind='jsd', got {beta!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return teacher_logits, teacher_indices


@_fp32
def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    kind: DivergenceKind = "forward",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    teacher_indices: torch.Tensor | None = None,
    teacher_log_residual: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Temperature-scaled divergence between teacher and student output distributions.

    With :math:`p_T = \operatorname{softmax}(z_T/\tau)` and
    :math:`p_S = \operatorname{softmax}(z_S/\tau)`:

    * ``"forward"``: :math:`\tau^2\,\mathrm{KL}(p_T \| p_S)`;
    * ``"reverse"``: :math:`\tau^2\,\mathrm{KL}(p_S \| p_T)`;
    * ``"jsd"``: generalized JSD,
      :math:`\tau^2\,[\beta\,\mathrm{KL}(p_T \| m) + (1-\beta)\,\mathrm{KL}(p_S \| m)]` with
      :math:`m = \beta p_T + (1-\beta) p_S` (``log m`` via ``logaddexp``), ``0 < beta < 1``.

    Args:
        student_logits, teacher_logits: same shape, ``(B, C)`` per example or ``(B, T, V)``
            per token. The teacher is not detached here (detach it yourself if needed).
        temperature: :math:`\tau > 0`.
        kind: ``"forward"``, ``"reverse"`` or ``"jsd"``.
        beta: JSD mixture weight of the teacher, in ``(0, 1)``; ignored for the KLs.
        mask: ``logits.shape[:-1]`` (``(B, T)`` for per-token logits), 1 = valid row.
        chunk_size: at most this many rows per block of fp32 work buffers. For the forward
            and reverse KL with a teacher that needs no gradient (the usual case) the rows are
            always processed in blocks (of about 4 MiB of fp32 per buffer, fewer rows when
            ``chunk_size`` says so), read as slices of contiguous valid rows (never gathered),
            with the student's gradient computed in the same pass into one buffer. Otherwise
            (JSD, a teacher with gradients) each chunk is checkpointed. Same value and
            gradients as unblocked (up to float summation order).

        teacher_indices: with a top-k teacher, ``teacher_logits`` holds only its k largest
            logits per row, ``(..., k)``, and this their distinct token ids, same shape. The
            teacher's distribution is then its top-k renormalised (probability 0 elsewhere):
            :math:`p_T = \operatorname{softmax}(v/\tau)` over the k ids. The forward KL
            reads the k entries only (no row of V for the teacher) and equals the dense
            computation with every other teacher logit at a very large negative value;
            the reverse KL and JSD use exactly that dense form.
        teacher_log_residual: with ``teacher_indices``, ``logits.shape[:-1]``: the log of the
            teacher's probability mass outside its top k (at temperature 1; ``-inf`` where
            there is none). The mass is then kept as one bucket instead of renormalising:
            :math:`\tau^2[\sum_{i \in S} p_T(i)\,(\log p_T(i) - \log p_S(i))
            + r_T(\log r_T - \log r_S)]`, with :math:`p_T(i)` the teacher's true
            probabilities on the support :math:`S`, :math:`r_T` its residual and
            :math:`r_S` the student's mass outside :math:`S`. With k = V (or
            :math:`r_T = 0`) it is the full KD. The forward KL at ``temperature`` 1 only.

    Returns:
        Scalar fp32: the mean over examples / valid tokens (``0`` when there is none). Logits
        of masked rows are never read (they get exactly zero gradient); ``-inf`` logits are
        allowed (their log-probability is floored at :data:`MASK_VALUE`).
    """
    teacher_logits, teacher_indices = _kd_inputs(
        student_logits,
        teacher_logits,
        teacher_indices,
        teacher_log_residual,
        temperature,
        kind,
        beta,
        chunk_size,
    )
    return _kd(
        student_logits,
        teacher_logits,
        teacher_indices,
        temperature,
        kind,
        beta,
        mask,
        chunk_size,
        None,
        teacher_log_residual,
    )[0]


def _check_residual(
    residual: torch.Tensor | None,
    teacher_logits: torch.Tensor,
    teacher_indices: torch.Tensor | None,
    temperature: float,
    kind: str,
) -> None:
    if residual is None:
        return
    if teacher_indices is None:
        raise ValueError("teacher_log_residual needs a top-k teacher (teacher_indices)")
    if tuple(residual.shape) != tuple(teacher_logits.shape[:-1]):
        raise ValueError(
            f"teacher_log_residual must have shape {tuple(teacher_logits.shape[:-1])}, got "
            f"{tuple(residual.shape)}"
        )
    if kind != "forward" or temperature != 1.0:
        raise ValueError(
            "the residual bucket applies to the forward KL at temperature 1 (the teacher's "
            f"mass outside its top k is known at temperature 1), got kind={kind!r}, "
            f"temperature={temperature}"
        )


def _kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_indices: torch.Tensor | None,
    temperature: float,
    kind: str,
    beta: float,
    mask: torch.Tensor | None,
    chunk_size: int | None,
    ce: tuple[torch.Tensor, torch.Tensor] | None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The KD value and, with ``ce`` = (targets, valid) per row, the student's CE on them:
    from one fused pass when the KD is a KL whose teacher needs no gradient and the student
    needs one; else the KD as below and the CE by :func:`_cross_entropy_rows`."""
    vocab = student_logits.shape[-1]
    s_rows = student_logits.reshape(-1, vocab)
    t_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    fn = partial(_divergence_sum, temperature=temperature, kind=kind, beta=float(beta))
    valid: torch.Tensor | None = None
    if mask is not None:
        valid = _as_bool_mask(mask, tuple(student_logits.shape[:-1]), "mask").to(s_rows.device)
    runs = _row_runs(valid, s_rows.shape[0])
    n_rows = sum(b - a for a, b in runs)
    denominator = global_count(n_rows, s_rows.device)
    idx_rows = None
    if teacher_indices is not None:
        idx_rows = teacher_indices.reshape(-1, t_rows.shape[-1])
        _check_top_k(t_rows, idx_rows, vocab)
    res_rows = None if residual is None else residual.reshape(-1).to(s_rows.device)
    block = _block_rows(vocab, chunk_size)

    fused = (
        kind in ("forward", "reverse")
        and not t_rows.requires_grad
        and torch.is_grad_enabled()
        and s_rows.requires_grad
    )
    if fused:  # the usual case: one blocked pass, rows read as slices
        spec = None
        if ce is not None:
            targets, ce_valid = ce
            ce_runs = _row_runs(ce_valid.reshape(-1).to(s_rows.device), s_rows.shape[0])
            n_ce = global_count(sum(b - a for a, b in ce_runs), s_rows.device)
            flat_valid = ce_valid.reshape(-1).to(s_rows.device)
            spec = (targets.reshape(-1).to(s_rows.device), ce_runs, n_ce, flat_valid)
        kd, ce_value = _FusedLogitLosses.apply(
            s_rows,
            t_rows,
            idx_rows,
            runs,
            block,
            temperature,
            kind == "reverse",
            denominator,
            spec,
            res_rows,
        )
        return kd, (ce_value if ce is not None else None)
    ce_value = None if ce is None else _cross_entropy_rows(student_logits, *ce)
    if idx_rows is not None:  # forward KL from a top-k teacher, no gradient needed
        total, _ = _kd_blocks(
            s_rows, t_rows, idx_rows, runs, block, temperature, False, None, 1.0, None, res_rows
        )
        return total * (temperature**2) / denominator, ce_value
    index = None if valid is None else valid.reshape(-1).nonzero().squeeze(1)
    if chunk_size is None or n_rows <= chunk_size:
        if index is None:
            total = fn(s_rows, t_rows)
        else:
            total = fn(s_rows.index_select(0, index), t_rows.index_select(0, index))
    else:
        # Each chunk gathers its own rows inside the checkpointed function, so only the
        # (views of the) full logits and a small index are kept for backward, never a copy.
        use_ckpt = torch.is_grad_enabled() and (s_rows.requires_grad or t_rows.requires_grad)
        total = s_rows.new_zeros((), dtype=torch.float32)
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            if index is None:
                args: tuple[Any, ...] = (s_rows[start:stop], t_rows[start:stop], None)
            else:
                args = (s_rows, t_rows, index[start:stop])
            if use_ckpt:
                part = checkpoint(_chunk_divergence, fn, *args, use_reentrant=False)
            else:
                part = _chunk_divergence(fn, *args)
            total = total + part
    return total * (temperature**2) / denominator, ce_value


@_fp32
def kd_and_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    next_token: bool = False,
    temperature: float = 1.0,
    kind: DivergenceKind = "forward",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    teacher_indices: torch.Tensor | None = None,
    teacher_log_residual: torch.Tensor | None = None,
    ignore_index: int = -100,
    ce_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kd_divergence(...), CE)`` of the same student logits in one pass over them.

    The CE is :func:`cross_entropy` of ``student_logits`` on ``labels`` (with ``ce_mask``,
    default ``mask``), or with ``next_token`` :func:`next_token_cross_entropy`. When the KD
    is a forward or reverse KL whose teacher needs no gradient and the student needs one,
    both come from
    one blocked pass: the CE reads the KD pass's per-row normaliser (at ``temperature`` 1;
    one extra reduction per row otherwise), and its gradient is added into the KD's
    gradient buffer (one full-size gradient, not two summed). Otherwise they are computed
    one after the other. Same values and gradients as the two functions separately.
    """
    hard = mask if ce_mask is None else ce_mask
    if next_token:
        ce = _next_token_targets(student_logits, labels, hard, ignore_index)
    else:
        ce = _ce_targets(student_logits, labels, hard, ignore_index)
    teacher_logits, teacher_indices = _kd_inputs(
        student_logits,
        teacher_logits,
        teacher_indices,
        teacher_log_residual,
        temperature,
        kind,
        beta,
        chunk_size,
    )
    kd, ce_value = _kd(
        student_logits,
        teacher_logits,
        teacher_indices,
        temperature,
        kind,
        beta,
        mask,
        chunk_size,
        ce,
        teacher_log_residual,
    )
    assert ce_value is not None
    return kd, ce_value


@_fp32
def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    r"""Cross-entropy :math:`-\frac{1}{n}\sum_{\text{valid}} \log \operatorname{softmax}(z)_y`
    in fp32.

    Args:
        logits: ``(B, C)`` or ``(B, T, V)``. No shifting is done (see
            :func:`shift_for_causal_lm`).
        labels: ``(B,)`` or ``(B, T)`` integer class ids.
        mask: ``labels.shape``, 1 = valid; combined with ``labels != ignore_index``.
        ignore_index: label value to skip.

    Returns:
        Scalar fp32 mean over valid positions (``0`` when there is none). Invalid rows are
        never read and get exactly zero gradient.
    """
    return _cross_entropy_rows(logits, *_ce_targets(logits, labels, mask, ignore_index))


def _ce_targets(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, valid) of :func:`cross_entropy`: invalid rows' targets set to 0."""
    if logits.dim() not in (2, 3) or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"logits (B, C) / (B, T, V) and labels (B,) / (B, T) do not match: "
            f"{tuple(logits.shape)} vs {tuple(labels.shape)}"
        )
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & _as_bool_mask(mask, tuple(labels.shape), "mask").to(labels.device)
    return labels.masked_fill(~valid, 0), valid


def _cross_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """The mean CE of ``logits`` rows against ``targets`` where ``valid``: blocks of
    contiguous valid rows, the gradient computed in the same pass when one is needed."""
    width = logits.shape[-1]
    rows = logits.reshape(-1, width)
    flat_targets = targets.reshape(-1)
    runs = _row_runs(valid.to(rows.device), rows.shape[0])
    denominator = global_count(sum(b - a for a, b in runs), rows.device)
    block = _block_rows(width, None)
    if torch.is_grad_enabled() and rows.requires_grad:
        return _FusedCE.apply(rows, flat_targets, runs, block, denominator)
    return _ce_blocks(rows, flat_targets, runs, block, denominator, None)


@_fp32
def next_token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    r"""Next-token CE of ``(B, T, V)`` logits: position ``t`` predicts ``labels[:, t + 1]``.

    The same value as :func:`cross_entropy` on :func:`shift_for_causal_lm`'s outputs, but
    the logits are never sliced or copied: the targets are shifted instead (the last
    position has none), and a position counts when ``labels[:, t + 1] != ignore_index`` and,
    with ``mask``, tokens ``t`` and ``t + 1`` are both real. Scalar fp32 mean over them.
    """
    return _cross_entropy_rows(logits, *_next_token_targets(logits, labels, mask, ignore_index))


def _next_token_targets(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, valid) of :func:`next_token_cross_entropy`: position t's target is
    ``labels[:, t + 1]``; invalid rows' targets set to 0."""
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    valid = targets != ignore_index
    if mask is not None:
        m = _as_bool_mask(mask, tuple(labels.shape), "mask").to(labels.device)
        valid[:, :-1] &= m[:, :-1] & m[:, 1:]
    return targets.masked_fill(~valid, 0), valid


def shift_for_causal_lm(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Align ``(B, T, V)`` logits with next-token labels ``(B, T)``.

    Returns ``(logits[:, :-1], labels[:, 1:], mask')`` where ``mask'[:, t]`` is true iff both
    the input token ``t`` and the target token ``t + 1`` are real (so with left padding the
    first real token is not predicted from a pad position); ``mask'`` is ``None`` if ``mask``
    is. Views, no copies.
    """
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    shifted_mask = None
    if mask is not None:
        m = _as_bool_mask(mask, tuple(labels.shape), "mask")
        shifted_mask = m[:, :-1] & m[:, 1:]
    return logits[:, :-1], labels[:, 1:], shifted_mask
