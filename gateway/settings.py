"""Settings: one frozen dataclass tree, built once at start-up by gateway.config from TOML and the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from types import MappingProxyType

PERIODS = ("day", "week", "month", "total")
DEFAULT_ALERT_THRESHOLDS = (0.8, 1.0)  # fractions of a budget at which a budget alert is sent (SPEC §15)
DEFAULT_PRICING = {
    "doubao-seedance-2.0": {"720p": Decimal("0.20"), "480p": Decimal("0.12")},
    "doubao-seedance-2.0-fast": {"720p": Decimal("0.16"), "480p": Decimal("0.10")},
}
DEFAULT_MODEL_ALIASES = {"sora-2": "doubao-seedance-2.0-fast", "sora-2-pro": "doubao-seedance-2.0"}


class Secret:
    """A string whose repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def masked(self) -> str:
        value = self._value
        prefix = value.split("-", 1)[0] + "-" if "-" in value[:6] else ""
        return f"{prefix}…{value[-4:]}" if len(value) >= 12 else "…"

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Limits:
    budget_micros: int | None = None
    video_seconds: int | None = None
    period: str = "month"
    requests_per_minute: int | None = None
    max_concurrent_tasks: int | None = None
    models: frozenset[str] | None = None
    alert_thresholds: tuple[float, ...] = DEFAULT_ALERT_THRESHOLDS  # ascending fractions > 0 (1.0: all of it)


@dataclass(frozen=True)
class Team:
    name: str
    limits: Limits


@dataclass(frozen=True)
class User:
    name: str
    team: str
    key_sha256: str  # "" for a user made through the admin API: its keys are the store's (SPEC §15)
    limits: Limits
    role: str = "member"  # or "team_admin": manages its own team's members and keys (SPEC §15)
    email: str | None = None


@dataclass(frozen=True)
class UpstreamKey:
    name: str
    value: Secret
    weight: int = 1
    max_concurrent_tasks: int = 10
    models: frozenset[str] | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    admin_token: Secret | None = None
    metrics_token: Secret | None = None
    shutdown_grace_s: float = 10
    max_body_bytes: int = 64 * 1024 * 1024
    log_prompts: bool = False
    header_timeout_s: float = 10  # a client that has not sent its headers by then is disconnected
    body_timeout_s: float = 30
    send_timeout_s: float = 30  # a download whose client reads nothing for this long is ended
    max_downloads_per_team: int = 8  # result-file downloads (/content, remix) at once per team
    max_uploads_in_flight: int = 16  # OpenAI-shape uploads from arrival until TokenHub answers, gateway-wide
    console: bool = True  # the web console at /console/ (SPEC §16)
    console_session_hours: float = 12  # a console session ends this long after its sign-in
    console_trusted_header: str | None = None  # e.g. "X-Forwarded-Email": a single sign-on proxy names the user
    # The peers whose console_trusted_header (and X-Forwarded-Proto / -For) the console believes.
    console_trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()


@dataclass(frozen=True)
class UpstreamSettings:
    base_url: str
    keys: tuple[UpstreamKey, ...]
    connect_timeout_s: float = 5
    timeout_s: float = 60
    cooldown_s: float = 30
    breaker_failures: int = 5
    breaker_open_s: float = 30
    # Result URLs are fetched only from public addresses, or from these networks (e.g. a simulator's).
    media_allow_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    max_answer_bytes: int = 1024 * 1024  # a larger TokenHub answer is refused, never stored whole


@dataclass(frozen=True)
class StoreSettings:
    url: Secret = field(default_factory=lambda: Secret("sqlite:///" + str(Path.cwd() / "gateway.db")))
    synchronous: str = "NORMAL"


@dataclass(frozen=True)
class PollerSettings:
    interval_s: float = 15
    expire_after_s: float = 172800
    concurrency: int = 32  # checks in flight at once: at ~0.1 s a poll over the internet, ~300 a second
    # The poller's own polls per upstream key and process, on average (bursts of a fifth of a second's worth):
    # well under TokenHub's per-key rate limit, and 700 tasks in flight on a key checked every 15 s.
    max_polls_per_second: float = 50


@dataclass(frozen=True)
class LedgerSettings:
    retention_days: int | None = None  # settled rows older than this are deleted (the per-day figures stay)


@dataclass(frozen=True)
class OpenAISettings:
    poll_after_ms: int = 2000
    model_aliases: Mapping[str, str] = field(  # alias → Seedance model of the pricing table
        default_factory=lambda: MappingProxyType(dict(DEFAULT_MODEL_ALIASES))
    )


WEBHOOK_EVENTS = ("video.completed", "video.failed", "budget.threshold_reached")  # all, when `events` is absent


@dataclass(frozen=True)
class WebhookEndpoint:
    name: str
    url: Secret  # may carry credentials: shown redacted only
    secret: Secret  # the "whsec_…" string as configured
    teams: frozenset[str] | None = None  # None: every team
    events: frozenset[str] = frozenset(WEBHOOK_EVENTS)
    retry_initial_s: float = 5
    max_in_flight: int = 4

    def wants(self, event_type: str, team: str) -> bool:
        return event_type in self.events and (self.teams is None or team in self.teams)


@dataclass(frozen=True)
class ArchiveSettings:
    dir: str | None = None  # a local directory, or
    url: str | None = None  # s3://bucket/prefix
    endpoint_url: str | None = None
    region: str = "us-east-1"
    retention_days: float = 30
    max_bytes_per_video: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    upstream: UpstreamSettings
    store: StoreSettings
    poller: PollerSettings
    pricing: Mapping[str, Mapping[str, int]]  # model → resolution → micro-dollars per second
    teams: Mapping[str, Team]
    users: Mapping[str, User]
    openai: OpenAISettings = field(default_factory=OpenAISettings)
    webhooks: tuple[WebhookEndpoint, ...] = ()
    archive: ArchiveSettings | None = None  # None: no archive
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    source: str = ""
