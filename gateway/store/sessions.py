"""Console sessions as both stores keep them (the Store protocol's Console section in base.py, SPEC §16)."""

from __future__ import annotations

from dataclasses import dataclass

UNKNOWN_SCAN = 20_000  # ledger rows a store without an index of unknown rows looks at for unknown_tasks


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    """A console sign-in, found by the SHA-256 of its random id (hex): the id itself lives only in the browser's
    cookie. `kind` says who signed in: "key" (a gateway key: `subject` is the key's SHA-256, hex), "operator"
    (the admin token: `subject` is its SHA-256, so a new token ends the old sessions) or "sso" (a trusted
    header: `subject` is the user's name). Times are unix seconds."""

    id_sha256: str
    kind: str
    subject: str
    created_at: float
    expires_at: float
