"""Task records as Redis hashes: a Task's fields encoded for a script, and a hash's pairs decoded back."""

from __future__ import annotations

from typing import Any, get_args, get_type_hints

from gateway.store.base import TASK_FIELDS, Task


def decoder_for(hint: Any) -> Any:
    base = next((a for a in get_args(hint) if a is not type(None)), hint)
    return {bool: lambda b: b == b"1", int: int, float: float, bytes: bytes}.get(base, bytes.decode)


_DECODE = {name: decoder_for(hint) for name, hint in get_type_hints(Task).items()}


def encode_task(task: Task) -> list[Any]:
    """A task as hash field/value pairs; None fields are left out, booleans are 0/1."""
    pairs: list[Any] = []
    for name in TASK_FIELDS:
        value = getattr(task, name)
        if value is not None:
            pairs += [name, int(value) if isinstance(value, bool) else value]
    return pairs


def admitted_fields(task: Task) -> tuple[list[str], list[Any]]:
    """A new task's fields as strings (for the admission's JSON) and its bytes fields as pairs (any byte)."""
    text: list[str] = []
    raw: list[Any] = []
    pairs = encode_task(task)
    for name, value in zip(pairs[::2], pairs[1::2], strict=True):
        if isinstance(value, bytes):
            raw += [name, value]
        else:
            text += [name, value if isinstance(value, str) else repr(value)]
    return text, raw


def decode_task(pairs: list[bytes] | None) -> Task | None:
    if not pairs:
        return None
    it = iter(pairs)
    return Task(**{(name := k.decode()): _DECODE[name](v) for k, v in zip(it, it, strict=True)})
