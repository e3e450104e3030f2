"""Batches: right-padded tensors from tokenised rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

PAD_LABEL = -100


def collate(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (with ``pad_id``), ``attention_mask``, ``token_type_ids`` and
    ``loss_mask`` (with 0) and token-level ``labels`` / ``generated`` (with -100) to the
    longest row; example-level ones (an int, or QA's ``[start, end]``) are stacked."""
    longest = max(len(r["input_ids"]) for r in rows)
    out: dict[str, torch.Tensor] = {}
    for key, fill in (
        ("input_ids", pad_id),
        ("attention_mask", 0),
        ("token_type_ids", 0),
        ("loss_mask", 0),
    ):
        if key in rows[0]:
            out[key] = torch.tensor(
                [list(r[key]) + [fill] * (longest - len(r[key])) for r in rows], dtype=torch.long
            )
    for key in ("labels", "generated"):
        if key not in rows[0]:
            continue
        first = rows[0][key]
        token_level = isinstance(first, list) and len(first) == len(rows[0]["input_ids"])
        if token_level:
            out[key] = torch.tensor(
                [list(r[key]) + [PAD_LABEL] * (longest - len(r[key])) for r in rows],
                dtype=torch.long,
            )
        else:
            out[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
    return out
