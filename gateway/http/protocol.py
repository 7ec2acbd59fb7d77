"""uvicorn's HTTP/1.1 protocol with deadlines on a request's arrival (SPEC §4 "Slow clients").

uvicorn times out an idle keep-alive connection, but not a request that arrives slowly: a client that sends
its headers a byte at a time, or declares a body and never sends it, holds its connection for good (uvicorn
issue #157). Here a request's headers must be complete `header_timeout_s` after its first byte (a new
connection's clock starts when it opens), and its body `body_timeout_s` after its headers. Past either
deadline the connection is closed, after a 408 in the gateway's error shape when no answer has started yet;
a connection that sent nothing at all is closed without one (it may be a client's spare, opened ahead of use).

The create route answers a late body itself (`routes.read_body`: a 408 in its log line); the protocol's own
body deadline comes BODY_GRACE_S later, for handlers that never read the body they were promised.

Two more things only the connection knows (SPEC §4). A connection lost under a request not yet answered in full,
and not by the gateway's own doing, is a client that left: the request's scope says so (ENDED_WITH: 499), for the
request middleware to count it. And at shutdown an idle keep-alive connection is kept open, not closed as uvicorn
does: its next request is answered 503 `shutting_down` with `Connection: close` (by the app), and what is still
idle at the grace deadline is closed then (`close_if_idle`, by `serve.GatewayServer`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import RequestTimeout
from gateway.http.middleware import CLIENT_CLOSED, ENDED_WITH, request_id_from
from gateway.ids import new_id

BODY_GRACE_S = 1.0


class DeadlineProtocol(HttpToolsProtocol):
    """The deadline in force is a time and what to do at it. One timer per connection watches it and is
    left armed as requests come and go: a request moves the deadline, not the timer, and a timer that
    finds its deadline moved on arms itself again for it (once per timeout at most, instead of three
    timers set and cancelled per request). Only a deadline earlier than the armed timer re-arms it."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._due = 0.0  # loop time of the deadline in force
        self._late: Callable[[], None] | None = None  # what to do at it; None: no deadline
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._in_request = False  # part of a request has arrived: a 408 would answer something
        self._hanging_up = False  # the gateway closes this connection: whoever loses it, the client did not leave
        self._draining = False  # shutting down: every answer from now on closes the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(cast(asyncio.Transport, transport))  # uvicorn's protocol is served over a stream
        self._set(self.header_timeout_s, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not self._hanging_up:
            cast(Scope, cycle.scope)[ENDED_WITH] = CLIENT_CLOSED  # before the app hears of it (super() tells it)
        self._late = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_request = True
        if self._late is None:  # on a new connection the clock has been running since it opened
            self._set(self.header_timeout_s, self._headers_late)

    def on_headers_complete(self) -> None:
        self._late = None
        super().on_headers_complete()
        if self._draining:
            self.cycle.keep_alive = False
        self._set(self.body_timeout_s + BODY_GRACE_S, self._body_late)

    def on_message_complete(self) -> None:
        self._late = None
        self._in_request = False
        super().on_message_complete()

    def shutdown(self) -> None:
        """The server shuts down: a request under way is answered, then the connection closes; an idle one
        stays open for its next request's 503 (uvicorn would close it: the client's next request then meets a
        reset instead of an answer), until that answer or the grace deadline."""
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False

    def close_if_idle(self) -> None:
        """At the grace deadline: an idle connection is closed (one under a request ends with its request)."""
        if self.cycle is None or self.cycle.response_complete:
            self._hang_up()

    def send_400_response(self, msg: str) -> None:
        cycle = self.cycle  # a request whose body turned out malformed is a 400, not a client that left
        if cycle is not None and not cycle.response_complete:
            cast(Scope, cycle.scope)[ENDED_WITH] = 400
        self._hanging_up = True
        super().send_400_response(msg)

    def _hang_up(self) -> None:
        self._hanging_up = True
        self.transport.close()

    def _set(self, delay: float, late: Callable[[], None]) -> None:
        self._due, self._late = self.loop.time() + delay, late
        if self._timer is None or self._due < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = self._due
            self._timer = self.loop.call_at(self._due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        late = self._late
        if late is None:
            return  # no request under way: the next one sets its own deadline
        if self.loop.time() < self._due:
            self._timer_at = self._due
            self._timer = self.loop.call_at(self._due, self._fire)
            return
        self._late = None
        late()

    def _headers_late(self) -> None:
        # still answering the request before (pipelined): a 408 would land in the middle of that answer
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._in_request and not answering:
            self._send_408(f"The request headers did not arrive within {self.header_timeout_s:g} s.")
        self._hang_up()

    def _body_late(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            scope = cast(Scope, cycle.scope)
            self._send_408(f"The request body did not arrive within {self.body_timeout_s:g} s.", scope)
            scope[ENDED_WITH] = 408
            cycle.disconnected = True  # whatever the handler sends later is dropped, as for a client gone
        self._hang_up()

    def _send_408(self, message: str, scope: Scope | None = None) -> None:
        """Written here, below the app and its middleware: so this answer adds the request id itself (the
        client's own when its headers arrived, else a new one), as every answer carries one (SPEC §2)."""
        body = RequestTimeout(message).json()
        request_id = request_id_from(scope) if scope is not None else new_id()
        head = [b"HTTP/1.1 408 Request Timeout\r\n"]
        head += [b"%s: %s\r\n" % header for header in self.server_state.default_headers]
        head.append(b"x-request-id: %s\r\n" % request_id.encode())
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)


def http_protocol(header_timeout_s: float, body_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn.Config(http=...), with these deadlines."""
    return type(
        "DeadlineProtocol",
        (DeadlineProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )
