"""Log observers: JSON lines for production, filtered by level.

Use with twistd: ``twistd -n --logger gomail.logs.observer gomail``
(``gomail server`` does this for you).  The level comes from
``GOMAIL_LOGGING__LEVEL`` (debug, info, warn, error; default info).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)


def _level() -> LogLevel:
    name = os.environ.get("GOMAIL_LOGGING__LEVEL", "info").lower()
    return {"debug": LogLevel.debug, "warn": LogLevel.warn, "error": LogLevel.error}.get(name, LogLevel.info)


def observer(stream: Any = None) -> ILogObserver:
    """JSON lines (one event per line, record separator free) to stdout."""
    inner = jsonFileLogObserver(stream or sys.stdout, recordSeparator="")
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(defaultLogLevel=_level())])


def text_observer(stream: Any = None) -> ILogObserver:
    """Human-readable lines to stdout."""
    inner = textFileLogObserver(stream or sys.stdout)
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(defaultLogLevel=_level())])
