"""The HTTP API (Klein): ingestion, health, readiness, metrics, queue.

Served as ``Site(api.resource(), requestFactory=...)`` from the service tree;
never ``app.run()``.  Every error is JSON (design.md section 3), every
response carries ``X-Request-ID``, and request bodies are capped while they
are read (:class:`BoundedRequest`).
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import re
import weakref
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound

import gomail
from gomail.errors import (
    AuthenticationRequired,
    GomailError,
    InternalError,
    InvalidSyntax,
    NotFound,
    PolicyRefused,
    RateLimited,
    TooLarge,
    Unavailable,
    ValidationFailed,
)
from gomail.ids import request_id as new_request_id
from gomail.interfaces import Envelope, IRecipientPolicy, ISpool
from gomail.metrics import GomailMetrics, MetricsResource
from gomail.parser import header_addresses

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HTTP_TO_UNKNOWN = "unknown"
_INGEST_ROUTES = frozenset({"/mail/inbound", "/email"})


class BoundedRequest(Request):
    """A request whose body is held in memory up to a limit, never beyond.

    Bytes past ``site.max_body_size`` are dropped as they arrive and the
    request is marked ``body_too_large``, so the handler answers 413; the
    body is never silently truncated and never spills to a temporary file on
    the reactor thread.  A request without the right bearer token keeps no
    body at all.
    """

    body_too_large = False
    route_label = _HTTP_TO_UNKNOWN
    started: float = 0.0
    _kept = 0

    content: Any

    def gotLength(self, length: int | None) -> None:
        site = getattr(self.channel, "site", None)
        if isinstance(site, APISite):
            # Counted from its headers on, so a shutdown drains an upload
            # that is still sending its body.
            site.request_started(self)
        self._limit = getattr(site, "max_body_size", 26214400)
        self.content = io.BytesIO()
        if length is not None and length > self._limit:
            self.body_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._kept += len(data)
        if self._kept > self._limit:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        self.content.write(data)


class APISite(Site):
    """A Site that knows the body limit and counts requests."""

    def __init__(self, resource: Any, max_body_size: int, metrics: GomailMetrics | None, clock: IReactorTime) -> None:
        super().__init__(resource, requestFactory=BoundedRequest, reactor=clock)
        self.max_body_size = max_body_size
        self._metrics = metrics
        self._clock = clock
        self.in_flight = 0
        self.noisy = False
        self._channels: weakref.WeakSet[Any] = weakref.WeakSet()

    def request_started(self, request: Any) -> None:
        """Count a request in flight, once, from the moment its headers are in."""
        if getattr(request, "_counted", False):
            return
        request._counted = True
        request.started = self._clock.seconds()
        self.in_flight += 1
        if self._metrics is not None:
            self._metrics.http_requests_in_flight.inc()
        request.notifyFinish().addBoth(self._finished, request)

    def getResourceFor(self, request: Any) -> Any:
        self.request_started(request)
        return super().getResourceFor(request)

    def _finished(self, _: object, request: BoundedRequest) -> None:
        self.in_flight -= 1
        if self._metrics is not None:
            self._metrics.http_requests_in_flight.dec()
            self._metrics.http_request_duration.labels(
                request.method.decode("ascii", "replace"), request.route_label, str(request.code)
            ).observe(max(0.0, self._clock.seconds() - request.started))

    def log(self, request: Any) -> None:
        """Access logs go through twisted.logger in the API itself."""

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is not None:
            self._channels.add(channel)
        return channel

    def close_connections(self) -> None:
        """Close every open connection (after the drain)."""
        for channel in list(self._channels):
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.loseConnection()


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def _all_headers(request: IRequest, name: bytes) -> list[str]:
    return [v.decode("utf-8", "replace") for v in request.requestHeaders.getRawHeaders(name, [])]


def _split_addresses(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip().strip("<>").strip()
            if part:
                out.append(part)
    return out


class HTTPApi:
    """The API's routes and their dependencies (Klein's non-global state).

    Args:
        spool: Where accepted messages go.
        recipients: Decides which recipients are accepted (no relaying).
        token: The bearer token (compared in constant time).
        clock: For uptime and timings.
        metrics: Where to count.
        limiter: The shared rate limiter, or None.
        ready_checks: Extra readiness checks, name -> callable returning bool.
        queue: The delivery service for ``/queue``, or None.
    """

    app = Klein()
    _log = Logger()

    def __init__(
        self,
        spool: ISpool,
        recipients: IRecipientPolicy,
        token: str,
        clock: IReactorTime,
        metrics: GomailMetrics | None = None,
        limiter: Any | None = None,
        ready_checks: dict[str, Callable[[], bool]] | None = None,
        queue: Any | None = None,
        serve_metrics: bool = True,
    ) -> None:
        self._spool = spool
        self._recipients = recipients
        self._token = token.encode("utf-8")
        self._clock = clock
        self._metrics = metrics
        self._limiter = limiter
        self._ready_checks = dict(ready_checks or {})
        self._queue = queue
        self._started = clock.seconds()
        self._metrics_resource = MetricsResource(metrics.registry) if metrics is not None and serve_metrics else None
        self._shutdown_at: float | None = None

    @property
    def shutting_down(self) -> bool:
        """Whether a graceful shutdown has begun."""
        return self._shutdown_at is not None

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        self._shutdown_at = self._clock.seconds() if value else None

    def resource(self) -> Any:
        """The twisted.web resource serving this API."""
        return self.app.resource()

    # -- common steps ------------------------------------------------------

    def _begin(self, request: Any, route: str, *, limited: bool = True, drain_exempt: bool = False) -> str:
        """Request id, shutdown refusal and rate limit: first thing of every route."""
        request.route_label = route
        given = _header(request, b"x-request-id")
        request_id = given if given and _REQUEST_ID.match(given) else new_request_id()
        request.request_id = request_id
        request.setHeader(b"X-Request-ID", request_id.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        if self._shutdown_at is not None and not drain_exempt and getattr(request, "started", self._clock.seconds()) >= self._shutdown_at:
            # Requests that began before the shutdown finish; later ones go elsewhere.
            raise Unavailable("gomail is shutting down; retry on another instance or later", retry_after=30)
        if limited and self._limiter is not None:
            self._rate_limit(request)
        return request_id

    def _rate_limit(self, request: Any) -> None:
        from gomail.limiter import rate_limit_headers

        peer = request.getClientAddress()
        address = getattr(peer, "host", str(peer))
        assert self._limiter is not None
        client = self._limiter.real_client(address, _header(request, b"x-forwarded-for"))
        decision = self._limiter.check_http(client)
        for name, value in rate_limit_headers(decision, self._clock.seconds()).items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        if not decision.allowed:
            wait = max(1, int(-(-(decision.retry_at - self._clock.seconds()) // 1)))
            raise RateLimited(f"too many requests; retry in {wait} seconds", {"retry_after": wait}, retry_after=wait)

    def _authenticate(self, request: Any) -> None:
        given = request.getHeader(b"authorization") or b""
        scheme, _, token = given.partition(b" ")
        ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)
        if not ok:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="gomail"')
            raise AuthenticationRequired("a valid 'Authorization: Bearer <token>' header is required")

    def _json(self, request: Any, status: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        data = json.dumps(body).encode("utf-8") + b"\n"
        # An explicit length: otherwise an asynchronous answer goes out
        # chunked, in two writes, and Nagle + delayed ACK add ~40 ms.
        request.setHeader(b"Content-Length", str(len(data)).encode("ascii"))
        return data

    # -- errors ----------------------------------------------------------------

    @app.handle_errors(GomailError)
    def _gomail_error(self, request: Any, failure: Failure) -> bytes:
        error: GomailError = failure.value
        return self._error_response(request, error)

    @app.handle_errors(RouteNotFound)
    def _not_found(self, request: Any, failure: Failure) -> bytes:
        self._begin_quietly(request)
        return self._error_response(request, NotFound("no such path", {"path": request.path.decode("utf-8", "replace")}))

    @app.handle_errors(MethodNotAllowed)
    def _wrong_method(self, request: Any, failure: Failure) -> bytes:
        self._begin_quietly(request)
        allowed = [m for m in (failure.value.valid_methods or []) if m != "HEAD"]
        request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        error = GomailError("method not allowed here", {"allowed": allowed}, http_status=405)
        error.category = "syntax"  # type: ignore[misc]
        return self._error_response(request, error)

    @app.handle_errors(Exception)
    def _bug(self, request: Any, failure: Failure) -> bytes:
        self._log.failure("internal error in {route} request {request_id}", failure, route=request.route_label, request_id=getattr(request, "request_id", None))
        return self._error_response(request, InternalError("internal error"))

    def _begin_quietly(self, request: Any) -> None:
        if not getattr(request, "request_id", None):
            try:
                self._begin(request, "unknown", limited=False, drain_exempt=True)
            except GomailError:  # pragma: no cover - drain_exempt never raises
                pass

    def _error_response(self, request: Any, error: GomailError) -> bytes:
        self._begin_quietly(request)
        if error.retry_after is not None:
            request.setHeader(b"Retry-After", str(max(1, int(error.retry_after + 0.999))).encode("ascii"))
        if self._metrics is not None:
            self._metrics.errors.labels(error.category).inc()
            if request.route_label in _INGEST_ROUTES:
                self._metrics.messages_rejected.labels("http", error.category).inc()
        self._log.info(
            "{method} {route} -> {status} {category}: {message} [{request_id}]",
            method=request.method.decode("ascii", "replace"),
            route=request.route_label,
            status=error.status,
            category=error.category,
            message=error.message,
            request_id=request.request_id,
        )
        return self._json(request, error.status, error.to_json(request.request_id))

    # -- health ---------------------------------------------------------------

    @app.route("/health", methods=["GET"])
    def health(self, request: Any) -> bytes:
        """Alive: version and uptime."""
        self._begin(request, "/health", limited=False, drain_exempt=True)
        uptime = round(self._clock.seconds() - self._started, 3)
        return self._json(request, 200, {"status": "ok", "version": gomail.__version__, "uptime": uptime})

    @app.route("/ready", methods=["GET"])
    def ready(self, request: Any) -> bytes:
        """Ready: spool writable, not shutting down (and any extra checks)."""
        self._begin(request, "/ready", limited=False, drain_exempt=True)
        checks = {"spool_writable": self._spool.is_writable(), "not_shutting_down": not self.shutting_down}
        for name, check in self._ready_checks.items():
            checks[name] = bool(check())
        ok = all(checks.values())
        if not ok:
            request.setHeader(b"Retry-After", b"5")
        return self._json(request, 200 if ok else 503, {"status": "ready" if ok else "not_ready", "checks": checks})

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Any) -> Any:
        """Prometheus text format."""
        self._begin(request, "/metrics", limited=False, drain_exempt=True)
        if self._metrics_resource is None:
            raise NotFound("metrics are not served here")
        return self._metrics_resource

    # -- ingestion -----------------------------------------------------------

    @app.route("/mail/inbound", methods=["POST"])
    def inbound(self, request: Any) -> Any:
        """Accept one message; 202 once it is durably in the spool."""
        return self._ingest(request, "/mail/inbound")

    @app.route("/email", methods=["POST"])
    def inbound_legacy(self, request: Any) -> Any:
        """GoMail's path for the same thing."""
        return self._ingest(request, "/email")

    async def _ingest(self, request: Any, route: str) -> bytes:
        request_id = self._begin(request, route)
        self._authenticate(request)
        if getattr(request, "body_too_large", False):
            raise TooLarge(
                f"the request body is over the limit of {request._limit} bytes",
                {"limit": request._limit},
            )
        ctype = (_header(request, b"content-type") or "").split(";")[0].strip().lower()
        body = request.content.getvalue()
        peer = request.getClientAddress()
        if ctype in ("message/rfc822", "application/octet-stream", "text/plain"):
            raw = body
            envelope = self._envelope_from_headers(request, raw, request_id, peer)
        elif ctype == "application/json":
            raw, envelope = self._envelope_from_json(body, request_id, peer)
        else:
            raise ValidationFailed(
                "unsupported Content-Type; use message/rfc822 or application/json", {"content_type": ctype}, http_status=415
            )
        if not raw:
            raise ValidationFailed("the message is empty")
        refused = [r for r in envelope.rcpt_to if not self._recipients.accepts(r)]
        if refused:
            raise PolicyRefused("recipient not accepted here (no relaying)", {"refused": refused})
        stored = await self._spool.store(envelope, raw)
        self._log.info(
            "accepted {msg_id} over HTTP ({size} bytes, {rcpts} recipients) [{request_id}]",
            msg_id=stored.id,
            size=stored.size,
            rcpts=len(envelope.rcpt_to),
            request_id=request_id,
        )
        return self._json(request, 202, {"id": stored.id, "status": "accepted", "received_at": stored.received_at})

    def _envelope_from_headers(self, request: Any, raw: bytes, request_id: str, peer: Any) -> Envelope:
        recipients = _split_addresses(_all_headers(request, b"x-original-recipient"))
        sender = _header(request, b"x-original-mail-from") or _header(request, b"x-original-sender")
        if not recipients or sender is None:
            found = header_addresses(raw, ("from", "to", "cc"))
            if not recipients:
                recipients = found["to"] + found["cc"]
            if sender is None:
                sender = found["from"][0] if found["from"] else ""
        if not recipients:
            raise ValidationFailed("no recipient: send X-Original-Recipient or a To header")
        return Envelope(
            transport="http",
            mail_from=sender.strip().strip("<>"),
            rcpt_to=tuple(recipients),
            helo=_header(request, b"x-original-helo"),
            client_address=_header(request, b"x-original-client-address"),
            client_hostname=_header(request, b"x-original-client-hostname"),
            protocol="HTTP",
            request_id=request_id,
            tls=request.isSecure(),
        )

    def _envelope_from_json(self, body: bytes, request_id: str, peer: Any) -> tuple[bytes, Envelope]:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidSyntax("the body is not valid JSON", {"error": str(e)[:200]}) from e
        if not isinstance(doc, dict):
            raise InvalidSyntax("the JSON body must be an object")
        problems: dict[str, str] = {}
        raw_value = doc.get("raw")
        raw = b""
        if isinstance(raw_value, str):
            if doc.get("raw_encoding") == "base64":
                try:
                    raw = base64.b64decode(raw_value, validate=True)
                except ValueError:
                    problems["raw"] = "not valid base64"
            else:
                raw = raw_value.encode("utf-8", "surrogateescape")
        else:
            problems["raw"] = "required: the message as a string"
        recipients: list[str] = []
        if isinstance(doc.get("recipients"), list) and all(isinstance(r, str) for r in doc["recipients"]):
            recipients = _split_addresses(doc["recipients"])
        elif isinstance(doc.get("recipient"), str):
            recipients = _split_addresses([doc["recipient"]])
        else:
            problems["recipient"] = "required: 'recipient' (string) or 'recipients' (list of strings)"
        sender = doc.get("sender", "")
        if not isinstance(sender, str):
            problems["sender"] = "must be a string"
        conn = doc.get("connection") or {}
        if not isinstance(conn, dict):
            problems["connection"] = "must be an object"
            conn = {}
        if problems:
            raise ValidationFailed("the JSON body is missing or has bad fields", {"fields": problems})
        if not recipients:
            raise ValidationFailed("no recipient given", {"fields": {"recipient": "empty"}})

        def text(name: str) -> str | None:
            value = conn.get(name)
            return value if isinstance(value, str) else None

        return raw, Envelope(
            transport="http",
            mail_from=str(sender).strip().strip("<>"),
            rcpt_to=tuple(recipients),
            helo=text("client_helo") or text("helo"),
            client_address=text("client_address"),
            client_hostname=text("client_hostname"),
            protocol="HTTP",
            request_id=request_id,
        )

    # -- queue (operators) ---------------------------------------------------

    @app.route("/queue", methods=["GET"])
    def queue_list(self, request: Any) -> bytes:
        """Jobs, filtered by ``state`` and ``route`` query arguments."""
        from gomail.delivery.admin import describe

        self._begin(request, "/queue")
        self._authenticate(request)
        queue = self._need_queue()
        jobs = [describe(job) for job in queue.list_jobs(state=_arg(request, b"state"), route=_arg(request, b"route"))]
        return self._json(request, 200, {"jobs": jobs, "count": len(jobs)})

    @app.route("/queue/dead/retry", methods=["POST"])
    async def queue_retry_dead(self, request: Any) -> bytes:
        """Replay dead letters (optionally one route, or dead since a time)."""
        self._begin(request, "/queue/dead/retry")
        self._authenticate(request)
        queue = self._need_queue()
        since_text = _arg(request, b"since")
        since = None
        if since_text:
            try:
                since = float(since_text)
            except ValueError:
                raise InvalidSyntax("'since' must be a Unix time in seconds", {"since": since_text}) from None
        ids = await queue.retry_dead(route=_arg(request, b"route"), since=since)
        return self._json(request, 200, {"retried": len(ids), "ids": list(ids)})

    @app.route("/queue/<string:job_id>/retry", methods=["POST"])
    async def queue_retry(self, request: Any, job_id: str) -> bytes:
        """Retry one job now (NotFound gives 404)."""
        from gomail.delivery.admin import describe

        self._begin(request, "/queue/{id}/retry")
        self._authenticate(request)
        queue = self._need_queue()
        job = await queue.retry(job_id)
        return self._json(request, 200, {"job": describe(job)})

    def _need_queue(self) -> Any:
        if self._queue is None:
            raise NotFound("delivery is not configured (no routes)")
        return self._queue


def _arg(request: Any, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None
