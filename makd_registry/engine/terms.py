"""Per-term loss values under their hierarchical names (``makd/layerwise/hidden``)."""

from __future__ import annotations

from typing import Any

import torch


class TermRecorder:
    """Record every objective node's (unweighted) loss of the last step.

    Each node's ``loss`` is wrapped on the instance, so third-party combinators are
    covered too. Values are kept as detached tensors (no device sync) until :meth:`pop`.
    """

    def __init__(self, root: Any) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}
        for node in root.walk():
            node.loss = self._wrap(node.loss, node.path)

    def _wrap(self, fn: Any, path: str) -> Any:
        def loss(features: Any) -> torch.Tensor:
            value = fn(features)
            self.values.setdefault(path, []).append(value.detach())
            return value

        return loss

    def pop(self) -> dict[str, float]:
        """Mean value per node since the last call (micro-batches averaged)."""
        out = {path: float(torch.stack(vs).float().mean()) for path, vs in self.values.items()}
        self.values.clear()
        return out
