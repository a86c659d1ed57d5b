"""Reference for bench/http_ingest: a minimal twisted.web resource that reads
the body and answers 202 without storing anything."""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class Accept(Resource):
    isLeaf = True

    def render_POST(self, request):  # type: ignore[no-untyped-def]
        request.content.read()
        request.setResponseCode(202)
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"status": "accepted"}\n'


site = Site(Accept())
site.noisy = False
site.log = lambda request: None  # type: ignore[method-assign]
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")  # type: ignore[attr-defined]
reactor.run()  # type: ignore[attr-defined]
