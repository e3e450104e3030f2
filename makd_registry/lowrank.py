"""Low-rank linear maps: truncated-SVD factors, a factorized ``Linear`` and rank budgeting.

:class:`LowRankLinear` serves two purposes in makd: an alignment map from the student width to
the teacher width, and a factorized drop-in replacement of an ``nn.Linear``
(``LowRankLinear.from_linear(linear, rank)``). Plain torch; no other makd import.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

import torch
from torch import nn

__all__ = ["LowRankLinear", "rank_for_budget", "svd_factors"]


def _check_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Balanced truncated-SVD factors of ``weight`` ``(d_out, d_in)``.

    With :math:`W = U \Sigma V^\top` (singular values in decreasing order) and ``r = rank``:

    .. math::
        U' = U_r \Sigma_r^{1/2} \in \mathbb{R}^{d_\text{out} \times r},\qquad
        V' = \Sigma_r^{1/2} V_r^\top \in \mathbb{R}^{r \times d_\text{in}},

    so :math:`U'V'` is the best rank-``r`` approximation of ``W`` (Eckart-Young): its error is
    :math:`\sqrt{\sum_{i>r}\sigma_i^2}` in Frobenius norm and :math:`\sigma_{r+1}` in spectral
    norm. The SVD runs in float64 for float64 weights and in float32 otherwise; the factors are
    returned in ``weight``'s dtype and device, detached from the graph.

    Raises:
        ValueError: ``weight`` is not 2-D, or ``rank`` is not in ``[1, min(d_out, d_in)]``.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"rank must be an int, got {rank!r}")
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(
            f"rank must be in [1, min(d_out, d_in)] = [1, {min(d_out, d_in)}] for a "
            f"({d_out}, {d_in}) weight, got {rank}"
        )
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work_dtype)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root[None, :]
    down = root[:, None] * vh[:rank]
    return up.to(weight.dtype).contiguous(), down.to(weight.dtype).contiguous()


class LowRankLinear(nn.Module):
    r"""Factorized linear map :math:`y = (x V^\top) U^\top + b`.

    Submodules: ``down`` = ``nn.Linear(in_features, rank, bias=False)`` holding
    :math:`V` ``(rank, in_features)``, and ``up`` = ``nn.Linear(rank, out_features, bias=bias)``
    holding :math:`U` ``(out_features, rank)`` and the bias. The state dict keys are therefore
    ``down.weight``, ``up.weight`` and ``up.bias``.

    Default initialisation (:meth:`reset_parameters`) makes the product :math:`UV` have the
    same per-entry variance as ``nn.Linear``'s default weight, :math:`1/(3\,d_\text{in})`:
    :math:`V \sim \mathcal{U}(\pm 1/\sqrt{d_\text{in}})` (``nn.Linear``'s default for ``down``)
    and :math:`U \sim \mathcal{U}(\pm\sqrt{3/r})` (variance :math:`1/r`), since
    :math:`\operatorname{Var}[(UV)_{ij}] = r \operatorname{Var}[U] \operatorname{Var}[V]`.
    The bias is :math:`\mathcal{U}(\pm 1/\sqrt{d_\text{in}})` like ``nn.Linear``'s.

    ``rank`` must be in ``[1, min(in_features, out_features)]`` (a larger rank costs more than a
    dense layer and can represent nothing more).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_features = _check_size(in_features, "in_features")
        out_features = _check_size(out_features, "out_features")
        rank = _check_size(rank, "rank")
        if rank > min(in_features, out_features):
            raise ValueError(
                f"rank={rank} exceeds min(in_features, out_features) = "
                f"min({in_features}, {out_features}) = {min(in_features, out_features)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        self.down = nn.Linear(in_features, rank, bias=False, **factory)
        self.up = nn.Linear(rank, out_features, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the parameters with the default initialisation (see the class docstring)."""
        bound_in = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.down.weight.uniform_(-bound_in, bound_in)
            self.up.weight.uniform_(-math.sqrt(3.0 / self.rank), math.sqrt(3.0 / self.rank))
            if self.up.bias is not None:
                self.up.bias.uniform_(-bound_in, bound_in)

    @property
    def bias(self) -> torch.Tensor | None:
        """The output bias (``up.bias``), or ``None``."""
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features) -> (..., out_features)``."""
        return self.up(self.down(x))

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        rank: int,
        bias: torch.Tensor | None = None,
    ) -> LowRankLinear:
        """Best rank-``rank`` factorization of ``weight`` ``(out, in)`` (:func:`svd_factors`),
        with ``bias`` ``(out,)`` copied if given; same dtype and device as ``weight``."""
        up, down = svd_factors(weight, rank)
        d_out, d_in = weight.shape
        if bias is not None and tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
        module = cls(
            d_in, d_out, rank, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            module.down.weight.copy_(down)
            module.up.weight.copy_(up)
            if bias is not None:
                module.up.bias.copy_(bias.detach())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """SVD initialisation from an ``nn.Linear`` (bias copied, same dtype and device)."""
        return cls.from_weight(linear.weight, rank, linear.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``up.weight @ down.weight`` (product in at least fp32)
        and the same bias, dtype and device."""
        w_up, w_down = self.up.weight, self.down.weight
        work = torch.float64 if w_up.dtype == torch.float64 else torch.float32
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.up.bias is not None,
            device=w_up.device,
            dtype=w_up.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_((w_up.to(work) @ w_down.to(work)).to(w_up.dtype))
            if self.up.bias is not None:
                dense.bias.copy_(self.up.bias)
        return dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.up.bias is not None}"
        )

    @staticmethod
    def num_parameters(in_features: int, out_features: int, rank: int, bias: bool = True) -> int:
        """Parameter count ``rank * (in + out) + (out if bias else 0)``."""
        return rank * (in_features + out_features) + (out_features if bias else 0)


def rank_for_budget(
    in_features: int,
    out_features: int,
    budget: int | float,
    bias: bool = True,
) -> int:
    """Largest rank whose :class:`LowRankLinear` fits a parameter budget.

    Args:
        in_features, out_features: layer sizes (positive ints).
        budget: an ``int`` = a number of parameters, or a ``float`` in ``(0, 1]`` = a fraction of
            the dense ``nn.Linear(in, out, bias=bias)`` parameter count, floored to an integer.
            The float is read by its decimal representation, so ``0.29 * 100`` gives 29, not 28.
            Note that ``1`` (int) means one parameter while ``1.0`` means the dense count.
        bias: whether the layer has a bias (counted on both sides).

    Returns:
        The largest ``r`` with ``1 <= r <= min(in, out)`` and
        ``LowRankLinear.num_parameters(in, out, r, bias) <= budget``.

    Raises:
        ValueError: invalid arguments, or even rank 1 does not fit the budget.
    """
    in_features = _check_size(in_features, "in_features")
    out_features = _check_size(out_features, "out_features")
    dense = in_features * out_features + (out_features if bias else 0)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be an int or a float in (0, 1], got {budget!r}")
    if isinstance(budget, numbers.Integral):
        params = int(budget)
        if params < 1:
            raise ValueError(f"budget must be a positive number of parameters, got {params}")
    else:
        frac = float(budget)
        if not (math.isfinite(frac) and 0.0 < frac <= 1.0):
            raise ValueError(f"a float budget must be a fraction in (0, 1], got {budget!r}")
        params = math.floor(Fraction(repr(frac)) * dense)
    per_rank = in_features + out_features
    fixed = out_features if bias else 0
    rank = min((params - fixed) // per_rank, min(in_features, out_features))
    if rank < 1:
        raise ValueError(
            f"budget of {params} parameters is too small for a rank-1 LowRankLinear("
            f"{in_features}, {out_features}, bias={bias}), which needs "
            f"{LowRankLinear.num_parameters(in_features, out_features, 1, bias)} "
            f"(dense layer: {dense})"
        )
    return rank
