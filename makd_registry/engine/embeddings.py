"""The student's input embeddings during training: frozen on request, and on the CPU their
gradient written into one persistent buffer.

A word-embedding table is most of a small student's parameters (30,522 × 384 for a BERT
vocabulary: 11.7 M of 15.6 M). Its dense gradient is a fresh table of zeros every backward
(on the CPU, each such allocation of tens of MB costs page faults on every step) with a few
hundred rows filled in. :class:`EmbeddingGradients` has the embedding produce a sparse
gradient (the rows the batch used) and adds it into a dense buffer that lives across steps:
the optimizer sees the same dense gradient, computed without the fresh allocation.

``training.embeddings: freeze`` keeps the input embeddings (and an output layer tied to them)
fixed: they get no gradient and no optimizer state at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def input_embedding(model: Any) -> nn.Embedding | None:
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    return embedding if isinstance(embedding, nn.Embedding) else None


def _tied(model: Any, embedding: nn.Embedding) -> bool:
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    return output is not None and getattr(output, "weight", None) is embedding.weight


def freeze_input_embeddings(model: Any) -> None:
    """``training.embeddings: freeze``: no gradient for the word embeddings (nor a tied
    output layer: it is the same tensor)."""
    embedding = input_embedding(model)
    if embedding is not None:
        embedding.weight.requires_grad_(False)


class EmbeddingGradients:
    """The sparse-to-dense gradient path of the student's word embeddings on the CPU (see
    the module docstring). Inactive on accelerators (their allocators reuse memory), for
    tied embeddings (the output layer's gradient is dense anyway), frozen ones, ``max_norm``
    embeddings, and compiled students."""

    def __init__(
        self, model: Any, device: torch.device, *, compiled: bool = False, enabled: bool = True
    ) -> None:
        embedding = input_embedding(model)
        self.embedding = None
        self.buffer: torch.Tensor | None = None
        if (
            not enabled  # a wrapper that reduces gradients itself (ddp, fsdp)
            or embedding is None
            or device.type != "cpu"
            or compiled
            or not embedding.weight.requires_grad
            or embedding.max_norm is not None
            or embedding.sparse
            or _tied(model, embedding)
        ):
            return
        self.embedding = embedding
        embedding.sparse = True

    def densify(self) -> None:
        """After backward: the accumulated sparse gradient as the dense gradient."""
        if self.embedding is None:
            return
        weight = self.embedding.weight
        grad = weight.grad
        if grad is None or not grad.is_sparse:
            return
        if self.buffer is None:
            self.buffer = torch.zeros_like(weight)
        else:
            self.buffer.zero_()
        rows, values = grad._indices()[0], grad._values()
        self.buffer.index_add_(0, rows, values.to(self.buffer.dtype))
        weight.grad = self.buffer

    def close(self) -> None:
        if self.embedding is not None:
            self.embedding.sparse = False
            self.embedding = None
        self.buffer = None
