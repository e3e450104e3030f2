"""Student recipes: layer selection (DistilBERT-style) and low-rank factorization.

* :func:`select_layers` — a copy of the teacher that keeps chosen layers, weights copied.
* :func:`factorize` — chosen projections (Q, K, V, O, FFN) of every (or chosen) layer
  replaced by :class:`~makd_registry.lowrank.LowRankLinear` from their truncated SVD, with a
  given rank or the largest uniform rank that fits a parameter budget.
* :func:`parameter_counts` — total, embedding and non-embedding parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..lowrank import LowRankLinear
from .adapter import ArchitectureAdapter, ArchitectureError, get_submodule, set_submodule

#: shorthands accepted in a factorization's module list
GROUPS = ("attention", "ffn")


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a model; shared (tied) tensors are counted once."""

    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "embedding": self.embedding,
            "non_embedding": self.non_embedding,
        }


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Total parameters, and those in embedding tables (token, position, type)."""
    seen: set[int] = set()
    total = embedding = 0
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in embedding_params:
            embedding += p.numel()
    return ParameterCounts(total, embedding)


# -- layer selection ---------------------------------------------------------------------


def select_layers(teacher: nn.Module, adapter: ArchitectureAdapter, keep: Sequence[int]) -> Any:
    """A new model of the teacher's class with the teacher's layers ``keep`` (in that
    order) and every other weight (embeddings, norms, head) copied from the teacher."""
    n = len(adapter.layers(teacher))
    keep = list(keep)
    bad = [i for i in keep if not 0 <= i < n]
    if not keep or bad or len(set(keep)) != len(keep):
        raise ArchitectureError(
            f"teacher_layers {keep} must be distinct layers of the teacher (0..{n - 1})"
        )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        config.layer_types = [layer_types[i] for i in keep]
    student = type(teacher)(config)
    prefix = adapter.layers_prefix(teacher) + "."
    source = teacher.state_dict()
    target: dict[str, torch.Tensor] = {}
    for key in student.state_dict():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            target[key] = source[f"{prefix}{keep[int(index)]}.{rest}"]
        else:
            target[key] = source[key]
    student.load_state_dict(target, strict=True)
    student.train(teacher.training)
    return student.to(next(teacher.parameters()).dtype)


# -- factorization -----------------------------------------------------------------------


@dataclass
class FactorizedModule:
    path: str
    kind: str  # "linear" | "conv1d"
    in_features: int
    out_features: int
    rank: int
    bias: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in": self.in_features,
            "out": self.out_features,
            "rank": self.rank,
            "bias": self.bias,
        }


@dataclass
class FactorizationReport:
    """What :func:`factorize` did: parameters before and after, and each module's rank."""

    before: ParameterCounts
    after: ParameterCounts
    modules: list[FactorizedModule] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)

    def ranks(self) -> dict[str, int]:
        return {m.path: m.rank for m in self.modules}

    def summary(self) -> str:
        ranks = sorted({m.rank for m in self.modules})
        shown = ", ".join(str(r) for r in ranks[:6]) + (" ..." if len(ranks) > 6 else "")
        ratio = self.after.non_embedding / max(self.before.non_embedding, 1)
        return (
            f"{len(self.modules)} projections factorized (rank {shown}); non-embedding "
            f"parameters {self.before.non_embedding:,} -> {self.after.non_embedding:,} "
            f"({ratio:.1%}); total {self.before.total:,} -> {self.after.total:,}"
        )


def expand_roles(adapter: ArchitectureAdapter, modules: Sequence[str]) -> list[str]:
    """Layer roles to factorize for a module list (``attention``, ``ffn`` or single roles).

    A fused QKV projection (GPT-2) is one matrix: ``q``, ``k`` and ``v`` must be selected
    together. A gated MLP has ``ffn_gate`` and ``ffn_up`` instead of ``ffn_in``.
    """
    layout = adapter.layout
    ffn = ["ffn_gate", "ffn_up", "ffn_out"] if layout.gated else ["ffn_in", "ffn_out"]
    attention = ["qkv", "o"] if layout.fused_qkv else ["q", "k", "v", "o"]
    roles: list[str] = []
    for item in modules:
        if item == "attention":
            roles += attention
        elif item == "ffn":
            roles += ffn
        elif item in ("q", "k", "v") and layout.fused_qkv:
            chosen = {m for m in modules if m in ("q", "k", "v")}
            if chosen != {"q", "k", "v"} and "attention" not in modules:
                raise ArchitectureError(
                    f"{adapter.name} computes q, k and v with one fused matrix "
                    f"({layout.qkv}): factorize all three or none"
                )
            roles.append("qkv")
        elif item in ("ffn_gate", "ffn_up") and not layout.gated:
            raise ArchitectureError(
                f"{adapter.name} has no gated MLP: its FFN projections are ffn_in and ffn_out"
            )
        elif item == "ffn_in" and layout.gated:
            raise ArchitectureError(
                f"{adapter.name} has a gated MLP: its FFN input projections are ffn_gate and ffn_up"
            )
        elif item in ("q", "k", "v", "o", "ffn_in", "ffn_gate", "ffn_up", "ffn_out"):
            roles.append(item)
        else:
            raise ArchitectureError(
                f"unknown module {item!r} to factorize; use attention, ffn, q, k, v, o, "
                "ffn_in, ffn_gate, ffn_up or ffn_out"
            )
    return list(dict.fromkeys(roles))


