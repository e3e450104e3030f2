"""The enc384 case shared by the benchmarks: models' shapes, mapped layers, padded batches.

Teacher BERT 6 layers x 384 hidden x 12 heads (FFN 1536), student 2 layers x 384; the
uniform mapping pairs student 0 with teacher 2 and student 1 with teacher 5. Batches are
random token ids with rows padded to lengths between half and all of the sequence.
"""

from __future__ import annotations

import torch

TEACHER = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    num_labels=2,
)
PAIRS = [(0, 2), (1, 5)]


def padded_batch(size: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (row 0 full length) and binary ``labels``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (size, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (size,), generator=gen)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, 2, (size,), generator=gen)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}
