"""One error taxonomy for SMTP, HTTP, logs and metrics (design.md section 3).

Every component raises a subclass of :class:`GomailError`.  The class says
how the error is reported on each surface: the HTTP status, the SMTP basic and
enhanced status codes, and the ``category`` label used in JSON error bodies
and in ``gomail_errors_total{category}``.
"""

from __future__ import annotations

from typing import Any, ClassVar

CATEGORIES: tuple[str, ...] = (
    "syntax",
    "validation",
    "authentication",
    "policy",
    "not_found",
    "too_large",
    "rate_limited",
    "unavailable",
    "storage",
    "timeout",
    "upstream",
    "internal",
)


class GomailError(Exception):
    """Base of every categorised gomail error.

    Attributes:
        message: A human-readable sentence, safe to show to the client (no
            secrets, no message content).
        details: Extra machine-readable facts for the JSON error body.
        retry_after: Seconds after which a retry may succeed, for temporary
            errors (``Retry-After`` in HTTP, a hint in SMTP reply text).
    """

    category: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    smtp_code: ClassVar[int] = 451
    smtp_enhanced: ClassVar[str] = "4.3.0"

    def __init__(
        self,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.retry_after = retry_after
        self._http_status = http_status

    @property
    def status(self) -> int:
        """The HTTP status for this error (a per-instance override wins)."""
        return self._http_status if self._http_status is not None else self.http_status

    def smtp_reply(self) -> tuple[int, str]:
        """The SMTP basic and enhanced status codes for this error."""
        return self.smtp_code, self.smtp_enhanced

    def to_json(self, request_id: str | None) -> dict[str, Any]:
        """The JSON error body of design.md section 3."""
        return {
            "error": {
                "category": self.category,
                "message": self.message,
                "request_id": request_id,
                "details": self.details,
            }
        }


class InvalidSyntax(GomailError):
    """A bad command, address, header or JSON document."""

    category = "syntax"
    http_status = 400
    smtp_code = 501
    smtp_enhanced = "5.5.4"


class ValidationFailed(GomailError):
    """Well-formed input that breaks a rule (e.g. a required field missing)."""

    category = "validation"
    http_status = 422
    smtp_code = 550
    smtp_enhanced = "5.6.0"


class AuthenticationRequired(GomailError):
    """Missing or wrong credentials."""

    category = "authentication"
    http_status = 401
    smtp_code = 530
    smtp_enhanced = "5.7.0"


class PolicyRefused(GomailError):
    """Refused by policy: relay denied, sender blocked."""

    category = "policy"
    http_status = 403
    smtp_code = 550
    smtp_enhanced = "5.7.1"


class NotFound(GomailError):
    """An unknown recipient, path or message id."""

    category = "not_found"
    http_status = 404
    smtp_code = 550
    smtp_enhanced = "5.1.1"


class TooLarge(GomailError):
    """Over a size limit."""

    category = "too_large"
    http_status = 413
    smtp_code = 552
    smtp_enhanced = "5.3.4"


class RateLimited(GomailError):
    """A token bucket is empty; retry later."""

    category = "rate_limited"
    http_status = 429
    smtp_code = 450
    smtp_enhanced = "4.7.1"


class Unavailable(GomailError):
    """Shutting down or overloaded; retry later."""

    category = "unavailable"
    http_status = 503
    smtp_code = 421
    smtp_enhanced = "4.3.2"


class StorageFailed(GomailError):
    """The spool could not store the message (disk full, write error)."""

    category = "storage"
    http_status = 507
    smtp_code = 452
    smtp_enhanced = "4.3.1"


class TimedOut(GomailError):
    """The client was too slow."""

    category = "timeout"
    http_status = 408
    smtp_code = 421
    smtp_enhanced = "4.4.2"


class UpstreamFailed(GomailError):
    """A webhook failed where the caller waits for it."""

    category = "upstream"
    http_status = 502
    smtp_code = 451
    smtp_enhanced = "4.4.1"


class InternalError(GomailError):
    """A bug; logged with its traceback."""

    category = "internal"
    http_status = 500
    smtp_code = 451
    smtp_enhanced = "4.3.0"
