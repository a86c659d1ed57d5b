"""Every Prometheus metric gomail exports, defined once on an injected registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource
from twisted.web.server import Request

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (512, 2048, 8192, 32768, 131072, 524288, 2097152, 8388608, 33554432)


class GomailMetrics:
    """The metrics of one gomail process.

    Tests pass a fresh ``CollectorRegistry()`` so they never share state.
    Labels are low-cardinality only: never an address, URL or IP.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = registry
        # HTTP API
        self.http_request_duration = Histogram(
            "gomail_http_request_duration_seconds",
            "HTTP API request duration.",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_requests_in_flight = Gauge(
            "gomail_http_requests_in_flight", "HTTP API requests being handled.", registry=r
        )
        # Ingestion
        self.messages_received = Counter(
            "gomail_messages_received_total", "Messages accepted into the spool.", ["transport"], registry=r
        )
        self.messages_rejected = Counter(
            "gomail_messages_rejected_total",
            "Messages refused, by reason category.",
            ["transport", "category"],
            registry=r,
        )
        self.message_size = Histogram(
            "gomail_message_size_bytes", "Size of accepted messages.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.errors = Counter("gomail_errors_total", "Errors by category.", ["category"], registry=r)
        self.spool_messages = Gauge(
            "gomail_spool_messages", "Messages in the spool by delivery state.", ["state"], registry=r
        )
        self.spool_commit_batch = Histogram(
            "gomail_spool_commit_batch_size",
            "Messages made durable by one journal sync (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        # SMTP
        self.smtp_sessions_active = Gauge("gomail_smtp_sessions_active", "Open SMTP sessions.", registry=r)
        self.smtp_sessions = Counter(
            "gomail_smtp_sessions_total", "Finished SMTP sessions by result.", ["result"], registry=r
        )
        self.smtp_replies = Counter(
            "gomail_smtp_replies_total", "SMTP replies by command and code.", ["command", "code"], registry=r
        )
        # Delivery
        self.webhook_requests = Counter(
            "gomail_webhook_requests_total",
            "Webhook calls by route and outcome.",
            ["route", "outcome", "status_class"],
            registry=r,
        )
        self.webhook_duration = Histogram(
            "gomail_webhook_duration_seconds",
            "Webhook call duration.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_jobs = Gauge("gomail_queue_jobs", "Delivery jobs by route and state.", ["route", "state"], registry=r)
        self.queue_oldest_pending_age = Gauge(
            "gomail_queue_oldest_pending_age_seconds", "Age of the oldest pending job.", ["route"], registry=r
        )
        self.http_pool_connections = Gauge(
            "gomail_http_pool_connections", "Outbound HTTP pool connections by state.", ["state"], registry=r
        )
        self.route_paused = Gauge("gomail_route_paused", "1 while a route is paused (HTTP 410).", ["route"], registry=r)
        # Limiter
        self.ratelimit_decisions = Counter(
            "gomail_ratelimit_decisions_total",
            "Rate limiter decisions.",
            ["protocol", "rule", "decision"],
            registry=r,
        )
        self.ratelimit_keys = Gauge("gomail_ratelimit_keys", "Keys held by the rate limiter.", registry=r)
        # Shutdown
        self.shutting_down = Gauge("gomail_shutting_down", "1 while draining for shutdown.", registry=r)


    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once and kept.

        ``labels()`` checks and sorts its arguments under a lock on every call
        (several microseconds); the SMTP and spool hot paths call this
        instead, a few times per message.  Label values are low-cardinality,
        so the cache stays small.
        """
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found


class MetricsResource(Resource):
    """Serves the registry in the Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)
