"""Retry timing: capped exponential backoff with full jitter, and ``Retry-After``.

Pure functions: the caller passes ``now`` and a ``random.Random``, so tests
pin both.
"""

from __future__ import annotations

import random

from twisted.web.http import stringToDatetime

MIN_RETRY_AFTER = 1.0
"""Floor in seconds for a ``Retry-After`` delay (``Retry-After: 0`` from a
struggling receiver must not become a hot loop)."""


def backoff_ceiling(attempts: int, first_retry: float, max_backoff: float) -> float:
    """The upper bound of the delay after the ``attempts``-th failed attempt.

    Args:
        attempts: Failed attempts so far (1 after the first failure).
        first_retry: The bound after the first failure.
        max_backoff: The cap.

    Returns:
        ``min(max_backoff, first_retry * 2 ** (attempts - 1))``.
    """
    exponent = max(attempts - 1, 0)
    # 2**64 seconds is far beyond any cap; avoid building huge integers.
    if exponent >= 64:
        return max_backoff
    return min(max_backoff, first_retry * 2.0**exponent)


def backoff_delay(attempts: int, rng: random.Random, first_retry: float, max_backoff: float) -> float:
    """A delay drawn with full jitter: uniform in ``[0, ceiling]``.

    Args:
        attempts: Failed attempts so far (1 after the first failure).
        rng: The random source.
        first_retry: The bound after the first failure.
        max_backoff: The cap of the bound.

    Returns:
        Seconds to wait before the next attempt.
    """
    return rng.uniform(0.0, backoff_ceiling(attempts, first_retry, max_backoff))


def parse_retry_after(value: str | bytes | None, now: float) -> float | None:
    """Parse a ``Retry-After`` header value into a delay from ``now``.

    Args:
        value: The header value: delay-seconds (``120``) or an HTTP date
            (``Wed, 21 Oct 2026 07:28:00 GMT``, also the obsolete RFC 850 and
            asctime forms).
        now: The current time, Unix seconds.

    Returns:
        Seconds to wait (``0`` for a date in the past), or ``None`` when the
        value is missing or malformed.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            raw = value.encode("ascii")
        except UnicodeEncodeError:
            return None
    else:
        raw = value
    raw = raw.strip()
    if not raw:
        return None
    if raw.isdigit():
        return float(int(raw))
    try:
        when = stringToDatetime(raw)
    except (ValueError, IndexError, KeyError, OverflowError):
        return None
    return max(0.0, float(when) - now)


def retry_at(
    now: float,
    attempts: int,
    rng: random.Random,
    first_retry: float,
    max_backoff: float,
    retry_after: float | None = None,
) -> float:
    """When the next attempt is due after a retryable failure.

    A receiver's ``Retry-After`` wins over our own backoff (floored at
    :data:`MIN_RETRY_AFTER`); otherwise the backoff with full jitter.

    Args:
        now: The current time, Unix seconds.
        attempts: Failed attempts so far, including this one.
        rng: The random source for the jitter.
        first_retry: The backoff bound after the first failure.
        max_backoff: The cap of the backoff bound.
        retry_after: The parsed ``Retry-After`` delay, if the receiver sent one.

    Returns:
        The due time of the next attempt, Unix seconds.
    """
    if retry_after is not None:
        return now + max(retry_after, MIN_RETRY_AFTER)
    return now + backoff_delay(attempts, rng, first_retry, max_backoff)
