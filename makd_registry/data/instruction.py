"""Instruction data: prompts and responses, tokenised for training and for evaluation.

A row is written as a **prompt** and a **response**:

* ``template: plain`` (the default): the prompt is ``instruction + "\\n\\n"`` followed, when
  the row has one, by ``input + "\\n\\n"``; the response is ``output``, then the
  tokenizer's EOS token;
* ``template: chat``: the same instruction and input as one user turn, rendered with the
  tokenizer's chat template (``add_generation_prompt``); the response is what the template
  writes for the assistant's turn (its end-of-turn tokens included);
* ``messages_column``: a conversation; every message but the last is the prompt (chat
  template), the last (the assistant's) is the response.

The prompt and the response are tokenised separately, so that training sees exactly the
prompt tokens that evaluation generates from. A training row is ``prompt + response``
with ``labels`` -100 on the prompt and, for ``loss_on: response``, ``loss_mask`` 1 on the
response tokens (with ``loss_on: all`` every token is in the loss, and ``labels`` cover
the prompt too; evaluation rows always label the response alone, whose perplexity is
reported). A pair longer than ``max_length`` keeps at most ``max_length - min(prompt,
max_length / 2)`` response tokens, and the prompt is shortened **inside its content** (the
input, else the instruction, or the last user message, cut at its end), so the template's
start and its end (the separator or generation prompt the response follows) stay.
Evaluation prompts leave room for ``max_new_tokens`` (at least half of ``max_length``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .sources import DataError, row_list

SEPARATOR = "\n\n"


@dataclass
class Example:
    """One row's texts: the prompt's parts, so that its content can be shortened."""

    #: messages of the prompt (chat) or None (plain)
    history: list[dict[str, str]] | None
    instruction: str
    extra: str  # the input (plain), or "" (chat: inside the last user message)
    response: str  # the reference response text
    chat: bool


def _is_chat(spec: Any) -> bool:
    return spec.messages_column is not None or spec.template == "chat"


def _examples(spec: Any, raw: Any, tokenizer: Any, where: str) -> list[Example]:
    chat = _is_chat(spec)
    if chat and not getattr(tokenizer, "chat_template", None):
        why = "messages_column" if spec.messages_column is not None else "template: chat"
        raise DataError(
            f"{where}: {why} renders prompts with the tokenizer's chat template, but the "
            f"tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) "
            "has none: use template: plain with instruction/input/output columns, or a "
            "tokenizer with a chat_template"
        )
    out = []
    for row in raw:
        if spec.messages_column is not None:
            messages = [
                {"role": m["role"], "content": m["content"]} for m in row[spec.messages_column]
            ]
            out.append(Example(messages[:-1], "", "", messages[-1]["content"].strip(), True))
            continue
        instruction = row[spec.instruction_column].strip()
        extra = (row.get(spec.input_column) or "").strip()
        response = row[spec.output_column].strip()
        if chat:
            content = instruction + (SEPARATOR + extra if extra else "")
            history = [{"role": "user", "content": content}]
            out.append(Example(history, "", "", response, True))
        else:
            out.append(Example(None, instruction, extra, response, False))
    return out


def prompt_text(example: Example, tokenizer: Any) -> str:
    """The prompt as text (the plain format, or the chat template's rendering)."""
    if not example.chat:
        text = example.instruction + SEPARATOR
        return text + (example.extra + SEPARATOR if example.extra else "")
    return tokenizer.apply_chat_template(
        example.history, tokenize=False, add_generation_prompt=True
    )


def _response_text(example: Example, tokenizer: Any) -> tuple[str, bool]:
    """The response as the model writes it, and whether EOS must be appended (plain, or a
    chat template that does not render the prompt as a prefix of the conversation)."""
    if not example.chat:
        return example.response, True
    prompt = prompt_text(example, tokenizer)
    full = tokenizer.apply_chat_template(
        [*example.history, {"role": "assistant", "content": example.response}], tokenize=False
    )
    if full.startswith(prompt) and full[len(prompt) :].strip():
        return full[len(prompt) :], False
    return example.response, True


def _encode(tokenizer: Any, text: str, *, specials: bool) -> list[int]:
    from ..models.loading import quiet_transformers

    with quiet_transformers():  # a long text is cut afterwards: no "longer than" warning
        return list(tokenizer(text, add_special_tokens=specials)["input_ids"])


def _prompt_ids(example: Example, tokenizer: Any) -> list[int]:
    # plain prompts get the tokenizer's special tokens (a BOS); a chat template writes its own
    return _encode(tokenizer, prompt_text(example, tokenizer), specials=not example.chat)


def _shorten(example: Example, tokenizer: Any, room: int) -> list[int] | None:
    """The prompt's ids within ``room`` tokens, its content cut at its end (the input,
    else the instruction, or the last user message); None if even an empty content does
    not fit."""
    ids = _prompt_ids(example, tokenizer)
    if len(ids) <= room:
        return ids
    import copy

    short = copy.deepcopy(example)

    def get() -> str:
        if short.chat:
            return short.history[-1]["content"] if short.history else ""
        return short.extra or short.instruction

    def put(text: str) -> None:
        if short.chat:
            short.history[-1]["content"] = text
        elif short.extra:
            short.extra = text
        else:
            short.instruction = text

    for _ in range(64):
        text = get()
        excess = len(ids) - room
        if excess <= 0:
            return ids
        if not text:
            return None
        per_token = max(len(text) / max(len(_encode(tokenizer, text, specials=False)), 1), 1.0)
        cut = max(1, int(excess * per_token))
        put(text[: max(len(text) - cut, 0)].rstrip())
        ids = _prompt_ids(short, tokenizer)
    return ids if len(ids) <= room else None


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[int, list[int]]:
    """``(prompt room, response)`` of a training pair in ``max_length`` tokens: the
    response keeps at most ``max_length - min(len(prompt), max_length // 2)`` tokens."""
    response = response[: max_length - min(len(prompt), max_length // 2)]
    return max_length - len(response), response


def tokenise_instruction(
    spec: Any, raw: Any, tokenizer: Any, *, train: bool, where: str
) -> tuple[Any, Any]:
    """Training (or validation) rows of instruction data, and for validation the
    generation prompts and references (see the module docstring)."""
    import datasets

    n = spec.max_length
    eos = tokenizer.eos_token_id
    examples = _examples(spec, raw, tokenizer, where)
    rows: dict[str, list[Any]] = {
        "input_ids": [],
        "attention_mask": [],
        "labels": [],
        "prompt_length": [],
    }
    if spec.loss_on == "response":
        rows["loss_mask"] = []
    too_long: list[int] = []
    prompts, prompt_ids = [], []
    ids_col = raw["id"] if "id" in raw.column_names else None
    for i, example in enumerate(examples):
        text, add_eos = _response_text(example, tokenizer)
        response = _encode(tokenizer, text, specials=False)
        if add_eos and eos is not None:
            response.append(int(eos))
        full_prompt = _prompt_ids(example, tokenizer)
        room, response = fit(full_prompt, response, n)
        prompt = _shorten(example, tokenizer, room)
        if prompt is None:
            too_long.append(i)
            continue
        ids = prompt + response
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        if spec.loss_on == "response" or not train:  # evaluation: the responses' perplexity
            rows["labels"].append([-100] * len(prompt) + response)
        else:
            rows["labels"].append(list(ids))
        if spec.loss_on == "response":
            rows["loss_mask"].append([0] * len(prompt) + [1] * len(response))
        rows["prompt_length"].append(len(prompt))
        if not train:
            room = max(n - spec.max_new_tokens, n // 2)
            alone = _shorten(example, tokenizer, room)
            prompt_ids.append(alone if alone is not None else prompt[:room])
            prompts.append(prompt_text(example, tokenizer))
    if too_long:
        raise DataError(
            f"{where}: {len(too_long)} of {len(examples)} prompts do not fit in "
            f"data.max_length ({n} tokens) even with their content removed "
            f"({row_list(too_long, ids_col)}): raise data.max_length"
        )
    data = datasets.Dataset.from_dict(rows)
    if train:
        return data, None
    return data, {
        "references": [e.response for e in examples],
        "prompts": prompts,
        "prompt_ids": prompt_ids,
    }
