"""Keeping this process's directory in step with the store's roster, and writing when keys were last used.

A change made here is applied right after its store operation (`catch_up`), so this replica answers with it at
once. A change made by another replica (Redis) arrives through Store.roster_wait: the store's PUBLISH on
"<prefix>roster" wakes it within milliseconds, and the version it re-reads every WAIT_S is the safety net for a
message lost with a dropped connection; then only the changes since the version held are fetched
(roster_changes_since), or the whole roster when they cannot be had. Either way a change is in force everywhere
within about a second, and the request path never waits on the store: it reads the directory in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from gateway.errors import GatewayError
from gateway.policy.auth import KeyUses
from gateway.policy.directory import Directory, config_changes, rebound_users
from gateway.settings import Settings
from gateway.store.base import Store
from gateway.tenancy import CONFIG_RELOAD, CONFIG_TARGET, RELOAD, AuditDraft

WAIT_S = 1.0  # the longest roster_wait: a version re-read at least this often whatever pub/sub delivers
RETRY_S = 1.0  # after a store error
TOUCH_EVERY_S = 45.0  # last_used_at written in bulk this often (and once more on stop)
SWEEP_EVERY_S = 60.0  # expired keys dropped from the directory this often (they are refused before)
KEYS_PAGE = 1000  # a user's keys read at once when a reload revokes them


class RosterSync:
    def __init__(
        self, store: Store, directory: Directory, uses: KeyUses, clock: Callable[[], float], retry_s: float = RETRY_S
    ) -> None:
        self.store = store
        self.retry_s = retry_s
        self.directory = directory
        self.uses = uses
        self.clock = clock
        self.log = structlog.get_logger("gateway.roster")
        self._lock = asyncio.Lock()  # one catch-up at a time: changes apply in order, once
        self._stop = asyncio.Event()
        self._clashes: set[str] = set()

    async def start(self) -> None:
        """The whole roster, before the first request."""
        async with self._lock:
            await self._load()
        self.say_clashes()
        self.log.info("roster.loaded", version=self.directory.version, keys=self.directory.key_count())

    def stop(self) -> None:
        self._stop.set()

    async def catch_up(self) -> None:
        """The directory brought to the store's version now (after a change made here, or a wake-up)."""
        async with self._lock:
            changes = await self.store.roster_changes_since(self.directory.version)
            if changes is None:
                await self._load()
            else:
                self.directory.apply(changes)
        self.say_clashes()

    async def _load(self) -> None:
        """The whole roster anew, a page at a time into a directory beside the one in force (which serves on),
        then handed over: what is held at once is the directory and one page, never a whole Roster too."""
        loaded = self.directory.fresh()
        async for page in self.store.roster_pages():
            if page is None:  # the store starts its pages again
                loaded = self.directory.fresh()
            else:
                loaded.apply(page)
        self.directory.take(loaded)

    def use_settings(self, settings: Settings) -> None:
        """A reload: the config's teams and users, over the same roster."""
        self.directory.use_settings(settings)
        self.say_clashes()

    async def reloaded(self, old: Settings, new: Settings, actor: str) -> int:
        """A reload applied: the keys issued through the API to a config user it removes, moves to another team
        or adds over a name the store holds revoked (they are refused from the moment the config changes: see
        Holder.fits), the new config in force, and an audit row (target "config") for each team, user and
        upstream key it changed. A store that cannot take the rows does not undo the reload. How many rows."""
        await self._revoke_keys_of(rebound_users(old, new))
        self.use_settings(new)
        changes = config_changes(old, new)
        try:
            audit = AuditDraft(actor, await self.store.now())
            for before, after in changes:
                await self.store.record_audit(audit, CONFIG_RELOAD, CONFIG_TARGET, before, after)
        except (GatewayError, OSError) as exc:
            self.log.warning("config.audit_failed", error=type(exc).__name__, changes=len(changes))
        return len(changes)

    async def _revoke_keys_of(self, names: list[str]) -> None:
        """Revoke every live key issued through the API under these names (actor "reload"); every replica
        reloading does it, and a revocation done already changes nothing."""
        revoked = 0
        try:
            for name in names:
                after: str | None = None
                while True:
                    keys, after = await self.store.list_keys(name, None, KEYS_PAGE, after)
                    for key in keys:
                        if key.revoked_at is None:
                            await self.store.revoke_key(key.id, AuditDraft(RELOAD, await self.store.now()))
                            revoked += 1
                    if after is None:
                        break
            if revoked:
                await self.catch_up()
        except (GatewayError, OSError) as exc:  # a moved or removed user's keys are refused all the same (Holder.fits)
            self.log.warning("config.key_revocation_failed", error=type(exc).__name__, revoked=revoked)
        if revoked:
            self.log.info("config.keys_revoked", revoked=revoked, users=len(names))

    def say_clashes(self) -> None:
        """One log line for each store record a config entry of the same name newly hides."""
        clashes = set(self.directory.clashes())
        for target in sorted(clashes - self._clashes):
            self.log.warning("tenancy.config_wins", target=target, reason="the config declares the same name")
        self._clashes = clashes

    async def run(self) -> None:
        next_touch = time.monotonic() + TOUCH_EVERY_S
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        while not self._stop.is_set():
            try:
                await self._follow()
                if time.monotonic() >= next_touch:
                    next_touch = time.monotonic() + TOUCH_EVERY_S
                    await self.touch()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_EVERY_S
                    self.directory.sweep(self.clock())
            except (GatewayError, OSError) as exc:  # the store is away: the directory in memory serves on
                self.log.warning("roster.refresh_failed", error=type(exc).__name__)
                await self._pause(self.retry_s)
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad refresh
                self.log.exception("roster.refresh_crashed")
                await self._pause(self.retry_s)
        await self._guarded_touch()

    async def _follow(self) -> None:
        """Wait for the store's roster to move (or WAIT_S), then catch up; a stop ends the wait."""
        waiting = asyncio.ensure_future(self.store.roster_wait(self.directory.version, WAIT_S))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not waiting.done():
            waiting.cancel()
            return
        if waiting.result() != self.directory.version:
            await self.catch_up()

    async def touch(self) -> None:
        """When keys were last used, since the last write, in one bulk write."""
        used = self.uses.take()
        if used:
            await self.store.touch_keys(used)

    async def _guarded_touch(self) -> None:
        try:
            await self.touch()
        except (GatewayError, OSError) as exc:
            self.log.warning("roster.touch_failed", error=type(exc).__name__)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass
