"""Typed values out of TOML tables, every problem recorded with its location (the settings' parser uses it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


KINDS = {
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int+": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "int0": (lambda v: _is_int(v) and v >= 0, "an integer ≥ 0"),
    "num+": (lambda v: is_num(v) and v > 0, "a positive number"),
    "num0": (lambda v: is_num(v) and v >= 0, "a number ≥ 0"),
    "port": (lambda v: _is_int(v) and 0 < v <= 65535, "a port from 1 to 65535"),
    "strlist": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                "a list of strings"),
}


def at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class Reader:
    """Pulls typed fields out of TOML tables, recording every problem with its location."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def table(self, data: Any, where: str, allowed: set[str] | None) -> dict[str, Any]:
        """A TOML table; `allowed` None takes any key (teams, users, pricing)."""
        if not isinstance(data, dict):
            self.problem(where, "expected a table")
            return {}
        for key in sorted(set(data) - allowed) if allowed is not None else ():
            self.problem(at(where, key), "unknown setting")
        return data

    def get(self, data: dict, key: str, where: str, kind: str, default: Any = None,
            required: bool = False) -> Any:
        if key not in data:
            if required:
                self.problem(at(where, key), "is required")
            return default
        value = data[key]
        check, expected = KINDS[kind]
        if not check(value):
            self.problem(at(where, key), f"expected {expected}, got {value!r}")
            return default
        return value

    def fields(self, data: dict, where: str, kinds: Mapping[str, str]) -> dict[str, Any]:
        """The keys of `kinds` that are set and valid: a dataclass's own defaults fill in the rest."""
        values = {key: self.get(data, key, where, kind) for key, kind in kinds.items()}
        return {key: v for key, v in values.items() if v is not None}
