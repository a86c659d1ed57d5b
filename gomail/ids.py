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
from collections.abc import Callable
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


class PerSecond:
    """A formatter of whole seconds that formats each second once.

    ``strftime`` and friends cost microseconds; at thousands of messages a
    second the same second is formatted over and over.  The last answer is
    kept in one tuple, so threads may share an instance.

    Args:
        render: Formats a whole second (Unix time) as text.
    """

    def __init__(self, render: Callable[[int], str]) -> None:
        self._render = render
        self._last: tuple[int, str] = (-1, "")

    def __call__(self, second: int) -> str:
        """The text of ``second``."""
        cached, text = self._last
        if cached != second:
            text = self._render(second)
            self._last = (second, text)
        return text


_iso_seconds = PerSecond(lambda second: datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S"))


def iso_utc(now: float) -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``."""
    second, fraction = divmod(round(now * 1_000_000), 1_000_000)
    return f"{_iso_seconds(second)}.{fraction // 1000:03d}Z"


_request_ids = random.Random(os.urandom(32))


def request_id() -> str:
    """A random 32-hex-digit request id (not secret; unique in practice)."""
    return f"{_request_ids.getrandbits(128):032x}"


def session_id() -> str:
    """A random 16-hex-digit SMTP session id for logs (not secret).

    ``secrets.token_hex`` costs a ``getrandom`` system call each time, about
    12 us on a virtual machine: a tenth of what the rest of a session costs.
    """
    return f"{_request_ids.getrandbits(64):016x}"
