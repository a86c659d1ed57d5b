"""Message ids that sort by time and are unique across restarts.

An id is 26 characters of Crockford base32: 48 bits of milliseconds since the
Unix epoch followed by 80 random bits (the ULID layout).  Within one process,
ids made in the same millisecond increment the random part, so they still sort
in the order they were made.  The date of the message is readable from the id,
which is how the spool finds a message's folder from its id alone.
"""

from __future__ import annotations

import os
import random
import re
from datetime import UTC, datetime

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
ID_PATTERN = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
# Every pair of digits, indexed by the 10 bits they encode.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def _encode(value: int, length: int) -> str:
    """``value`` as ``length`` Crockford base32 digits, most significant first."""
    head = _ALPHABET[(value >> (5 * (length - 1))) & 31] if length % 2 else ""
    return head + "".join([_PAIRS[(value >> shift) & 1023] for shift in range(5 * (length - 2 - length % 2), -1, -10)])


class IdGenerator:
    """Makes ids from a time source; monotonic within one generator.

    The random part comes from a PRNG seeded from the OS once: ids must be
    unique, not secret, and a system call per id is measurably slow here.
    """

    def __init__(self, random_bytes: object = None) -> None:
        rng = random.Random(os.urandom(32))
        self._random_bytes = random_bytes or rng.randbytes
        self._last_ms = -1
        self._last_random = 0

    def make(self, now: float) -> str:
        """An id for a message received at ``now`` (Unix seconds)."""
        ms = int(now * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            rnd = (self._last_random + 1) & ((1 << 80) - 1)
        else:
            rnd = int.from_bytes(self._random_bytes(10), "big")  # type: ignore[operator]
        self._last_ms, self._last_random = ms, rnd
        return _encode((ms << 80) | rnd, 26)


def is_valid_id(value: str) -> bool:
    """Whether ``value`` has the shape of a gomail id (safe as a file name)."""
    return bool(ID_PATTERN.match(value))


def id_millis(message_id: str) -> int:
    """The milliseconds since the epoch encoded in an id."""
    ms = 0
    for ch in message_id[:10]:
        ms = (ms << 5) | _DECODE[ch]
    return ms


def id_time(message_id: str) -> datetime:
    """The UTC time encoded in an id."""
    return datetime.fromtimestamp(id_millis(message_id) / 1000, tz=UTC)


_iso_second: tuple[int, str] = (-1, "")


def iso_utc(now: float) -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``.

    The text up to the seconds is formatted once per second: ``strftime``
    is a measurable share of the per-message work at thousands a second.
    """
    global _iso_second
    second, fraction = divmod(round(now * 1_000_000), 1_000_000)
    cached, text = _iso_second  # one tuple: safe to share between threads
    if cached != second:
        text = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _iso_second = (second, text)
    return f"{text}.{fraction // 1000:03d}Z"


_request_ids = random.Random(os.urandom(32))


def request_id() -> str:
    """A random 32-hex-digit request id (not secret; unique in practice)."""
    return f"{_request_ids.getrandbits(128):032x}"
