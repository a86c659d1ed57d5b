"""Frozen delivery configuration objects.

Only ``gomail.config`` builds these from YAML; everything in
``gomail.delivery`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

RAW_MODES: tuple[str, ...] = ("never", "base64", "multipart")
FAN_OUT_MODES: tuple[str, ...] = ("message", "recipient")


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """One route: which recipients go to which webhook, and how.

    Attributes:
        name: A short, unique, low-cardinality name (used in metrics labels,
            job ids and logs).
        match: Address patterns: ``user@example.com`` (exact),
            ``*@example.com`` (a domain) or ``*`` (catch-all).  A recipient
            ``user+tag@example.com`` matches ``user@example.com`` when no
            pattern matches it exactly.
        url: The webhook URL (``http`` or ``https``).
        secrets: Signing secrets; each gives one ``v1,`` entry in
            ``webhook-signature`` so keys can rotate.  ``whsec_<base64>`` is
            base64-decoded, any other string is used as its UTF-8 bytes.
        raw: Raw MIME in the payload: ``never``, ``base64`` (inside the
            JSON) or ``multipart`` (a second ``multipart/form-data`` part).
        inline_attachments_max: Attachments up to this many bytes carry their
            content (base64) in the payload; larger ones only metadata.
        fan_out: ``message`` (one call per message and route, all of the
            route's recipients in the envelope) or ``recipient`` (one call
            per recipient).
        timeout: Seconds allowed for one webhook call, response included.
        concurrency: Webhook calls in flight at once for this route.
    """

    name: str
    match: tuple[str, ...]
    url: str
    secrets: tuple[str, ...] = ()
    raw: str = "never"
    inline_attachments_max: int = 0
    fan_out: str = "message"
    timeout: float = 30.0
    concurrency: int = 4

    def __post_init__(self) -> None:
        if self.raw not in RAW_MODES:
            raise ValueError(f"route {self.name!r}: raw must be one of {RAW_MODES}")
        if self.fan_out not in FAN_OUT_MODES:
            raise ValueError(f"route {self.name!r}: fan_out must be one of {FAN_OUT_MODES}")
        if self.concurrency < 1:
            raise ValueError(f"route {self.name!r}: concurrency must be at least 1")
        if self.timeout <= 0:
            raise ValueError(f"route {self.name!r}: timeout must be positive")


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """Settings shared by every route.

    Attributes:
        max_age: Seconds a job is retried before it becomes a dead letter.
        first_retry: Upper bound in seconds of the first retry delay (full
            jitter: the delay is uniform in ``[0, bound]``).
        max_backoff: Cap in seconds of the retry delay bound.
        concurrency: Webhook calls in flight at once, all routes together.
        max_persistent_per_host: Idle keep-alive connections kept per host.
        pool_idle_timeout: Seconds an idle pooled connection is kept.
        connect_timeout: Seconds allowed to open a TCP connection.
        response_body_cap: Bytes of a response body kept (for ``last_error``);
            the rest is read and discarded so the connection can be reused.
        block_private_addresses: Refuse webhook URLs that resolve to private,
            loopback or link-local addresses (SSRF guard).
        scan_interval: Seconds between checks for operator changes to the
            job store, and metric updates.
    """

    max_age: float = 259200.0
    first_retry: float = 30.0
    max_backoff: float = 3600.0
    concurrency: int = 32
    max_persistent_per_host: int = 10
    pool_idle_timeout: float = 240.0
    connect_timeout: float = 10.0
    response_body_cap: int = 4096
    block_private_addresses: bool = False
    scan_interval: float = 1.0
