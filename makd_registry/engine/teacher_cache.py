"""The teacher-output cache: the teacher's features computed once, reused in later epochs.

During the first pass over the training set, the features the objective needs from the
teacher (and the teacher module inputs that student matrices are applied to) are stored per
training example, without padding, in half precision (``float16`` or ``bfloat16``). When
every example has been seen, the store is written to one safetensors file in the run
directory and memory-mapped; from then on a batch's teacher features are assembled from it
(padded to the batch's length) instead of running the teacher.

For language models ``top_k`` keeps only the k largest teacher logits per token and the log
of the probability mass outside them, handed to the aspects as
:class:`~makd_registry.features.TopKLogits` (an approximation, off by default): at
temperature 1 the rest of the mass is one bucket, at other temperatures the top k are
renormalised. The logits KD's forward KL reads
the k entries directly; an aspect that asks for the dense logits gets them with every other
entry at a large negative value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..features import Feature, TopKLogits

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_LOW = -1e4  # QA span logits at padded positions


def _trim(feature: Feature, x: torch.Tensor, length: int, logits: str) -> torch.Tensor:
    """One example's tensor without its padded positions (``logits``: ``example`` (C,),
    ``token`` (T, V) or ``span`` (2, T) for QA)."""
    if feature is Feature.LOGITS:
        if logits == "example":
            return x
        return x[:length] if logits == "token" else x[:, :length]
    if feature is Feature.ATTENTION_PROBS:
        return x[:, :length, :length]
    if feature in (Feature.ATTENTION_QUERY, Feature.ATTENTION_KEY, Feature.ATTENTION_VALUE):
        return x[:, :length]
    return x[:length]  # (T, ·) hidden states, projections, module inputs


def _pad(feature: Feature, x: torch.Tensor, length: int, logits: str) -> torch.Tensor:
    """One example's tensor padded back to ``length`` tokens with zeros (QA span logits with
    a large negative value, as the engine masks them)."""
    if feature is Feature.LOGITS:
        if logits == "example":
            return x
        if logits == "span":
            return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=_LOW)
    if feature is Feature.ATTENTION_PROBS:
        n = x.shape[-1]
        return torch.nn.functional.pad(x, (0, length - n, 0, length - n))
    if feature in (Feature.ATTENTION_QUERY, Feature.ATTENTION_KEY, Feature.ATTENTION_VALUE):
        return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1]))
    pad = [0, 0] * (x.dim() - 1) + [0, length - x.shape[0]]
    return torch.nn.functional.pad(x, pad)


def feature_name(index: int, table: str, feature: Feature, layer: Any) -> str:
    """The stored tensor of one row's feature: ``ROW/TABLE/FEATURE/LAYER`` (``TABLE``: ``f``
    features, ``i`` teacher module inputs); top-k logits add ``/v`` (values), ``/k`` (ids)
    and ``/r`` (the log of the mass outside the top k)."""
    return f"{index}/{table}/{feature.value}/{layer}"


def row_entries(
    indices: list[int],
    lengths: list[int],
    features: dict,
    inputs: dict,
    *,
    dtype: torch.dtype,
    top_k: int | None,
    logits: str,
) -> dict[str, torch.Tensor]:
    """The tensors to store for a batch's teacher features and module inputs
    (``(feature, layer)`` tables, batch-first): one per row, feature and layer, without
    padding, in ``dtype``; token-level LM logits with ``top_k`` as their k largest values,
    int32 ids and the fp32 log of the rest of the mass (at temperature 1)."""
    out: dict[str, torch.Tensor] = {}
    for table, values in (("f", features), ("i", inputs)):
        for (feature, layer), tensor in values.items():
            if feature is Feature.GENERATED:
                continue
            for row, (index, length) in enumerate(zip(indices, lengths, strict=True)):
                x = _trim(feature, tensor[row].detach(), length, logits)
                name = feature_name(index, table, feature, layer)
                if feature is Feature.LOGITS and top_k and logits == "token":
                    full = x.float()
                    values_k, idx = full.topk(top_k, dim=-1)
                    # the log of the mass outside the top k (at temperature 1)
                    rest = full.scatter(-1, idx, float("-inf")).logsumexp(-1)
                    residual = rest - full.logsumexp(-1)
                    out[name + "/v"] = values_k.to(dtype).cpu().contiguous()
                    out[name + "/k"] = idx.to(torch.int32).cpu().contiguous()
                    out[name + "/r"] = residual.cpu().contiguous()
                    continue
                out[name] = x.to(dtype).cpu().contiguous()
    return out


class StoredRows:
    """Teacher features stored per row (:func:`row_entries`), read back as a batch's
    features: the one reading path of the in-run cache (:class:`TeacherCache`) and of the
    offline teacher artifact (:mod:`.teacher_artifact`). Subclasses say where a row's
    tensor is (:meth:`tensor`)."""

    top_k: int | None = None
    logits: str = "example"

    def tensor(self, name: str, index: int) -> torch.Tensor:
        """The stored tensor ``name`` of row ``index``."""
        raise NotImplementedError

    def assemble(
        self,
        indices: list[int],
        length: int,
        plan: Any,
        device: torch.device,
        compute_dtype: torch.dtype,
        vocab: int | None,
    ) -> tuple[dict, dict]:
        """A batch's teacher features (and module inputs), padded to ``length`` tokens."""
        out: tuple[dict, dict] = ({}, {})
        wanted = [("f", f, layer) for f, layer in plan.teacher.features]
        wanted += [("i", f, layer) for f, layer in plan.teacher.module_inputs]
        for table, feature, layer in wanted:
            if self.top_k and feature is Feature.LOGITS and self.logits == "token":
                value: Any = self._top_k_logits(indices, table, layer, length, vocab, device)
            else:
                rows = []
                for index in indices:
                    x = self.tensor(feature_name(index, table, feature, layer), index)
                    rows.append(_pad(feature, x.to(compute_dtype), length, self.logits))
                value = torch.stack(rows).to(device)
            (out[0] if table == "f" else out[1])[(feature, layer)] = value
        return out

    def _top_k_logits(
        self,
        indices: list[int],
        table: str,
        layer: Any,
        length: int,
        vocab: int | None,
        device: torch.device,
    ) -> TopKLogits:
        """The batch's cached top-k logits, (B, T, k) values (fp32) and ids, padded rows
        holding zeros; never the (B, T, V) dense table."""
        if vocab is None:
            raise ValueError("a top-k teacher cache needs the teacher's vocab_size")
        k = self.top_k or 0
        values = torch.zeros(len(indices), length, k, dtype=torch.float32)
        # padded rows: distinct ids (0..k-1) with zero values, harmless if left unmasked
        ids = torch.arange(k, dtype=torch.long).expand(len(indices), length, k).clone()
        residual = torch.full((len(indices), length), float("-inf"))
        for row, index in enumerate(indices):
            name = feature_name(index, table, Feature.LOGITS, layer)
            v = self.tensor(name + "/v", index)
            values[row, : v.shape[0]] = v
            ids[row, : v.shape[0]] = self.tensor(name + "/k", index)
            residual[row, : v.shape[0]] = self.tensor(name + "/r", index)
        return TopKLogits(values.to(device), ids.to(device), vocab, residual.to(device))


