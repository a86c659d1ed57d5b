"""Log observers: compact JSON lines for production, text for people.

Use with twistd: ``twistd -n --logger gomail.logs.observer gomail``
(``gomail server`` does this for you).  The level comes from
``GOMAIL_LOGGING__LEVEL`` (debug, info, warn, error; default info).

Each JSON line holds ``time`` (ISO 8601 UTC), ``level``, ``namespace``,
``message`` (the rendered text), the event's own fields whose values are
JSON scalars (``msg_id``, ``session``, ``peer``...) and, for failures,
``traceback``.  twisted's own JSON format writes every internal key of the
event and no rendered text, about 760 bytes for one accepted message; this
one is about a third of that and cheaper to make.

Lines are written by a background thread, not by whoever logs: a stdout
that blocks (a full pipe to journald) never stalls the reactor.  The thread
writes at most every 0.2 s, at once for warnings and worse, and at exit.  A
process killed by SIGKILL can lose the last 0.2 s of log lines (never mail:
the spool does not depend on the log).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

from gomail.ids import iso_utc

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
_RANK = {LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3, LogLevel.critical: 4}
_SCALARS = (str, int, float, bool, type(None))
_MAX_BUFFERED = 4 * 1024 * 1024


def _level() -> LogLevel:
    name = os.environ.get("GOMAIL_LOGGING__LEVEL", "info").lower()
    return _LEVELS.get(name, LogLevel.info)


def render(event: dict[str, Any]) -> str:
    """The event's text: ``str.format_map`` (C speed), else twisted's ``formatEvent``.

    ``formatEvent`` also understands twisted's ``{method()}`` fields and
    reports bad formats instead of raising; it is the fallback.
    """
    text = event.get("log_format")
    if isinstance(text, str):
        try:
            return text.format_map(event)
        except Exception:  # noqa: BLE001 - twisted's formatter copes and explains
            pass
    return formatEvent(event)


def event_as_json(event: dict[str, Any]) -> str:
    """One event as a compact JSON object (no newline)."""
    level = event.get("log_level")
    when = event.get("log_time")
    out: dict[str, Any] = {
        "time": iso_utc(when if isinstance(when, int | float) else time.time()),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": render(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in out and isinstance(value, _SCALARS):
            out[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:  # noqa: BLE001 - never let logging raise
            out["traceback"] = repr(failure)
    # ASCII escapes: any stream encoding takes it, lone surrogates included.
    return json.dumps(out, separators=(",", ":"), default=repr)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Formats events on the caller's thread; a writer thread does the I/O.

    Args:
        stream: A text stream (stdout by default).
        level: Events below this level are dropped.
        interval: Longest time a line waits in the buffer, in seconds.
    """

    def __init__(self, stream: Any = None, level: LogLevel = LogLevel.info, interval: float = 0.2) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._min_rank = _RANK[level]
        self._interval = interval
        self._lines: list[str] = []
        self._size = 0
        self._dropped = 0
        self._lock = threading.Lock()  # the buffer, held briefly by loggers
        self._write_lock = threading.Lock()  # one writer at a time: lines never interleave
        self._urgent = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gomail-log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def __call__(self, event: dict[str, Any]) -> None:
        """Queue one event (any thread)."""
        rank = _RANK.get(event.get("log_level", LogLevel.info), 1)
        if rank < self._min_rank:
            return
        line = event_as_json(event) + "\n"
        with self._lock:
            if self._size > _MAX_BUFFERED:  # the stream is stuck: count, never grow without bound
                self._dropped += 1
                return
            self._lines.append(line)
            self._size += len(line)
        if rank >= 2:
            self._urgent.set()

    def flush(self) -> None:
        """Write what is buffered now (also called at exit)."""
        with self._write_lock:
            with self._lock:
                lines, self._lines, self._size = self._lines, [], 0
                dropped, self._dropped = self._dropped, 0
            if dropped:
                lines.append(json.dumps({"time": iso_utc(time.time()), "level": "warn", "message": f"{dropped} log lines dropped: the log stream was blocked"}) + "\n")
            if not lines:
                return
            try:
                self._stream.write("".join(lines))
                self._stream.flush()
            except (OSError, ValueError):  # closed or broken stream: nothing better to do
                pass

    def close(self) -> None:
        """Write what is buffered and stop the writer thread."""
        self._closed = True
        self._urgent.set()
        self._thread.join(5)
        self.flush()
        atexit.unregister(self.flush)

    def _run(self) -> None:
        while not self._closed:
            self._urgent.wait(self._interval)
            self._urgent.clear()
            self.flush()


def observer(stream: Any = None) -> ILogObserver:
    """JSON lines (one event per line) to stdout, written off the reactor thread."""
    return JSONLinesObserver(stream, _level())


def text_observer(stream: Any = None) -> ILogObserver:
    """Human-readable lines to stdout."""
    inner = textFileLogObserver(stream or sys.stdout)
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(defaultLogLevel=_level())])
