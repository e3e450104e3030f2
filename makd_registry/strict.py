"""The strict pydantic base every objective-file model uses, and located validation errors."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError


def raise_at(
    loc: tuple[str | int, ...], code: str, message: str, value: Any = None, **ctx: Any
) -> None:
    """Raise a ``ValidationError`` located at ``loc`` (relative to the model being validated).

    ``message`` is a pydantic error template: ``{name}`` placeholders are filled from
    ``ctx``; quote values in the template itself (``'{name}'``).
    """
    raise ValidationError.from_exception_data(
        "makd",
        [
            InitErrorDetails(
                type=PydanticCustomError(code, message, ctx or None), loc=loc, input=value
            )
        ],
    )


def suggest(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class StrictModel(BaseModel):
    """A model that forbids unknown keys and names the allowed ones when it meets one."""

    model_config = ConfigDict(extra="forbid", validate_default=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        allowed = sorted({f.alias or name for name, f in cls.model_fields.items()})
        for key in data:
            if key not in allowed:
                if not isinstance(key, str):
                    raise_at(
                        (str(key),),
                        "key_type",
                        "keys must be strings, not {kind}",
                        key,
                        kind=type(key).__name__,
                    )
                raise_at(
                    (key,),
                    "unknown_key",
                    "unknown key '{key}'{hint} (allowed here: {allowed})",
                    data[key],
                    key=key,
                    hint=suggest(key, allowed),
                    allowed=", ".join(allowed),
                )
        return data
