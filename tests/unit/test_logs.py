"""Tests for gomail.logs: compact JSON lines written off the caller's thread."""

from __future__ import annotations

import io
import json
import os
import threading

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gomail import logs


def event(**fields: object) -> dict[str, object]:
    """A log event as twisted.logger makes it."""
    base: dict[str, object] = {"log_level": LogLevel.info, "log_namespace": "gomail.test", "log_time": 0.0, "log_format": ""}
    base.update(fields)
    return base


class EventAsJSONTests(SynchronousTestCase):
    """One event, one compact JSON object."""

    def test_fields(self) -> None:
        """Time, level, namespace, the rendered text and the event's own scalar fields."""
        line = logs.event_as_json(
            event(log_format="queued {msg_id} from {peer}", msg_id="01ABC", peer="192.0.2.1", size=10, log_source=object(), extra=[1, 2])
        )
        self.assertEqual(
            json.loads(line),
            {
                "time": "1970-01-01T00:00:00.000Z",
                "level": "info",
                "namespace": "gomail.test",
                "message": "queued 01ABC from 192.0.2.1",
                "msg_id": "01ABC",
                "peer": "192.0.2.1",
                "size": 10,
            },
        )
        self.assertNotIn("\n", line)

    def test_twisted_format_features(self) -> None:
        """Method calls in fields fall back on twisted's formatter; bad formats do not raise."""
        self.assertEqual(logs.render(event(log_format="{f()} {x!r}", f=lambda: 5, x="y")), "5 'y'")
        self.assertIn("Unable to format event", logs.render(event(log_format="{missing}")))

    def test_failure_traceback(self) -> None:
        """A logged failure carries its traceback."""
        try:
            raise ValueError("boom")
        except ValueError:
            failure = Failure()
        out = json.loads(logs.event_as_json(event(log_level=LogLevel.critical, log_failure=failure, log_format="bug")))
        self.assertEqual(out["level"], "critical")
        self.assertIn("ValueError: boom", out["traceback"])


class SignallingStream(io.StringIO):
    """A text stream that tells when something was written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write(self, text: str) -> int:
        count = super().write(text)
        self.written.set()
        return count


class ObserverTests(SynchronousTestCase):
    """The observer buffers lines and a thread writes them."""

    def make(self, level: LogLevel = LogLevel.info, interval: float = 60.0) -> tuple[logs.JSONLinesObserver, SignallingStream]:
        stream = SignallingStream()
        observer = logs.JSONLinesObserver(stream, level, interval=interval)
        self.addCleanup(observer.close)
        return observer, stream

    def lines(self, stream: io.StringIO) -> list[dict[str, object]]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    def test_buffered_until_flushed(self) -> None:
        """Info lines wait for the writer (here: an explicit flush)."""
        observer, stream = self.make()
        observer(event(log_format="one"))
        observer(event(log_format="two"))
        self.assertEqual(stream.getvalue(), "")
        observer.flush()
        self.assertEqual([line["message"] for line in self.lines(stream)], ["one", "two"])

    def test_level_filter(self) -> None:
        """Events below the configured level are dropped."""
        observer, stream = self.make(level=LogLevel.warn)
        observer(event(log_format="chatty", log_level=LogLevel.info))
        observer(event(log_format="careful", log_level=LogLevel.warn))
        observer.flush()
        self.assertEqual([line["message"] for line in self.lines(stream)], ["careful"])

    def test_warnings_written_at_once(self) -> None:
        """A warning wakes the writer thread: it does not wait for the interval."""
        observer, stream = self.make(interval=60.0)
        observer(event(log_format="quiet"))
        observer(event(log_format="loud", log_level=LogLevel.warn))
        self.assertTrue(stream.written.wait(10))  # long before the 60 s interval
        self.assertEqual([line["message"] for line in self.lines(stream)], ["quiet", "loud"])

    def test_interval(self) -> None:
        """Info lines are written by the thread within the interval."""
        observer, stream = self.make(interval=0.05)
        observer(event(log_format="later"))
        self.assertTrue(stream.written.wait(10))
        self.assertEqual([line["message"] for line in self.lines(stream)], ["later"])

    def test_bounded_when_stuck(self) -> None:
        """A stream that does not keep up costs lines, not memory; the loss is reported."""
        self.patch(logs, "_MAX_BUFFERED", 200)
        observer, stream = self.make()
        for i in range(20):
            observer(event(log_format="line {i}", i=i))
        observer.flush()
        out = self.lines(stream)
        self.assertLess(len(out), 20)
        self.assertEqual(out[-1]["level"], "warn")
        self.assertRegex(str(out[-1]["message"]), r"^\d+ log lines dropped")
        self.assertEqual(len(out) - 1 + int(str(out[-1]["message"]).split()[0]), 20)

    def test_with_a_logger(self) -> None:
        """Events from a twisted Logger come out as lines with their fields."""
        observer, stream = self.make()
        publisher = LogPublisher(observer)
        Logger(namespace="gomail.smtp", observer=publisher).info("queued {msg_id}", msg_id="01XYZ")
        observer.close()
        (line,) = self.lines(stream)
        self.assertEqual((line["namespace"], line["message"], line["msg_id"]), ("gomail.smtp", "queued 01XYZ", "01XYZ"))

    def test_broken_stream(self) -> None:
        """A closed stream loses lines without raising."""
        observer, stream = self.make()
        stream.close()
        observer(event(log_format="lost"))
        observer.flush()


class RobustnessTests(SynchronousTestCase):
    """Odd text and concurrent flushes never cost lines or mangle them."""

    def test_lone_surrogate_and_non_ascii(self) -> None:
        """Text any encoder would choke on is escaped, not dropped with its neighbours."""
        stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
        observer = logs.JSONLinesObserver(stream, interval=60.0)
        self.addCleanup(observer.close)
        observer(event(log_format="before"))
        observer(event(log_format="odd {x}", x="\udcff für"))
        observer(event(log_format="after"))
        observer.flush()
        stream.seek(0)
        self.assertEqual([json.loads(line)["message"] for line in stream.read().splitlines()], ["before", "odd \udcff für", "after"])

    def test_concurrent_flushes_keep_lines_whole(self) -> None:
        """Flushing from several threads at once (the writer thread and exit) never interleaves lines."""
        class SlowStream(io.StringIO):
            def write(self, text: str) -> int:
                for i in range(0, len(text), 7):  # a stream that takes its input in small pieces
                    super().write(text[i : i + 7])
                    os.sched_yield()
                return len(text)

        stream = SlowStream()
        observer = logs.JSONLinesObserver(stream, interval=0.001)
        self.addCleanup(observer.close)
        threads = []
        for n in range(4):
            for i in range(200):
                observer(event(log_format="line {n} {i}", n=n, i=i))
            threads.append(threading.Thread(target=observer.flush))
            threads[-1].start()
        for thread in threads:
            thread.join(10)
        observer.close()
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 800)
        for line in lines:
            json.loads(line)
