"""A webhook receiver on loopback for the end-to-end tests: every delivery is verified with the
`standardwebhooks` library and with the openai SDK's `webhooks.unwrap`, then answered as told."""

from __future__ import annotations

import base64
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from openai import OpenAI
from standardwebhooks.webhooks import Webhook


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Receiver:
    """`fail_first` deliveries answered 500, every answer after `delay_s`; `deliveries` holds the verified ones
    as (webhook-id, event), `rejected` those whose signature did not verify."""

    def __init__(self, secret: str, fail_first: int = 0, delay_s: float = 0.0) -> None:
        self.secret, self.fail_first, self.delay_s = secret, fail_first, delay_s
        self.deliveries: list[tuple[str, dict[str, Any]]] = []
        self.rejected: list[str] = []
        self.attempts = 0
        self._lock = threading.Lock()
        self._openai = OpenAI(api_key="unused", webhook_secret=secret)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/videos"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = receiver.receive({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def use_secret(self, secret: str) -> None:
        with self._lock:
            self.secret, self._openai = secret, OpenAI(api_key="unused", webhook_secret=secret)

    def receive(self, headers: dict[str, str], body: bytes) -> int:
        time.sleep(self.delay_s)
        with self._lock:
            self.attempts += 1
            try:
                event = Webhook(self.secret).verify(body, headers)
                unwrapped = self._openai.webhooks.unwrap(body, headers)
                assert (
                    (unwrapped.id, unwrapped.type)
                    == (event["id"], event["type"])
                    == (headers["webhook-id"], orjson.loads(body)["type"])
                )
            except Exception as exc:  # noqa: BLE001 - recorded for the test to see
                self.rejected.append(f"{headers.get('webhook-id')}: {exc!r}")
                return 400
            if self.fail_first > 0:
                self.fail_first -= 1
                self.deliveries.append((headers["webhook-id"], {"failed_on_purpose": True, **event}))
                return 500
            self.deliveries.append((headers["webhook-id"], event))
            return 200

    def delivered(self) -> dict[str, dict[str, Any]]:
        """webhook-id → event, for the deliveries answered 2xx."""
        with self._lock:
            return {i: e for i, e in self.deliveries if not e.get("failed_on_purpose")}

    def ids(self) -> list[str]:
        with self._lock:
            return [i for i, _ in self.deliveries]

    def __enter__(self) -> Receiver:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
