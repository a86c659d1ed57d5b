"""After acceptance: parse a stored message and hand it to delivery.

This is the slow part that the reply to the sender never waits for: it runs
from the spool, in the I/O thread pool, a bounded number at a time.  If the
process dies in the middle, the message's pending marker is still there and
the work is done again at the next start (delivery job creation is
idempotent, so that repeats nothing but the parse).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gomail.parser import parse_message


class MessageProcessor:
    """Parses stored messages and submits them to delivery.

    Args:
        spool: The spool (``read_record``, ``read_raw``, ``write_record``,
            ``mark_handed``).
        reactor: For thread hand-off.
        pool: The work thread pool.
        delivery: The delivery service (``submit(record)``), or None when no
            route is configured: messages are then only stored.
        parallel: Messages parsed at once (bounds memory).
        inline_attachment_limit: Passed to the parser.
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
        inline_attachment_limit: int = 0,
    ) -> None:
        self._spool = spool
        self._reactor = reactor
        self._pool = pool
        self._delivery = delivery
        self._gate = DeferredSemaphore(parallel)
        self._inline = inline_attachment_limit
        self._active: set[Deferred[None]] = set()
        self.processed = 0
        self.failed = 0

    def message_stored(self, message_id: str, raw: bytes | None) -> None:
        """Spool callback: a message's files are written."""
        d = self._gate.run(lambda: Deferred.fromCoroutine(self._process(message_id, raw)))
        self._active.add(d)
        d.addErrback(self._failed, message_id)
        d.addBoth(lambda _: self._active.discard(d))

    def resume(self, message_ids: list[str]) -> None:
        """Process messages left pending by an earlier run."""
        for message_id in message_ids:
            self.message_stored(message_id, None)

    def wait(self) -> Deferred[Any]:
        """Fires when every message started so far is processed."""
        return DeferredList(list(self._active), consumeErrors=True)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def _in_thread(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    async def _process(self, message_id: str, raw: bytes | None) -> None:
        record = await self._in_thread(self._spool.read_record, message_id)
        if record.get("message") is None:
            record["message"] = await self._in_thread(self._parse, message_id, raw)
            record["delivery"] = {"state": "parsed"}
            await self._in_thread(self._spool.write_record, record)
        if self._delivery is not None:
            jobs = await self._delivery.submit(record)
            record["delivery"] = {"state": "queued", "jobs": list(jobs)}
        else:
            record["delivery"] = {"state": "stored"}
        await self._in_thread(self._spool.write_record, record)
        self._spool.mark_handed(message_id)
        self.processed += 1

    def _parse(self, message_id: str, raw: bytes | None) -> dict[str, Any]:
        if raw is None:
            raw = self._spool.read_raw(message_id)
        return parse_message(raw, inline_attachment_limit=self._inline)

    def _failed(self, failure: Any, message_id: str) -> None:
        self.failed += 1
        self._log.failure("processing {msg_id} failed; it stays pending for the next start", failure, msg_id=message_id)
