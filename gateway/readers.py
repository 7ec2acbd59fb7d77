"""Typed values out of TOML tables and the environment, every problem recorded with its location.

A problem never shows a config value that could be a secret: it names the setting, and shows a value only when it
cannot be one (a number, true/false, a short lowercase word such as a period); anything else is described.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Settings that name, or may hold, a secret: a problem with one never shows its value, whatever its shape.
SENSITIVE = frozenset(
    {
        "value",
        "value_env",
        "value_file",
        "url",
        "url_env",
        "base_url",
        "secret_env",
        "endpoint_url",
        "admin_token_env",
        "metrics_token_env",
        "key_sha256",
    }
)  # a key pasted for its hash
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Named in a problem only in the conventional shape: an identifier-shaped token (ghp_…, AKIA…) set where a
# variable name belongs must not be echoed either.
_SHOWN_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,11}|[A-Z_][A-Z0-9]*_[A-Z0-9_]{0,50}")
_WORD = re.compile(r"[a-z][a-z_]{0,19}")
MAX_USD = 10**9  # a budget above it is no budget anyone means (and 1e300 has no exact micro-dollar count)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Each kind of setting: the check a value must pass, and what the problem says was expected.
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int+": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "int0": (lambda v: _is_int(v) and v >= 0, "an integer ≥ 0"),
    "num+": (lambda v: is_num(v) and v > 0, "a positive number"),
    "num0": (lambda v: is_num(v) and v >= 0, "a number ≥ 0"),
    "usd": (lambda v: is_num(v) and 0 <= v <= MAX_USD, "a number of dollars from 0 to 1000000000"),
    "port": (lambda v: _is_int(v) and 0 < v <= 65535, "a port from 1 to 65535"),
    "strlist": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings"),
    "fractions": (  # alert_thresholds: [] sends no alert
        lambda v: isinstance(v, list) and len(v) <= 10 and all(is_num(x) and 0 < x <= 1 for x in v),
        "a list of at most 10 fractions of the budget, each > 0 and ≤ 1, such as [0.8, 1.0]",
    ),
    "sha256": (
        lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
        "64 lowercase hex characters",
    ),
}


_CONTAINER_KINDS: dict[type, str] = {list: "a list", dict: "a table"}


def at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    return _CONTAINER_KINDS.get(type(value), "a date or time")


def shown(value: Any) -> str:
    """`value` as a problem may show it: itself when it cannot be a secret, else what kind of value it is."""
    if is_num(value) or isinstance(value, bool) or (isinstance(value, str) and _WORD.fullmatch(value)):
        return repr(value)
    return kind_of(value)


def env_var(name: str) -> str:
    return f"environment variable {name}" if _SHOWN_ENV_NAME.fullmatch(name) else "the environment variable it names"


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

    def get(
        self, data: dict[str, Any], key: str, where: str, kind: str, default: Any = None, required: bool = False
    ) -> Any:
        if key not in data:
            if required:
                self.problem(at(where, key), "is required")
            return default
        value = data[key]
        check, expected = KINDS[kind]
        if not check(value):
            got = kind_of(value) if key in SENSITIVE else shown(value)
            self.problem(at(where, key), f"expected {expected}, got {got}")
            return default
        return value

    def fields(self, data: dict[str, Any], where: str, kinds: Mapping[str, str]) -> dict[str, Any]:
        """The keys of `kinds` that are set and valid: a dataclass's own defaults fill in the rest."""
        values = {key: self.get(data, key, where, kind) for key, kind in kinds.items()}
        return {key: value for key, value in values.items() if value is not None}

    def members(self, data: dict[str, Any], key: str, where: str, known: set[str]) -> frozenset[str] | None:
        """An optional allow-list of models, each of the pricing table."""
        allow = self.get(data, key, where, "strlist")
        for number, name in enumerate(allow or (), start=1):
            if name not in known:
                self.problem(
                    at(where, key), f"entry {number} is not a model of the pricing table ({', '.join(sorted(known))})"
                )
        return None if allow is None else frozenset(allow)

    def secret_value(self, data: dict[str, Any], where: str, env: Mapping[str, str], base: Path) -> str | None:
        """A key's value, from the variable named by `value_env` or the file named by `value_file`."""
        if "value" in data:
            self.problem(at(where, "value"), "key values never go in the TOML; use value_env or value_file")
        if "value_env" in data and "value_file" in data:
            self.problem(where, "set value_env or value_file, not both")
        elif "value_env" in data:
            return self.from_env(env, data, "value_env", where, required=True)
        elif "value_file" in data:
            return self.from_file(data, "value_file", where, base)
        else:
            self.problem(where, "needs value_env or value_file")
        return None

    def env_name(self, data: dict[str, Any], key: str, where: str) -> str | None:
        """The variable name set at `key`; a key, token or URL set there instead is a problem, never shown."""
        name: str | None = self.get(data, key, where, "str")
        if name and not _ENV_NAME.fullmatch(name):
            self.problem(
                at(where, key),
                "expected the name of an environment variable (letters, digits and _), "
                "not a value; what is set is not shown",
            )
            return None
        return name

    def from_env(
        self, env: Mapping[str, str], data: dict[str, Any], key: str, where: str, required: bool = False
    ) -> str | None:
        """The secret in the variable named at `key`: None when that is unset or empty (a problem if required)."""
        name = self.env_name(data, key, where)
        if not name:
            return None
        value = self.secret_text(env.get(name, ""), at(where, key), env_var(name))
        if value == "" and required:
            self.problem(at(where, key), f"{env_var(name)} is {'empty' if name in env else 'not set'}")
        return value or None

    def from_file(self, data: dict[str, Any], key: str, where: str, base: Path) -> str | None:
        """The secret in the file named at `key`, relative to the config's directory."""
        path = self.get(data, key, where, "str")
        if not path:
            return None
        try:
            raw = (base / path).read_text(encoding="utf-8")
        except OSError as exc:
            relative = "" if Path(path).is_absolute() else " (relative to the config's directory)"
            self.problem(at(where, key), f"cannot read the file it names{relative}: {exc.strerror}")
            return None
        except UnicodeDecodeError:
            self.problem(at(where, key), "the file it names is not UTF-8 text")
            return None
        value = self.secret_text(raw, at(where, key), "the file it names")
        if value == "":
            self.problem(at(where, key), "the file it names is empty")
        return value or None

    def secret_text(self, raw: str, where: str, source: str) -> str | None:
        """Surrounding white space goes (a secret file's trailing newline); a control character left is a problem."""
        value = raw.strip()
        if any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
            self.problem(where, f"{source} holds a control character (the value is not shown)")
            return None
        return value
