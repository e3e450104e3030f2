"""Weights of the objective tree: the one place where a node's weight is applied.

Every node of an objective has a ``weight``; the loss a node contributes is its weight
times its own (unweighted) loss, and a combinator's own loss combines its children's
*weighted* losses. So the factor a leaf's loss is trained with is the product of the
weights on the path from the root to it, the root's own weight included:

    L = w_root · L_root,   L_sum = Σ_c w_c · L_c,   L_stages = w_active · L_active

:func:`weighted_loss` is what the trainer calls on the root and what the combinators call on
their children; :func:`effective_weights` is what ``makd explain`` prints. Both follow the
same rule, and nothing else in makd multiplies by a weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .aspect import Aspect
    from .features import FeatureSet


def weighted_loss(node: Aspect, features: FeatureSet) -> torch.Tensor:
    """``node.weight · node.loss(features)``; a node of weight 0 is not computed at all."""
    if node.weight == 0:
        return features.zero()
    return node.weight * node.loss(features)


def effective_weights(root: Aspect, scale: float = 1.0) -> dict[str, float]:
    """``{path: factor}``: the factor each node's unweighted loss enters the total loss with
    (the product of the weights from the root down to it, the root's included). For staged
    objectives each stage's nodes get the factor they have while their stage is active."""
    out: dict[str, float] = {}

    def visit(node: Any, parent: float) -> None:
        factor = parent * node.weight
        out[node.path] = factor
        for child in node.children:
            visit(child, factor)

    visit(root, scale)
    return out
