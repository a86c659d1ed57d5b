"""A slow webhook receiver on loopback, in a thread of the test process, that records every call."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class Call:
    """One webhook call as the receiver saw it."""

    def __init__(self, headers: dict[str, str], body: bytes, signature_ok: bool) -> None:
        self.headers = headers
        self.body = body
        self.signature_ok = signature_ok
        self.answered = False
        self.message_id = headers.get("x-gomail-message-id", "")
        self.webhook_id = headers.get("webhook-id", "")
        try:
            self.payload: Any = json.loads(body)
        except ValueError:
            self.payload = None


class Receiver:
    """Answers 200 after ``delay`` seconds; can hold calls unanswered (``hold()``) until ``release()``.

    A held call is recorded, then waits (bounded) and closes the connection
    without any response, so the sender never learns that it arrived.
    """

    def __init__(self, secret: str, delay: float = 0.2, max_hold: float = 30.0) -> None:
        self.secret = secret
        self.delay = delay
        self.max_hold = max_hold
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.held = 0
        self.connections = 0
        self._holding = False
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with receiver.lock:
                    receiver.connections += 1

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                call = receiver._record(self, body)
                if receiver._hold_this():
                    receiver._released.wait(receiver.max_hold)
                    self.close_connection = True
                    return
                time.sleep(receiver.delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "12")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')
                self.wfile.flush()
                call.answered = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a sender killed mid-call resets its connections

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def hold(self) -> None:
        """From now on, keep every call unanswered until :meth:`release`."""
        with self.lock:
            self._holding = True
            self._released.clear()

    def release(self) -> None:
        """Stop holding; held calls end without a response."""
        with self.lock:
            self._holding = False
        self._released.set()

    def _hold_this(self) -> bool:
        with self.lock:
            if self._holding:
                self.held += 1
                return True
            return False

    def _record(self, handler: BaseHTTPRequestHandler, body: bytes) -> Call:
        headers = {name.lower(): value for name, value in handler.headers.items()}
        try:
            Webhook(self.secret).verify(body, headers)
            ok = True
        except WebhookVerificationError:
            ok = False
        call = Call(headers, body, ok)
        with self.lock:
            self.calls.append(call)
        return call

    def snapshot(self) -> list[Call]:
        with self.lock:
            return list(self.calls)

    def delivered(self) -> set[str]:
        """Message ids of calls answered 200 (as far as the receiver could tell)."""
        return {c.message_id for c in self.snapshot() if c.answered}