class TeacherCache(StoredRows):
    """Per-example teacher features; see the module docstring."""

    def __init__(
        self,
        path: Path,
        size: int,
        *,
        dtype: str = "float16",
        top_k: int | None = None,
        logits: str = "example",
    ) -> None:
        self.path = path
        self.size = size
        self.dtype = _DTYPES[dtype]
        self.top_k = top_k
        self.logits = logits
        self.entries: dict[str, torch.Tensor] = {}
        self.seen: set[int] = set()
        self.reader: Any = None
        self.keys: list[tuple[str, Any, int | None]] | None = None
        if self.path.is_file():
            self._open()

    @property
    def complete(self) -> bool:
        return self.reader is not None

    def _open(self) -> None:
        from safetensors import safe_open

        self.reader = safe_open(str(self.path), framework="pt", device="cpu")
        self.entries.clear()

    def store(self, indices: list[int], lengths: list[int], features: dict, inputs: dict) -> None:
        """Keep a batch's teacher features (``(feature, layer)`` tables, batch-first)."""
        if self.complete:
            return
        self.entries.update(
            row_entries(
                indices,
                lengths,
                features,
                inputs,
                dtype=self.dtype,
                top_k=self.top_k,
                logits=self.logits,
            )
        )
        self.seen.update(indices)
        if len(self.seen) >= self.size:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(self.entries, str(tmp))
        tmp.replace(self.path)
        self._open()

    def tensor(self, name: str, index: int) -> torch.Tensor:
        return self.reader.get_tensor(name)
