"""After acceptance: parse a stored message, write its files, hand it on.

This is the slow part that the reply to the sender never waits for: it runs
after the spool's journal has the message, in the work thread pool, a
bounded number at a time.  If the process dies in the middle, the journal
still holds the message and the work is done again at the next start
(delivery job creation is idempotent, so that repeats nothing but the
parse).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gomail.parser import parse_message


class MessageProcessor:
    """Parses accepted messages, writes their files, submits them to delivery.

    Parsing is CPU-bound pure Python: run in threads it would hold the GIL
    and stall the reactor (measured: HTTP ingestion fell to a tenth of its
    rate).  So it runs in worker processes (``parser``, an Executor started
    by the service tree); a thread of the work pool waits for each result.
    Tests pass ``parser=None`` to parse in the thread itself.

    Args:
        spool: The spool (``write_files``, ``read_raw``, ``mark_done``).
        reactor: For thread hand-off.
        pool: The work thread pool.
        delivery: The delivery service (``submit(record)``), or None when no
            route is configured: messages are then only stored.
        parallel: Messages processed at once.
        parser: Where to run the parser (a process pool), or None.
    """

    _log = Logger()

    def __init__(
        self,
        spool: Any,
        reactor: Any,
        pool: ThreadPool,
        delivery: Any | None = None,
        *,
        parallel: int = 4,
        parser: Executor | None = None,
    ) -> None:
        self._spool = spool
        self._reactor = reactor
        self._pool = pool
        self._delivery = delivery
        self._gate = DeferredSemaphore(parallel)
        self._parser = parser
        self._active: set[Deferred[None]] = set()
        self.processed = 0
        self.failed = 0

    def message_stored(self, record: dict[str, Any], raw: bytes | None) -> None:
        """Spool callback: a message is durable; ``raw`` None means read the file."""
        d = self._gate.run(lambda: Deferred.fromCoroutine(self._process(record, raw)))
        self._active.add(d)
        d.addErrback(self._failed, record.get("id"))
        d.addBoth(lambda _: self._active.discard(d))

    def set_parser(self, parser: Executor | None) -> None:
        """Use ``parser`` (started by the service tree) from now on."""
        self._parser = parser

    def resume(self, pending: list[tuple[dict[str, Any], bytes | None]]) -> None:
        """Process messages an earlier run accepted but did not finish."""
        for record, raw in pending:
            self.message_stored(record, raw)

    def wait(self) -> Deferred[Any]:
        """Fires when every message started so far is processed."""
        return DeferredList(list(self._active), consumeErrors=True)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def _in_thread(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    async def _process(self, record: dict[str, Any], raw: bytes | None) -> None:
        message_id = record["id"]
        record = dict(record)
        message = record["message"] = await self._in_thread(self._parse, message_id, raw)
        record["subject"] = message.get("subject")
        record["message_id"] = message.get("message_id")
        record["delivery"] = {"state": "queued" if self._delivery is not None else "stored"}
        await self._in_thread(self._spool.write_files, record, raw)
        if self._delivery is not None:
            await self._delivery.submit(record)
        self._spool.mark_done(message_id)
        self.processed += 1

    def _parse(self, message_id: str, raw: bytes | None) -> dict[str, Any]:
        """Work thread: parse here, or wait for a parser process."""
        if self._parser is None:
            if raw is None:
                raw = self._spool.read_raw(message_id)
            return parse_message(raw)
        if raw is None:
            return self._parser.submit(parse_file, self._spool.layout.raw_path(message_id)).result()
        return self._parser.submit(parse_message, raw).result()

    def _failed(self, failure: Any, message_id: str | None) -> None:
        self.failed += 1
        self._log.failure("processing {msg_id} failed; the journal keeps it for the next start", failure, msg_id=message_id)


def parse_file(path: str) -> dict[str, Any]:
    """Parser process: parse the message stored at ``path``."""
    with open(path, "rb") as f:
        return parse_message(f.read())


def parser_processes(workers: int | None = None) -> ProcessPoolExecutor:
    """A pool of parser processes (spawned, not forked: the daemon has threads)."""
    count = workers or max(1, (os.cpu_count() or 2) - 1)
    return ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn"))
