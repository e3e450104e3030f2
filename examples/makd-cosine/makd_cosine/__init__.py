"""makd-cosine: the ``hidden_cosine`` aspect, an example third-party makd plugin.

L = mean over mapped layer pairs and valid tokens of (1 − cos(h_S, h_T)), the cosine
embedding loss DistilBERT uses to align student and teacher hidden states. The student and
teacher widths must be equal (cosine needs vectors of the same space).
"""

from __future__ import annotations

from pydantic import Field

from makd_registry import Aspect, Feature, FeatureRequest, LayerwiseConfig, hookimpl


class HiddenCosine(Aspect):
    """Cosine distance 1 − cos(h_S, h_T) between mapped hidden states, over valid tokens."""

    name = "hidden_cosine"

    class Config(LayerwiseConfig):
        eps: float = Field(default=1e-8, gt=0, le=1e-2, description="Norm floor of cosine.")

    def requires(self) -> list[FeatureRequest]:
        out = []
        for student_layer, teacher_layer in self.pairs:
            out.append(FeatureRequest("teacher", Feature.HIDDEN, teacher_layer))
            out.append(FeatureRequest("student", Feature.HIDDEN, student_layer))
        return out

    def loss(self, features):
        import torch

        from makd_registry.losses import global_count

        total = features.zero()
        for student_layer, teacher_layer in self.pairs:
            h_s = features.student(Feature.HIDDEN, student_layer).float()
            h_t = features.teacher(Feature.HIDDEN, teacher_layer).float()
            if h_s.shape != h_t.shape:
                raise ValueError(
                    f"hidden_cosine needs equal shapes, got student {tuple(h_s.shape)} "
                    f"and teacher {tuple(h_t.shape)}"
                )
            cos = torch.nn.functional.cosine_similarity(h_s, h_t, dim=-1, eps=self.config.eps)
            distance = 1.0 - cos  # (B, T)
            mask = features.token_mask()  # the tokens in the loss (responses, say)
            # divide by global_count: with several processes, the count of all of them
            if mask is None:
                total = total + distance.sum() / global_count(distance.numel(), distance.device)
            else:
                valid = mask.to(torch.bool)
                total = total + torch.where(valid, distance, 0.0).sum() / global_count(valid.sum())
        return total / max(len(self.pairs), 1)


@hookimpl
def makd_register_aspects(register):
    register(HiddenCosine)
