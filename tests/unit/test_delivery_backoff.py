"""Tests for gomail.delivery.backoff: full jitter, caps and Retry-After."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import datetimeToString

from gomail.delivery.backoff import backoff_ceiling, backoff_delay, parse_retry_after, retry_at

NOW = 1_795_635_000.0


class BackoffTests(SynchronousTestCase):
    """Capped exponential backoff with full jitter."""

    def test_ceiling_doubles_to_the_cap(self) -> None:
        """The bound doubles from first_retry per attempt, up to max_backoff."""
        self.assertEqual([backoff_ceiling(n, 30, 3600) for n in range(1, 10)], [30, 60, 120, 240, 480, 960, 1920, 3600, 3600])
        self.assertEqual(backoff_ceiling(10_000, 30, 3600), 3600)
        self.assertEqual(backoff_ceiling(0, 30, 3600), 30)

    def test_delay_is_seeded_full_jitter(self) -> None:
        """The delay is uniform in [0, ceiling] from the given Random."""
        self.assertEqual(backoff_delay(3, random.Random(1), 30, 3600), random.Random(1).uniform(0, 120))

    @given(attempts=st.integers(min_value=1, max_value=500), seed=st.integers(min_value=0, max_value=2**32))
    def test_jitter_bounds(self, attempts: int, seed: int) -> None:
        """Every delay lies within [0, min(cap, first * 2**(n-1))]."""
        delay = backoff_delay(attempts, random.Random(seed), 30, 3600)
        self.assertTrue(0 <= delay <= min(3600, 30 * 2 ** (attempts - 1)))

    def test_jitter_spreads(self) -> None:
        """Delays for the same attempt spread over the range (not a fixed value)."""
        rng = random.Random(3)
        delays = [backoff_delay(5, rng, 30, 3600) for _ in range(1000)]
        self.assertLess(min(delays), 480 * 0.05)
        self.assertGreater(max(delays), 480 * 0.95)

    def test_retry_at_prefers_retry_after(self) -> None:
        """retry_at uses Retry-After when given, floored at one second."""
        rng = random.Random(0)
        self.assertEqual(retry_at(NOW, 1, rng, 30, 3600, 120.0), NOW + 120)
        self.assertEqual(retry_at(NOW, 1, rng, 30, 3600, 0.0), NOW + 1)
        self.assertEqual(retry_at(NOW, 2, random.Random(4), 30, 3600), NOW + random.Random(4).uniform(0, 60))


class RetryAfterTests(SynchronousTestCase):
    """Parsing Retry-After."""

    def test_seconds(self) -> None:
        """delay-seconds is a delay."""
        self.assertEqual(parse_retry_after(b"120", NOW), 120.0)
        self.assertEqual(parse_retry_after(" 7 ", NOW), 7.0)

    def test_http_dates(self) -> None:
        """IMF-fixdate, RFC 850 and asctime dates give the delay until then."""
        self.assertEqual(parse_retry_after(datetimeToString(int(NOW) + 90), NOW), 90.0)
        self.assertEqual(parse_retry_after("Wednesday, 25-Nov-26 19:31:00 GMT", 1795635000.0), 60.0)
        self.assertEqual(parse_retry_after("Wed Nov 25 19:31:00 2026", 1795635000.0), 60.0)

    def test_past_date_is_zero(self) -> None:
        """A date in the past means now."""
        self.assertEqual(parse_retry_after(datetimeToString(int(NOW) - 90), NOW), 0.0)

    def test_malformed(self) -> None:
        """Missing or malformed values give None."""
        for value in (None, b"", "soon", "-5", "1.5", "Wed, 99 Foo 2026 00:00:00 GMT", "ünïcode"):
            self.assertIsNone(parse_retry_after(value, NOW), value)
