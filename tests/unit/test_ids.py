"""Tests for gomail.ids: ids, their time, and time formatting."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gomail.ids import IdGenerator, PerSecond, id_millis, id_time, is_valid_id, iso_utc, request_id, session_id


class IdTests(SynchronousTestCase):
    """Ids sort by time, carry their time, and stay valid."""

    @settings(max_examples=200, deadline=None)
    @given(st.floats(min_value=0, max_value=2**47 / 1000, allow_nan=False))
    def test_time_round_trip(self, now: float) -> None:
        """The id's time is the time it was made, to the millisecond."""
        message_id = IdGenerator().make(now)
        self.assertTrue(is_valid_id(message_id))
        self.assertEqual(id_millis(message_id), int(now * 1000))
        self.assertEqual(id_time(message_id), datetime.fromtimestamp(int(now * 1000) / 1000, tz=UTC))

    def test_monotonic_within_a_millisecond(self) -> None:
        """Ids made in the same millisecond still sort in the order they were made."""
        generator = IdGenerator()
        made = [generator.make(1_790_000_000.0001) for _ in range(100)]
        self.assertEqual(made, sorted(made))
        self.assertEqual(len(set(made)), 100)


class RandomIdTests(SynchronousTestCase):
    """Request and session ids: fixed-width lowercase hex, and no repeats in practice."""

    def test_shapes_and_uniqueness(self) -> None:
        sessions = [session_id() for _ in range(10_000)]
        self.assertTrue(all(re.fullmatch(r"[0-9a-f]{16}", s) for s in sessions))
        self.assertEqual(len(set(sessions)), len(sessions))
        self.assertRegex(request_id(), r"^[0-9a-f]{32}$")


class FormattingTests(SynchronousTestCase):
    """Time formatting, cached per second."""

    @settings(max_examples=300, deadline=None)
    @given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
    def test_iso_utc(self, now: float) -> None:
        """ISO 8601 with milliseconds, the same second as datetime gives."""
        text = iso_utc(now)
        self.assertRegex(text, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        self.assertLessEqual(abs(parsed.timestamp() - now), 0.001)

    def test_per_second_formats_each_second_once(self) -> None:
        """Repeated seconds are answered from the cache; a new second is formatted."""
        calls: list[int] = []

        def render(second: int) -> str:
            calls.append(second)
            return f"s{second}"

        formatter = PerSecond(render)
        self.assertEqual([formatter(5), formatter(5), formatter(6), formatter(6), formatter(5)], ["s5", "s5", "s6", "s6", "s5"])
        self.assertEqual(calls, [5, 6, 5])
