"""After acceptance: parse stored messages, write their files, hand them on.

This is the slow part that the reply to the sender never waits for: it runs
after the spool's journal has the message.  Messages are taken in batches:
one hop to the work thread pool per batch parses every message of it (in
parser processes, all at once) and writes its ``.eml`` and ``.json``; back
on the reactor each is submitted to delivery and marked done.  Batching
keeps the reactor's share of the work (thread hand-offs) small when mail
arrives fast.  If the process dies in the middle, the journal still holds
the messages and the work is done again at the next start (delivery job
creation is idempotent, so that repeats nothing but the parse).
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gomail.parser import parse_message
from gomail.spool import SpoolLayout, write_message_files

Item = tuple[dict[str, Any], bytes | None]


class MessageProcessor:
    """Parses accepted messages, writes their files, submits them to delivery.

    Parsing is CPU-bound pure Python: run in threads it would hold the GIL
    and slow the reactor.  So it runs in worker processes (``parser``, an
    Executor started by the service tree); the work thread waits for the
    results.  Tests pass ``parser=None`` to parse in the thread itself.

    Args:
        spool: The spool (``layout``, ``mark_done``).
        reactor: For thread hand-off.
        pool: The work thread pool.
        delivery: The delivery service (``submit_many(records)``), or None when no
            route is configured: messages are then only stored.
        batch_size: Most messages handled in one thread hop.
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
        batch_size: int = 64,
        parser: Executor | None = None,
    ) -> None:
        self._spool = spool
        self._reactor = reactor
        self._pool = pool
        self._delivery = delivery
        self._batch_size = batch_size
        self._parser = parser
        self._queue: deque[Item] = deque()
        self._running: Deferred[None] | None = None
        self._current = 0
        self.processed = 0
        self.failed = 0

    def set_parser(self, parser: Executor | None) -> None:
        """Use ``parser`` (started by the service tree) from now on."""
        self._parser = parser

    def message_stored(self, record: dict[str, Any], raw: bytes | None) -> None:
        """Spool callback: a message is durable; ``raw`` None means read the file."""
        self._queue.append((record, raw))
        if self._running is None:
            self._running = Deferred.fromCoroutine(self._drain())
            self._running.addErrback(lambda f: self._log.failure("the processor stopped", f))

    def resume(self, pending: list[Item]) -> None:
        """Process messages an earlier run accepted but did not finish."""
        for record, raw in pending:
            self.message_stored(record, raw)

    @property
    def in_flight(self) -> int:
        """Messages queued or being processed."""
        return len(self._queue) + self._current

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
                self._current = len(batch)
                results = await deferToThreadPool(self._reactor, self._pool, self._prepare, batch)
                await self._hand_on([record.get("id") for record, _ in batch], results)
                self._current = 0
        finally:
            self._current = 0
            self._running = None

    async def _hand_on(self, message_ids: list[str | None], results: list[dict[str, Any] | BaseException]) -> None:
        """Submit the batch's prepared messages to delivery together, then mark them done."""
        ready: list[dict[str, Any]] = []
        for message_id, result in zip(message_ids, results, strict=True):
            if isinstance(result, BaseException):
                self._failed(result, message_id)
            else:
                ready.append(result)
        if not ready:
            return
        if self._delivery is not None:
            try:
                await self._delivery.submit_many(ready)
            except Exception as e:  # noqa: BLE001 - logged; the journal keeps the messages
                for record in ready:
                    self._failed(e, record["id"])
                return
        for record in ready:
            self._spool.mark_done(record["id"])
            self.processed += 1

    def _prepare(self, batch: list[Item]) -> list[dict[str, Any] | BaseException]:
        """Work thread: have every message of the batch parsed and written.

        With parser processes, the whole job (parse, JSON, file writes) runs
        there, one submission per process and batch, so the daemon's threads
        only wait: file system calls or per-message hand-offs made from
        threads here would keep trading the GIL with the reactor (measured:
        tens of thousands of futex calls a second).
        """
        state = "queued" if self._delivery is not None else "stored"
        root = self._spool.layout.root
        if self._parser is None:
            return [_as_error(r) for r in prepare_batch(root, batch, state)]
        workers = max(1, getattr(self._parser, "_max_workers", 1))
        size = -(-len(batch) // workers)
        chunks = [batch[i : i + size] for i in range(0, len(batch), size)]
        futures = [self._parser.submit(prepare_batch, root, chunk, state) for chunk in chunks]
        out: list[dict[str, Any] | BaseException] = []
        for chunk, future in zip(chunks, futures, strict=True):
            try:
                out += [_as_error(r) for r in future.result()]
            except Exception as e:  # noqa: BLE001 - a parser process died
                out += [e] * len(chunk)
        return out

    def _failed(self, error: BaseException, message_id: str | None) -> None:
        self.failed += 1
        self._log.error(
            "processing {msg_id} failed ({error!r}); the journal keeps it for the next start",
            msg_id=message_id,
            error=error,
        )


def prepare_batch(root: str, batch: list[Item], state: str) -> list[dict[str, Any] | str]:
    """Parser process: :func:`prepare_message` for each; a failure becomes its text."""
    out: list[dict[str, Any] | str] = []
    for record, raw in batch:
        try:
            out.append(prepare_message(root, record, raw, state))
        except Exception as e:  # noqa: BLE001 - reported per message
            out.append(f"{type(e).__name__}: {e}")
    return out


def _as_error(result: dict[str, Any] | str) -> dict[str, Any] | BaseException:
    return RuntimeError(result) if isinstance(result, str) else result


# One layout per spool folder in each process, so its day-folder cache lasts
# beyond one message.
_layout = functools.lru_cache(maxsize=4)(SpoolLayout)


def prepare_message(root: str, record: dict[str, Any], raw: bytes | None, state: str) -> dict[str, Any]:
    """Parse a message and write its files; the record without the parsed body.

    Runs in a parser process (or inline in tests).  ``raw`` None means the
    raw file is already in place (a large or recovered message).
    """
    layout = _layout(root)
    message_id = record["id"]
    if raw is None:
        with open(layout.raw_path(message_id), "rb") as f:
            message = parse_message(f.read())
    else:
        message = parse_message(raw)
    full = dict(record)
    full["subject"] = message.get("subject")
    full["message_id"] = message.get("message_id")
    full["message"] = message
    full["delivery"] = {"state": state}
    write_message_files(layout, full, raw)
    full.pop("message")
    return full


def die_with_parent(nice: int = 19) -> None:
    """Parser process start-up: exit when the daemon dies, even by SIGKILL;
    run at CPU niceness ``nice``.

    Without this a killed daemon leaves its parser processes (and
    multiprocessing's resource tracker) running forever.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)
    # Ctrl-C in a terminal reaches the whole process group; the daemon
    # shuts its parsers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Accepting mail comes first: parsing can catch up after a burst, a
    # client kept waiting for its reply cannot.
    try:
        os.nice(max(0, nice - os.nice(0)))  # os.nice adds; we want ``nice`` itself
    except OSError:  # pragma: no cover
        pass


def parser_processes(workers: int | None = None, nice: int = 19) -> ProcessPoolExecutor:
    """A pool of parser processes (spawned, not forked: the daemon has threads)."""
    count = workers or max(1, (os.cpu_count() or 2) - 1)
    return ProcessPoolExecutor(
        max_workers=count,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=die_with_parent,
        initargs=(nice,),
    )
