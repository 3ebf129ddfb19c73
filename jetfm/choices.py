"""Config choices: every "one of these strings" setting is a `typing.Literal` field, checked here.

    @dataclass
    class TrainConfig:
        precision: Literal["fp32", "bf16", "fp16"] = "fp32"

        def __post_init__(self):
            check_choices(self, "train")   # also when built in Python, not only from YAML

The Literal is the only list of the allowed values: the YAML loader (jetfm/config.py), the
`--keys` listing and this check all read it, and the error names the dotted key, the allowed
values and the closest one:

    train.precision: must be one of 'fp32', 'bf16', 'fp16', got 'bf61' (did you mean 'bf16'?)

Imports nothing from jetfm, so every config section (data, models, tokenizer, finetune) can use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, Literal


def choice_error(key: str, allowed: tuple, value: Any) -> str:
    """The message for `value` not in `allowed` at dotted `key`."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}{hint}"


def is_choice(value: Any, allowed: tuple) -> bool:
    """`value` is one of `allowed`, of the same type (True is not 1)."""
    return any(value == a and type(value) is type(a) for a in allowed)


@functools.cache
def literal_fields(cls) -> dict[str, tuple]:
    """{field name: allowed values} of the Literal (or Optional Literal) fields of dataclass `cls`."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp) if typing.get_origin(tp) is not Literal else (tp,)
        for arg in args:
            if typing.get_origin(arg) is Literal:
                out[f.name] = typing.get_args(arg) + ((None,) if type(None) in args else ())
    return out


def check_choices(section, prefix: str) -> None:
    """Raise ValueError (message from `choice_error`) for any Literal field of `section` holding another value."""
    for name, allowed in literal_fields(type(section)).items():
        value = getattr(section, name)
        if not is_choice(value, allowed):
            raise ValueError(choice_error(f"{prefix}.{name}" if prefix else name, allowed, value))
