"""Fakes shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure


class ThreadlessReactor(Clock):
    """A Clock that also runs ``callFromThread`` calls at once."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class ManualThreadPool:
    """A thread pool stand-in: work waits until the test runs it.

    With ``auto=True`` work runs at once, synchronously.
    """

    def __init__(self, auto: bool = False) -> None:
        self.auto = auto
        self.queue: list[tuple[Callable[..., Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def callInThreadWithCallback(self, on_result: Callable[..., Any], f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.queue.append((on_result, f, args, kwargs))
        if self.auto:
            self.run_all()

    def callInThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.callInThreadWithCallback(lambda ok, result: None, f, *args, **kwargs)

    def run_one(self) -> bool:
        if not self.queue:
            return False
        on_result, f, args, kwargs = self.queue.pop(0)
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)
        return True

    def run_all(self, limit: int = 10000) -> int:
        ran = 0
        while ran < limit and self.run_one():
            ran += 1
        return ran
