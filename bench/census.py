"""Which containers in this process grow: every dict, list, set and deque the collector tracks, measured at
moments of a long run, and the ones that grew between each moment and the next, named by who holds them
(`Owner.attribute`, `module.NAME`, or the type that holds it). For bench/soak_inprocess.py."""

from __future__ import annotations

import gc
import sys
from collections import OrderedDict, deque
from types import CellType, FrameType, FunctionType, ModuleType
from typing import Any

KINDS = (dict, list, set, deque, OrderedDict)
MIN_LEN = 256  # smaller containers are not followed


def measure() -> dict[int, tuple[Any, int]]:
    """id → (the container, its length), for every tracked container of at least MIN_LEN items."""
    gc.collect()
    return {id(obj): (obj, len(obj)) for obj in gc.get_objects() if isinstance(obj, KINDS) and len(obj) >= MIN_LEN}


def deep_size(obj: Any, limit: int = 2_000_000) -> int:
    """The bytes of `obj` and of what it holds (containers, instances' attributes and slots, strings, bytes),
    each object counted once; classes, modules and functions are not followed. At most `limit` objects."""
    seen: set[int] = set()
    stack = [obj]
    total = 0
    while stack and len(seen) < limit:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (type, ModuleType, FunctionType, FrameType)):
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset, deque)):
            stack.extend(item)
        else:
            if hasattr(item, "__dict__"):
                stack.append(vars(item))
            for name in getattr(type(item), "__slots__", ()):
                if hasattr(item, name):
                    stack.append(getattr(item, name))
    return total


def largest(moment: dict[int, tuple[Any, int]], top: int = 12) -> list[dict[str, Any]]:
    """The containers of a moment holding the most bytes, named, with their lengths."""
    sized = sorted(((deep_size(obj), obj, size) for obj, size in moment.values()), key=lambda t: t[0], reverse=True)
    return [
        {"held_by": name_of(obj), "kind": type(obj).__name__, "length": size, "mb": round(nbytes / 2**20, 1)}
        for nbytes, obj, size in sized[:top]
    ]


def growers(moments: list[dict[int, tuple[Any, int]]], top: int = 25) -> list[dict[str, Any]]:
    """The containers present at the last moments that grew between every two of them, most growth first."""
    if len(moments) < 2:
        return []
    found = []
    for ident, (obj, _size) in moments[-1].items():
        lengths = []
        for moment in moments:  # loops, not comprehensions: a comprehension's closure would hold obj too
            seen = moment.get(ident)
            if seen is not None and seen[0] is obj:
                lengths.append(seen[1])
        if len(lengths) >= 2 and all(b > a for a, b in zip(lengths, lengths[1:], strict=False)):
            found.append({"held_by": name_of(obj), "kind": type(obj).__name__, "lengths": lengths})
    found.sort(key=lambda g: g["lengths"][-1] - g["lengths"][0], reverse=True)
    return found[:top]


def name_of(obj: Any, depth: int = 3) -> str:
    """Who holds `obj`: an attribute of an instance or a module, a key of a dict, or a type that holds it."""
    for holder in gc.get_referrers(obj):
        if isinstance(holder, FrameType) and holder.f_code.co_filename == __file__:
            continue  # this module's own frames (the measurements, tuples, are passed over below)
        if isinstance(holder, dict):
            key = _key_of(holder, obj)
            if key is None:
                continue
            owner = _owner_of(holder)
            if isinstance(owner, ModuleType):
                return f"{owner.__name__}.{key}"
            if owner is not None:
                inner = f"<{type(owner).__module__}.{type(owner).__qualname__}>.{key}"
                return f"{name_of(owner, depth - 1)} → {inner}" if depth > 1 else inner
            if depth > 1:
                return f"{name_of(holder, depth - 1)}[{key!r}]"
            return f"<dict>[{key!r}]"
        if isinstance(holder, CellType):
            return _closure_of(holder)
        if not isinstance(holder, (*KINDS, tuple, FrameType)):
            kind = f"{type(holder).__module__}.{type(holder).__qualname__}"
            attr = _key_of(vars(holder), obj) if hasattr(holder, "__dict__") else None
            inner = f"<{kind}>" + (f".{attr}" if attr else "")
            return f"{name_of(holder, depth - 1)} → {inner}" if depth > 1 else inner
    return "?"


def _closure_of(cell: CellType) -> str:
    """A variable a function closes over, `module.function:name`, or a running frame's cell variable."""
    for holder in gc.get_referrers(cell):
        if isinstance(holder, FrameType):
            return f"{holder.f_code.co_filename}:{holder.f_code.co_qualname} (a variable of a running frame)"
        if not isinstance(holder, tuple):
            continue
        for fn in gc.get_referrers(holder):
            if isinstance(fn, FunctionType) and fn.__closure__ is holder:
                name = fn.__code__.co_freevars[holder.index(cell)]
                return f"{fn.__module__}.{fn.__qualname__}:{name}"
    return "<cell: " + ", ".join(type(h).__name__ for h in gc.get_referrers(cell)) + ">"


def _key_of(holder: dict[Any, Any], obj: Any) -> Any:
    """The key under which `holder` holds `obj` (a loop, not a generator: a closure would hold obj too)."""
    for key, value in holder.items():
        if value is obj:
            return key
    return None


def _owner_of(namespace: dict[str, Any]) -> Any:
    """The instance or module whose __dict__ `namespace` is, or None."""
    for holder in gc.get_referrers(namespace):
        if isinstance(holder, ModuleType) and holder.__dict__ is namespace:
            return holder
        if not isinstance(holder, type) and getattr(holder, "__dict__", None) is namespace:
            return holder
    return None
