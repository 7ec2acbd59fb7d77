"""Reading the configuration's delivery sections: [[webhooks]] endpoints (URL and signing secret, never shown in
a problem) and [archive]. Part of gateway.config, which calls them with its Reader."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.readers import Reader, shown
from gateway.settings import WEBHOOK_EVENTS, ArchiveSettings, Secret, Team, WebhookEndpoint
from gateway.tenancy import valid_name

_WEBHOOK = {"retry_initial_s": "num+", "max_in_flight": "int+"}
_ARCHIVE = {"region": "str", "retention_days": "num+", "max_bytes_per_video": "int+"}


def _webhook_secret(reader: Reader, data: dict[str, Any], where: str, env: Mapping[str, str]) -> Secret | None:
    """The signing secret, from the variable `secret_env` names: "whsec_" + padded base64 of at least 16 bytes."""
    value = reader.from_env(env, data, "secret_env", where, required=True)
    if value is None:
        if "secret_env" not in data:
            reader.problem(f"{where}.secret_env", "is required")
        return None
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not value.startswith("whsec_") or len(key) < 16:
        reader.problem(
            f"{where}.secret_env",
            'the variable must hold "whsec_" + padded base64 of at least 16 random bytes (the value is not shown)',
        )
        return None
    return Secret(value)


def _webhook_url(reader: Reader, data: dict[str, Any], where: str) -> Secret | None:
    url = reader.get(data, "url", where, "str", required=True)
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        reader.problem(f"{where}.url", "expected an http:// or https:// URL (what is set is not shown)")
        return None
    return Secret(url)


def webhooks_of(
    reader: Reader, data: Any, env: Mapping[str, str], teams: Mapping[str, Team]
) -> tuple[WebhookEndpoint, ...]:
    if not isinstance(data, list):
        reader.problem("webhooks", "expected [[webhooks]] tables")
        return ()
    endpoints: dict[str, WebhookEndpoint] = {}
    for index, raw in enumerate(data):
        where = f"webhooks[{index}]"
        table = reader.table(raw, where, set(_WEBHOOK) | {"name", "url", "secret_env", "teams", "events"})
        name = reader.get(table, "name", where, "str", required=True)
        url = _webhook_url(reader, table, where)
        secret = _webhook_secret(reader, table, where, env)
        chosen = reader.get(table, "teams", where, "strlist")
        for team in sorted(t for t in set(chosen or ()) - set(teams) if not valid_name(t)):  # or one made by API
            reader.problem(f"{where}.teams", f"expected names of teams, [teams]' or the API's (got {shown(team)})")
        events = reader.get(table, "events", where, "strlist", default=list(WEBHOOK_EVENTS))
        if not events or set(events) - set(WEBHOOK_EVENTS):
            reader.problem(f"{where}.events", f"expected some of {', '.join(WEBHOOK_EVENTS)}")
        if name in endpoints:
            reader.problem(f"{where}.name", f"another [[webhooks]] is already named {shown(name)}")
        elif name and url and secret:
            endpoints[name] = WebhookEndpoint(
                name,
                url,
                secret,
                None if chosen is None else frozenset(chosen),
                frozenset(events),
                **reader.fields(table, where, _WEBHOOK),
            )
    return tuple(endpoints.values())


def archive_of(reader: Reader, data: Any) -> ArchiveSettings | None:
    archive = reader.table(data, "archive", set(_ARCHIVE) | {"dir", "url", "endpoint_url"})
    if not archive:
        return None
    where = "archive"
    given = {k: reader.get(archive, k, where, "str") for k in ("dir", "url", "endpoint_url")}
    if (given["dir"] is None) == (given["url"] is None):
        reader.problem(where, "set dir (a local directory) or url (s3://bucket/prefix), one of them")
    if given["dir"] is not None and not Path(given["dir"]).is_absolute():
        reader.problem(f"{where}.dir", "expected an absolute path")
    if given["url"] is not None and not (given["url"].startswith("s3://") and urlsplit(given["url"]).netloc):
        reader.problem(f"{where}.url", "expected s3://bucket or s3://bucket/prefix")
    if given["endpoint_url"] is not None and not given["endpoint_url"].startswith(("http://", "https://")):
        reader.problem(f"{where}.endpoint_url", "expected an http:// or https:// URL")
    return ArchiveSettings(
        **{k: v for k, v in given.items() if v is not None}, **reader.fields(archive, where, _ARCHIVE)
    )
