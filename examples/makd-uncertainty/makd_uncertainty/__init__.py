"""makd-uncertainty: ``uncertainty_sum``, an example third-party combinator.

    L = Σ_i exp(−s_i) · w_i·L_i + s_i

Each term's weighted loss w_i·L_i is scaled by a learned precision exp(−s_i), where
s_i = log σ_i² is a trainable scalar that starts at ``initial_log_variance``. The + s_i term
keeps the precisions from collapsing to 0 (homoscedastic uncertainty weighting, Kendall,
Gal and Cipolla, CVPR 2018). The s_i are trained with the student (they are this node's
``modules()``) and saved with the alignment maps.

It uses only makd's public API and the tree protocol: a config field holding a list of
objective nodes is found by the default ``Aspect.child_nodes``, children inherit the
``layers:`` mapping, and the static weights are applied by ``weighting.weighted_loss``.
``makd explain`` shows the static weights; the learned factors are in the checkpoint.
"""

from __future__ import annotations

from pydantic import Field

from makd_registry import Aspect, AspectNode, LayerwiseConfig, hookimpl
from makd_registry.weighting import weighted_loss


class UncertaintySum(Aspect):
    """Sum of terms weighted by learned uncertainties: Σ exp(−s_i)·w_i·L_i + s_i."""

    name = "uncertainty_sum"
    is_combinator = True

    class Config(LayerwiseConfig):
        terms: list[AspectNode] = Field(min_length=1, description="The terms to weight.")
        initial_log_variance: float = Field(
            default=0.0, ge=-10, le=10, description="Starting s_i = log σ_i² of every term."
        )

    def build(self, teacher, student) -> None:
        import torch

        super().build(teacher, student)
        start = torch.full((len(self.children),), float(self.config.initial_log_variance))
        self.log_variance = torch.nn.ParameterDict({"s": torch.nn.Parameter(start)})

    def modules(self):
        out = super().modules()
        if hasattr(self, "log_variance"):
            out["log_variance"] = self.log_variance
        return out

    def loss(self, features):
        import torch

        s = self.log_variance["s"]
        total = features.zero()
        for i, child in enumerate(self.children):
            if child.weight == 0:
                continue  # a switched-off term costs nothing and learns nothing
            total = total + torch.exp(-s[i]) * weighted_loss(child, features) + s[i]
        return total


@hookimpl
def makd_register_aspects(register):
    register(UncertaintySum)
