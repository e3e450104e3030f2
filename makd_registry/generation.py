"""The teacher's targets on the training set: generated once, stored, reused.

The generation service behind requirement providers (the built-in ``teacher_targets``
provider, used by sequence-level KD); the teacher labels every training example and the
result becomes the column ``generated`` (the ``GENERATED`` feature):

* classification and pair classification: the teacher's argmax class (pseudo-labels);
* extractive QA: the teacher's argmax start and end positions;
* causal LM: each training block's first tokens are a prompt and the teacher continues it
  (greedy, beam or sampled, as the options say) up to the block length; the training rows
  become these teacher sequences, and ``generated`` marks the generated tokens (the prompt
  and padding are -100, so the CE covers the teacher's tokens only).

Generation is batched; :func:`load_or_generate` stores the result as safetensors under a
key (:func:`cache_key`) of everything it depends on. torch is imported inside functions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .data.collate import collate


def cache_key(
    teacher_id: str,
    data_spec: Any,
    tokenizer: Any,
    options: dict[str, Any],
    generation: dict[str, Any],
    label: str,
) -> str:
    """The cache name of the targets: everything they depend on. ``options`` are the
    decoding options; ``generation`` the run's settings that shape the generation (seed,
    batch size, device, precision); ``label`` names the requester in the key."""
    payload = {
        "teacher": teacher_id,
        "data": data_spec.model_dump(mode="json"),
        "vocab": len(tokenizer),
        label: options,
        "generation": generation,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def generate_targets(
    teacher: Any,
    data: Any,
    tokenizer: Any,
    config: Any,
    *,
    batch_size: int,
    device: Any,
    autocast: Any,
    max_length: int,
) -> dict[str, Any]:
    """The teacher's targets for every training row (see the module docstring), without
    gradients. Sampling draws from the caller's random stream. ``config`` has
    ``decoding`` (greedy, beam, sample), ``num_beams``, ``max_new_tokens``, ``temperature``
    and ``top_p``."""
    import torch

    with torch.no_grad():
        return _generate(teacher, data, tokenizer, config, batch_size, device, autocast, max_length)


def _generate(teacher, data, tokenizer, config, batch_size, device, autocast, max_length):
    import torch

    teacher.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = int(pad or 0)
    train = data.train
    if data.task == "causal_lm":
        return _generate_lm(
            teacher, train, tokenizer, config, batch_size, device, autocast, max_length, pad
        )
    outputs = []
    for start in range(0, len(train), batch_size):
        rows = list(train.select(range(start, min(start + batch_size, len(train)))))
        batch = {k: v.to(device) for k, v in collate(rows, pad).items() if k != "labels"}
        with autocast():
            out = teacher(**batch)
        if data.task == "qa":
            outputs.append(torch.stack([out.start_logits.argmax(-1), out.end_logits.argmax(-1)], 1))
        else:
            outputs.append(out.logits.argmax(-1))
    return {"generated": torch.cat(outputs).cpu()}


def _generate_lm(
    teacher, train, tokenizer, config, batch_size, device, autocast, max_length, pad
) -> dict[str, Any]:
    import torch

    new = min(config.max_new_tokens, max_length - 1)
    prompt_len = max_length - new
    kwargs: dict[str, Any] = {"max_new_tokens": new, "min_new_tokens": 1, "pad_token_id": pad}
    if config.decoding == "greedy":
        kwargs["do_sample"] = False
    elif config.decoding == "beam":
        kwargs.update(do_sample=False, num_beams=config.num_beams)
    else:
        kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p)
    ids_out, gen_out = [], []
    for start in range(0, len(train), batch_size):
        rows = train.select(range(start, min(start + batch_size, len(train))))
        prompts = torch.tensor([r["input_ids"][:prompt_len] for r in rows], device=device)
        with autocast():
            seq = teacher.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), **kwargs
            )
        seq = seq[:, :max_length].cpu()
        if seq.shape[1] < max_length:
            fill = torch.full((seq.shape[0], max_length - seq.shape[1]), pad, dtype=seq.dtype)
            seq = torch.cat([seq, fill], 1)
        generated = seq.clone()
        generated[:, :prompt_len] = -100
        eos = tokenizer.eos_token_id
        if eos is not None:  # after the first EOS the rest is padding
            after = (seq[:, prompt_len:] == eos).int().cumsum(1) > 0
            shifted = torch.zeros_like(after)
            shifted[:, 1:] = after[:, :-1]
            generated[:, prompt_len:][shifted] = -100
        ids_out.append(seq)
        gen_out.append(generated)
    input_ids = torch.cat(ids_out)
    generated = torch.cat(gen_out)
    mask = torch.ones_like(input_ids)
    mask[:, prompt_len:] = (generated[:, prompt_len:] != -100).long()
    return {"input_ids": input_ids, "attention_mask": mask, "generated": generated}


def apply_targets(data: Any, targets: dict[str, Any]) -> Any:
    """``data.train`` with the teacher's targets as the ``generated`` column (causal LM: the
    teacher's sequences as the rows)."""
    import datasets

    if "input_ids" in targets:
        ids = targets["input_ids"].tolist()
        mask = targets["attention_mask"].tolist()
        gen = targets["generated"].tolist()
        data.train = datasets.Dataset.from_dict(
            {
                "input_ids": [r[: sum(m)] for r, m in zip(ids, mask, strict=True)],
                "attention_mask": [m[: sum(m)] for m in mask],
                "labels": [r[: sum(m)] for r, m in zip(ids, mask, strict=True)],
                "generated": [g[: sum(m)] for g, m in zip(gen, mask, strict=True)],
            }
        )
    else:
        data.train = data.train.add_column("generated", targets["generated"].tolist())
    return data


def load_or_generate(cache_file: Path, make: Any) -> tuple[dict[str, Any], bool]:
    """Targets from ``cache_file`` (safetensors) or ``make()``, stored atomically."""
    from safetensors.torch import load_file, save_file

    if cache_file.is_file():
        return load_file(cache_file), True
    targets = make()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in targets.items()}, str(tmp))
    tmp.replace(cache_file)
    return targets, False
