"""Webhook receiver for bench/delivery_throughput: a twisted.web resource that
reads the body, answers 200 at once and records, per request, the arrival
time (time.monotonic(), system-wide on Linux so comparable across processes),
the path, ``X-Gomail-Message-Id``, ``X-Gomail-Attempt`` and which TCP
connection carried it. TCP_NODELAY is set on every connection.

    python webhook_receiver.py PORT

``GET /_stats`` returns counts as JSON; ``GET /_dump?path=/hook`` returns the
records for that path as ``[[time, message_id, attempt, connection], ...]``.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet import reactor
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

records: dict[str, list[tuple[float, str, str, int]]] = {}
connections: dict[str, set[int]] = {}
body_bytes: dict[str, int] = {}
# peak_open counts connections that carried a POST (not the /_stats polls).
state = {"connections": 0, "open": 0, "peak_open": 0}


class Channel(HTTPChannel):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
        state["connections"] += 1
        self.bench_number = state["connections"]
        self.bench_posted = False

    def connectionLost(self, reason: object) -> None:
        if self.bench_posted:
            state["open"] -= 1
        super().connectionLost(reason)  # type: ignore[arg-type]


class Receiver(Resource):
    isLeaf = True

    def render_POST(self, request):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        size = len(request.content.read())
        path = request.path.decode("ascii", "replace")
        channel = request.channel
        conn = getattr(channel, "bench_number", 0)
        if not getattr(channel, "bench_posted", True):
            channel.bench_posted = True
            state["open"] += 1
            state["peak_open"] = max(state["peak_open"], state["open"])
        records.setdefault(path, []).append(
            (now, request.getHeader("X-Gomail-Message-Id") or "", request.getHeader("X-Gomail-Attempt") or "", conn)
        )
        connections.setdefault(path, set()).add(conn)
        body_bytes[path] = body_bytes.get(path, 0) + size
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/plain")
        return b"ok\n"

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"Content-Type", b"application/json")
        if request.path == b"/_stats":
            return json.dumps(
                {
                    "paths": {
                        p: {
                            "requests": len(r),
                            "unique_ids": len({x[1] for x in r}),
                            "connections": len(connections.get(p, ())),
                            "body_bytes": body_bytes.get(p, 0),
                        }
                        for p, r in records.items()
                    },
                    **state,
                }
            ).encode()
        if request.path == b"/_dump":
            path = (request.args.get(b"path") or [b"/hook"])[0].decode()
            return json.dumps(records.get(path, [])).encode()
        request.setResponseCode(404)
        return b"{}"


site = Site(Receiver())
site.protocol = Channel  # type: ignore[assignment]
site.noisy = False
site.log = lambda request: None  # type: ignore[method-assign]
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined]
reactor.run()  # type: ignore[attr-defined]