def _targets(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    roles: Sequence[str],
    layers: Sequence[int] | None,
) -> list[tuple[str, nn.Module]]:
    all_layers = adapter.layers(model)
    chosen = list(range(len(all_layers))) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < len(all_layers)]
    if bad:
        raise ArchitectureError(f"factorize.layers {bad} do not exist (0..{len(all_layers) - 1})")
    prefix = adapter.layers_prefix(model)
    out = []
    for i in chosen:
        for role in roles:
            path = f"{prefix}.{i}.{getattr(adapter.layout, role)}"
            module = get_submodule(model, path)
            if isinstance(module, LowRankLinear):
                raise ArchitectureError(f"{path} is already factorized")
            out.append((path, module))
    return out


def solve_rank(shapes: Sequence[tuple[int, int]], dense_total: int, budget: float) -> int:
    """Largest uniform rank ``r`` with ``dense_total - Σ saving_i(r) <= budget·dense_total``,
    where a matrix ``(out, in)`` saves ``out·in - r·(in + out)`` when that is positive (and
    is kept dense otherwise)."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget}")
    limit = budget * dense_total

    def size(r: int) -> int:
        return dense_total - sum(max(o * i - r * (i + o), 0) for o, i in shapes)

    top = max((min(o, i) for o, i in shapes), default=1)
    if size(1) > limit:
        raise ArchitectureError(
            f"a budget of {budget:.1%} of the non-embedding parameters is out of reach: even "
            f"rank 1 leaves {size(1) / dense_total:.1%}; factorize more modules or raise the "
            "budget"
        )
    lo, hi = 1, top
    while lo < hi:  # size() is non-decreasing in r
        mid = (lo + hi + 1) // 2
        if size(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def factorize(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    *,
    modules: Sequence[str] = GROUPS,
    rank: int | Literal["full"] | None = None,
    budget: float | None = None,
    layers: Sequence[int] | None = None,
) -> FactorizationReport:
    """Replace projections of ``model`` in place by SVD-initialised :class:`LowRankLinear`.

    Give exactly one of ``rank`` (an int used for every selected matrix, or ``"full"`` for
    each matrix's full rank ``min(in, out)``, which reproduces the model exactly) and
    ``budget`` (the fraction of the model's non-embedding parameters to keep; the largest
    uniform rank that fits is used, and a matrix that a rank-``r`` factorization would not
    shrink stays dense).
    """
    if (rank is None) == (budget is None):
        raise ValueError("give exactly one of rank and budget")
    roles = expand_roles(adapter, modules)
    targets = _targets(model, adapter, roles, layers)
    before = parameter_counts(model)
    weights = [adapter.linear_weight(m) for _, m in targets]
    chosen: list[int | None] = []
    if budget is not None:
        shapes = [tuple(w.shape) for w, _ in weights]
        r = solve_rank(shapes, before.non_embedding, budget)  # type: ignore[arg-type]
        for out_f, in_f in shapes:
            chosen.append(r if out_f * in_f > r * (in_f + out_f) else None)
    else:
        for (path, _), (w, _) in zip(targets, weights, strict=True):
            full = min(w.shape)
            if rank == "full":
                chosen.append(full)
            elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank must be a positive int or 'full', got {rank!r}")
            elif rank > full:
                raise ArchitectureError(
                    f"rank {rank} exceeds the full rank {full} of {path} "
                    f"({w.shape[0]}x{w.shape[1]}); use rank: full or a smaller rank"
                )
            else:
                chosen.append(rank)
    report = FactorizationReport(before=before, after=before)
    for (path, module), (w, b), r in zip(targets, weights, chosen, strict=True):
        if r is None:
            report.kept_dense.append(path)
            continue
        low = LowRankLinear.from_weight(w.detach(), r, None if b is None else b.detach())
        low.train(module.training)
        set_submodule(model, path, low)
        report.modules.append(
            FactorizedModule(
                path, adapter.module_kind(module), w.shape[1], w.shape[0], r, b is not None
            )
        )
    report.after = parameter_counts(model)
    kinds = dict(getattr(model, "_makd_factorized_kinds", {}))
    kinds.update({m.path: m.kind for m in report.modules})
    model._makd_factorized_kinds = kinds  # original kinds, for saving and dense export
    return report


def densify(model: nn.Module, adapter: ArchitectureAdapter, record: dict[str, Any]) -> int:
    """Replace every factorized module listed in ``record`` (path → {kind, ...}) by a dense
    module of its original kind holding ``U·V``; returns how many were replaced."""
    count = 0
    for path, info in record.items():
        module = get_submodule(model, path)
        if not isinstance(module, LowRankLinear):
            raise ArchitectureError(f"{path} is not factorized ({type(module).__name__})")
        dense = module.to_dense()
        new = adapter.dense_like(info.get("kind", "linear"), dense.weight.detach(), dense.bias)
        new.train(module.training)
        set_submodule(model, path, new)
        count += 1
    return count
