"""The teacher's targets on the training set: generated once, stored, reused.

The generation service behind requirement providers (the built-in ``teacher_targets``
provider, used by sequence-level KD); the teacher labels every training example and the
result becomes the column ``generated`` (the ``GENERATED`` feature):

* classification and pair classification: the teacher's argmax class (pseudo-labels);
* extractive QA: the teacher's argmax start and end positions;
* causal LM: each training block's first tokens are a prompt and the teacher continues it
  (greedy, beam or sampled, as the options say) up to the block length; the training rows
  become these teacher sequences, and ``generated`` marks the generated tokens (the prompt
  and padding are -100, so the CE covers the teacher's tokens only);
* instruction: the teacher answers each training prompt (up to ``max_new_tokens``); the
  rows become prompt + the teacher's response, which ``generated``, ``labels`` and the
  ``loss_mask`` mark.

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
    if data.task == "instruction":
        return _generate_instruction(
            teacher, data, tokenizer, config, batch_size, device, autocast, pad
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


def decoding_options(config: Any) -> dict[str, Any]:
    """``generate`` keywords of decoding options (``decoding``: greedy, beam or sample,
    with ``num_beams``, ``temperature`` and ``top_p``; the model's generation config
    supplies the rest)."""
    if config.decoding == "greedy":
        return {"do_sample": False}
    if config.decoding == "beam":
        return {"do_sample": False, "num_beams": config.num_beams}
    return {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}


def _generate_instruction(teacher, data, tokenizer, config, batch_size, device, autocast, pad):
    """Instruction data: the teacher answers every training prompt; the rows become prompt
    + the teacher's response, ``generated`` (and ``labels``) the response tokens."""
    import torch

    train = data.train
    prompts = [list(r["input_ids"][: r["prompt_length"]]) for r in train]
    answers = continue_prompts(
        teacher,
        prompts,
        max_new_tokens=config.max_new_tokens,
        pad_id=pad,
        eos_id=tokenizer.eos_token_id,
        device=device,
        autocast=autocast,
        batch_size=batch_size,
        decoding=decoding_options(config),
    )
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    generated = torch.full((len(prompts), width), -100, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        row = p + a
        ids[i, : len(row)] = torch.tensor(row)
        generated[i, len(p) : len(row)] = torch.tensor(a)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "generated": generated}


def _generate_lm(
    teacher, train, tokenizer, config, batch_size, device, autocast, max_length, pad
) -> dict[str, Any]:
    import torch

    new = min(config.max_new_tokens, max_length - 1)
    prompt_len = max_length - new
    kwargs: dict[str, Any] = {"max_new_tokens": new, "min_new_tokens": 1, "pad_token_id": pad}
    kwargs.update(decoding_options(config))
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


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of ``prompts`` padded on the left to the longest."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def continue_prompts(
    model: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    device: Any,
    autocast: Any = None,
    batch_size: int = 16,
    decoding: dict[str, Any] | None = None,
) -> list[list[int]]:
    """Each prompt's continuation by ``model`` (a causal LM), batched with left padding,
    without gradients: greedy, or as ``decoding`` says (:func:`decoding_options`; sampling
    draws from the caller's random stream). A continuation ends after its first EOS (kept)
    and has at least one token. Batched and one-by-one greedy decoding give the same
    tokens."""
    import contextlib

    import torch

    ctx = autocast or contextlib.nullcontext
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": 1,
        "pad_token_id": pad_id,
    }
    if eos_id is not None:
        kwargs["eos_token_id"] = eos_id
    kwargs.update(decoding or {"do_sample": False})
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                ids, mask = _left_padded(prompts[start : start + batch_size], pad_id)
                width = ids.shape[1]
                with ctx():
                    seq = model.generate(
                        input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
                    )
                for row in seq[:, width:].tolist():
                    if eos_id is not None and eos_id in row:
                        row = row[: row.index(eos_id) + 1]
                    out.append(row)
    finally:
        model.train(was_training)
    return out


def sample_continuations(
    model: Any,
    prompts: list[list[int]],
    seeds: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
    eos_id: int | None,
    device: Any,
    autocast: Any = None,
) -> list[list[int]]:
    """Each prompt's continuation sampled from ``model`` at ``temperature`` (the whole
    distribution, no top-k or top-p cut), in one left-padded batch without gradients.

    Row ``i`` draws its noise from its own generator seeded with ``seeds[i]`` (Gumbel-max
    sampling: the argmax of ``logits / temperature`` plus Gumbel noise is a sample of the
    softmax), so a row's sample depends on its seed and its prompt only, not on the other
    rows of the batch: the same rows give the same samples however they are split into
    batches or processes. A continuation ends after its first EOS (kept)."""
    import contextlib

    import torch

    ctx = autocast or contextlib.nullcontext
    ids, mask = (t.to(device) for t in _left_padded(prompts, pad_id))
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    import inspect

    takes = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
    cache_arg = "cache" if "cache" in takes else "past_key_values"  # transformers 5 / older
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            past = None
            step_ids, step_pos = ids, positions
            for _ in range(max_new_tokens):
                with ctx():
                    res = model(
                        input_ids=step_ids,
                        attention_mask=mask,
                        position_ids=step_pos,
                        use_cache=True,
                        **{cache_arg: past},
                        **extra,
                    )
                past = res.get("cache", res.get("past_key_values"))
                logits = res.logits[:, -1].float() / temperature
                noise = torch.stack(
                    [torch.rand(logits.shape[-1], generator=g) for g in generators]
                ).to(logits.device)
                gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
                token = (logits + gumbel).argmax(-1)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                for i, t in enumerate(token.tolist()):
                    if not done[i]:
                        out[i].append(t)
                if eos_id is not None:
                    done |= token == eos_id
                if bool(done.all()):
                    break
                step_ids = token[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    finally:
        model.train(was_training)
    return out


def apply_targets(data: Any, targets: dict[str, Any]) -> Any:
    """``data.train`` with the teacher's targets as the ``generated`` column (causal LM: the
    teacher's sequences as the rows)."""
    import datasets

    if "input_ids" in targets:
        ids = targets["input_ids"].tolist()
        mask = targets["attention_mask"].tolist()
        gen = targets["generated"].tolist()
        rows = {
            "input_ids": [r[: sum(m)] for r, m in zip(ids, mask, strict=True)],
            "attention_mask": [m[: sum(m)] for m in mask],
            "labels": [r[: sum(m)] for r, m in zip(ids, mask, strict=True)],
            "generated": [g[: sum(m)] for g, m in zip(gen, mask, strict=True)],
        }
        if data.task == "instruction":
            rows["prompt_length"] = [next(i for i, v in enumerate(g) if v != -100) for g in gen]
            if "loss_mask" in data.train.column_names:  # loss_on: response
                rows["labels"] = [list(g) for g in rows["generated"]]
                rows["loss_mask"] = [[int(v != -100) for v in g] for g in rows["generated"]]
        data.train = datasets.Dataset.from_dict(rows)
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
