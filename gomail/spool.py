"""The durable on-disk spool, with group commit through a journal.

Layout under ``data_dir``::

    journal/<seq>.log              group-commit journal segments (the truth
                                   until a message is processed)
    tmp/                           large messages being received
    messages/YYYY/MM/DD/<id>.eml   the raw message, exactly as received
    messages/YYYY/MM/DD/<id>.json  the record: envelope, summary, parsed
                                   message, delivery state

How a message becomes durable (the acknowledgement waits for this):

* Small messages (up to ``spill_threshold``, 256 KiB by default) are held in
  memory while they arrive.  At commit, the committer thread appends the
  record and the raw bytes of *every* message committed since the previous
  sync to the journal, each entry with a CRC32, and calls ``fdatasync``
  once: one disk flush covers all of them (group commit).  Then the replies
  go out.
* Larger messages are streamed to ``tmp/`` as they arrive (memory stays
  bounded); at commit the file is ``fdatasync``ed, renamed into
  ``messages/...`` and the folder ``fsync``ed, and the journal entry holds
  only the record.

After the reply, the processor parses the message, writes its ``.eml`` and
``.json`` files (temporary name + rename, no fsync each) and hands it to
delivery, then calls :meth:`Spool.mark_done`.  A checkpoint (every
``checkpoint_interval`` seconds, and at shutdown) rotates the journal, runs
one ``syncfs`` so all those files and delivery jobs are on disk, and deletes
the journal segments whose messages are all processed.

At start-up, the journal is replayed: every complete entry whose record is
missing or not yet processed is processed again (its raw file rewritten from
the journal if needed); an incomplete last entry (a crash mid-write) was
never acknowledged and is dropped.  Leftovers in ``tmp/`` are removed.  So a
crash at any point loses no acknowledged message; it may process one twice.

All file I/O runs in thread pools; the reactor thread only appends to
in-memory buffers.  Why a journal rather than an fsync per file: this kind
of disk completes a few thousand syncs a second and creating a file costs
about a millisecond, so files synced one by one cap throughput near a
thousand messages a second (measured); one sync per batch does not.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import threading
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from gomail.errors import GomailError, StorageFailed, Unavailable
from gomail.ids import IdGenerator, id_millis, is_valid_id, iso_utc
from gomail.interfaces import Envelope, IMessageWriter, ISpool, StoredMessage
from gomail.metrics import GomailMetrics

_MAGIC = b"GMJ1"
_HEAD = struct.Struct(">4sIQI")  # magic, record length, raw length, crc32

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _syncfs: Callable[[int], int] | None = _libc.syncfs
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _syncfs = None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_filesystem(path: str) -> None:
    """Flush every dirty file of the file system holding ``path``."""
    if _syncfs is None:  # pragma: no cover
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:  # pragma: no cover
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name and a rename."""
    _write_file(f"{path}.tmp", data)
    os.replace(f"{path}.tmp", path)


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` in place (replacing what is there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class SpoolLayout:
    """Where each file of the spool lives."""

    def __init__(self, data_dir: str) -> None:
        self.root = os.path.abspath(data_dir)
        self.journal = os.path.join(self.root, "journal")
        self.tmp = os.path.join(self.root, "tmp")
        self.messages = os.path.join(self.root, "messages")
        self._day_dirs: dict[int, str] = {}

    def folders(self) -> tuple[str, ...]:
        return (self.root, self.journal, self.tmp, self.messages)

    def message_dir(self, message_id: str) -> str:
        day = id_millis(message_id) // 86_400_000
        found = self._day_dirs.get(day)
        if found is None:
            when = datetime.fromtimestamp(day * 86_400, tz=UTC)
            found = os.path.join(self.messages, f"{when:%Y}", f"{when:%m}", f"{when:%d}")
            if len(self._day_dirs) > 64:
                self._day_dirs.clear()
            self._day_dirs[day] = found
        return found

    def raw_path(self, message_id: str) -> str:
        return os.path.join(self.message_dir(message_id), f"{message_id}.eml")

    def record_path(self, message_id: str) -> str:
        return os.path.join(self.message_dir(message_id), f"{message_id}.json")


def write_message_files(layout: SpoolLayout, record: dict[str, Any], raw: bytes | None) -> None:
    """Write a message's ``.eml`` (when given) and ``.json`` (blocking).

    Runs in a thread or in a parser process.  No fsync: until the
    checkpoint's sync, the journal (not these files) is what recovery
    trusts, and it rewrites a torn file.  The raw file is written first and
    in place; the record appears whole (rename), so a reader that finds the
    record finds both complete.
    """
    message_id = record["id"]
    folder = layout.message_dir(message_id)
    if folder not in _made_dirs:
        os.makedirs(folder, exist_ok=True)
        _made_dirs.add(folder)
    data = json.dumps(record, separators=(",", ":")).encode("utf-8")

    def write() -> None:
        if raw is not None:
            _write_file(layout.raw_path(message_id), raw)
        _write_atomic(layout.record_path(message_id), data)

    try:
        write()
    except FileNotFoundError:  # the folder was removed since we made it
        os.makedirs(folder, exist_ok=True)
        write()


# Day folders this process has made (or found): checking for them before
# every message cost two system calls each.
_made_dirs: set[str] = set()


def envelope_record(message_id: str, received_at: str, envelope: Envelope, size: int) -> dict[str, Any]:
    """The record of a newly accepted message (GoMail's fields first).

    ``subject``, ``message_id`` and ``message`` are filled in by the
    processor after the reply, from the parsed message: nothing is parsed
    on the way to the acknowledgement.
    """
    return {
        "id": message_id,
        "received_at": received_at,
        "transport": envelope.transport,
        "sender": envelope.mail_from,
        "recipient": envelope.rcpt_to[0] if envelope.rcpt_to else "",
        "subject": None,
        "message_id": None,
        "connection": {
            "client_address": envelope.client_address,
            "client_hostname": envelope.client_hostname,
            "client_helo": envelope.helo,
            "client_port": envelope.client_port,
        },
        "authentication": dict(envelope.authentication),
        "envelope": {
            "mail_from": envelope.mail_from,
            "rcpt_to": list(envelope.rcpt_to),
            "helo": envelope.helo,
            "client": {
                "address": envelope.client_address,
                "port": envelope.client_port,
                "hostname": envelope.client_hostname,
            },
            "transport": envelope.transport,
            "tls": envelope.tls,
            "body": envelope.body,
            "smtputf8": envelope.smtputf8,
            "protocol": envelope.protocol,
            "request_id": envelope.request_id,
        },
        "size": size,
        "raw_file": f"{message_id}.eml",
        "message": None,
        "delivery": {"state": "accepted"},
    }


class _Commit:
    """One message waiting for the committer."""

    __slots__ = ("writer", "envelope", "record", "deferred")

    def __init__(self, writer: SpoolWriter, envelope: Envelope, deferred: Deferred[StoredMessage]) -> None:
        self.writer = writer
        self.envelope = envelope
        self.record: dict[str, Any] | None = None
        self.deferred = deferred


@implementer(IMessageWriter)
class SpoolWriter:
    """A message being received: in memory while small, then in ``tmp/``."""

    def __init__(self, spool: Spool, message_id: str, received_at: str, now: float) -> None:
        self._spool = spool
        self.id = message_id
        self.received_at = received_at
        self.started = now
        self.size = 0
        self.buffer: bytearray | None = bytearray()
        self.tmp_path: str | None = None
        self._fd: int | None = None
        self._chain: Deferred[None] = succeed(None)
        self._backlog = 0
        self._drained: Deferred[None] | None = None
        self.failure: BaseException | None = None
        self.closed = False

    def write(self, data: bytes) -> Deferred[None] | None:
        """Append ``data``; a Deferred to wait on when the disk lags behind."""
        if self.closed or not data:
            return None
        self.size += len(data)
        if self.buffer is not None:
            self.buffer += data
            if len(self.buffer) <= self._spool.spill_threshold:
                return None
            data, self.buffer = bytes(self.buffer), None
            self.tmp_path = os.path.join(self._spool.layout.tmp, f"{self.id}.eml.tmp")
        self._backlog += len(data)
        self._chain.addCallback(lambda _: self._spool._in_thread(self._write_chunk, data))
        self._chain.addCallbacks(self._chunk_written, self._remember_failure)
        if self._backlog > self._spool.max_backlog:
            if self._drained is None:
                self._drained = Deferred()
            return self._drained
        return None

    def _write_chunk(self, data: bytes) -> int:
        if self.failure is not None:
            return len(data)
        if self._fd is None:
            assert self.tmp_path is not None
            self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        return len(data)

    def _remember_failure(self, failure: Failure) -> None:
        self.failure = failure.value
        self._backlog = 0
        self._release()

    def _chunk_written(self, written: int) -> None:
        """Reactor thread: a chunk reached the file; maybe resume the client."""
        self._backlog -= written
        if self._backlog <= self._spool.max_backlog // 2:
            self._release()

    def _release(self) -> None:
        if self._drained is not None:
            d, self._drained = self._drained, None
            d.callback(None)

    def commit(self, envelope: Envelope) -> Deferred[StoredMessage]:
        """Make the message durable; fires once it is on disk."""
        if self.closed:
            raise StorageFailed("message already committed or aborted")
        self.closed = True
        d: Deferred[StoredMessage] = Deferred()
        if self.tmp_path is None:  # held in memory: nothing written yet to wait for
            self._spool._enqueue(_Commit(self, envelope, d))
        else:
            self._chain.addBoth(lambda _: self._spool._enqueue(_Commit(self, envelope, d)))
        return d

    def abort(self) -> None:
        """Drop the message and whatever was written of it."""
        if self.closed:
            return
        self.closed = True
        self.buffer = None
        self._chain.addBoth(lambda _: self._spool._in_thread(self.discard_files))
        self._chain.addErrback(lambda f: None)

    def discard_files(self) -> None:
        """Close and remove the temporary file, if any (committer thread)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.tmp_path is not None:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass

    def finish_file(self, final_path: str) -> None:
        """Flush the temporary file to disk and move it into place."""
        assert self._fd is not None and self.tmp_path is not None
        os.fdatasync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.makedirs(os.path.dirname(final_path), exist_ok=True)
        os.replace(self.tmp_path, final_path)
        _fsync_dir(os.path.dirname(final_path))


@implementer(ISpool)
class Spool(Service):
    """The spool service: accepts messages durably and recovers after a crash.

    Args:
        data_dir: Root folder of the spool.
        reactor: Supplies the clock and ``callFromThread``.
        threadpool: The spool's own pool for file I/O (started by the tree).
        metrics: Where to count.
        on_stored: Called on the reactor thread with ``(record, raw or None)``
            once a message is durable; raw is given for messages held in
            memory.  Whoever processes it writes the files
            (:func:`write_message_files`) and calls :meth:`mark_done`; until
            then the journal keeps the message.
        max_unprocessed: Back-pressure: more accepted-but-unprocessed
            messages than this and new ones are refused as ``unavailable``
            (SMTP 421 4.3.2 / HTTP 503), so memory stays bounded.
        commit_linger: Seconds the committer thread waits for more messages
            before it returns to the pool (0: it returns at once).  Under
            load it then never leaves: no thread hand-off per batch; a
            checkpoint due meanwhile runs between two batches.
    """

    name: str = "spool"  # type: ignore[assignment]
    _log = Logger()

    def __init__(
        self,
        data_dir: str,
        reactor: Any,
        threadpool: ThreadPool,
        metrics: GomailMetrics | None = None,
        *,
        spill_threshold: int = 256 * 1024,
        max_backlog: int = 1024 * 1024,
        journal_max: int = 64 * 1024 * 1024,
        checkpoint_interval: float = 2.0,
        min_free_bytes: int = 16 * 1024 * 1024,
        max_unprocessed: int = 50_000,
        commit_linger: float = 0.0,
        on_stored: Callable[[dict[str, Any], bytes | None], object] | None = None,
    ) -> None:
        self.layout = SpoolLayout(data_dir)
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._threads: IReactorFromThreads = reactor
        self._pool = threadpool
        self._metrics = metrics
        self.spill_threshold = spill_threshold
        self.max_backlog = max_backlog
        self._journal_max = journal_max
        self._checkpoint_interval = checkpoint_interval
        self._min_free = min_free_bytes
        self._max_unprocessed = max_unprocessed
        self.on_stored = on_stored
        self._ids = IdGenerator()
        # Shared with the committer thread, under _lock.
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._linger = commit_linger
        self._queue: list[_Commit] = []
        self._committing = False
        self._checkpoint_wanted: bool | None = None  # a checkpoint is due (rotate?)
        # journal segment -> its messages appended but not yet processed.
        # Counted by the committer when it appends, before the reply goes
        # out, and decremented by mark_done: a checkpoint reads it under the
        # lock when it runs, so it never deletes a segment holding a message
        # that was just appended (its acknowledgement still on its way to
        # the reactor) or accepted and not yet processed.
        self._live: dict[int, int] = {}
        self._idle_waiters: list[Deferred[None]] = []
        self._journal_fd: int | None = None
        self._journal_seq = 0
        self._journal_size = 0
        # message id -> journal segment, for messages not yet processed;
        # a segment may be deleted only when none of its messages is here.
        self._unprocessed: dict[str, int] = {}
        self._done_since_checkpoint = 0
        self._checkpoint_loop: LoopingCall | None = None
        self._last_error: str | None = None
        self._space_checked_at = float("-inf")
        self._space_ok = False
        self.recovered: list[tuple[dict[str, Any], bytes | None]] = []

    # -- ISpool ---------------------------------------------------------------

    def begin(self) -> SpoolWriter:
        """Start a new message; refuses when stopped, full or backlogged."""
        if not self.running:
            raise Unavailable("the spool is not running", retry_after=30)
        if len(self._unprocessed) >= self._max_unprocessed:
            raise Unavailable("too many messages waiting to be processed; try again later", retry_after=30)
        if not self._has_space():
            raise StorageFailed("the spool's disk is full", retry_after=60)
        now = self._clock.seconds()
        return SpoolWriter(self, self._ids.make(now), iso_utc(now), now)

    def store(self, envelope: Envelope, raw: bytes) -> Deferred[StoredMessage]:
        """Store a whole message at once."""
        try:
            writer = self.begin()
        except GomailError as e:
            return fail(e)
        writer.write(raw)
        return writer.commit(envelope)

    def is_writable(self) -> bool:
        """Whether the spool takes messages now (for ``/ready``)."""
        return bool(self.running) and self._last_error is None and self._has_space() and os.access(self.layout.root, os.W_OK)

    @property
    def unprocessed(self) -> int:
        """Messages accepted but not yet processed (parsed, handed on)."""
        return len(self._unprocessed)

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        """Recover from the journal, then start taking messages."""
        for folder in self.layout.folders():
            os.makedirs(folder, exist_ok=True)
        self.recovered = self.recover()
        self._open_segment()
        super().startService()
        self._checkpoint_loop = LoopingCall(self._periodic_checkpoint)
        self._checkpoint_loop.clock = self._clock
        self._checkpoint_loop.start(self._checkpoint_interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Finish committing, then checkpoint what was processed."""
        super().stopService()
        with self._lock:
            self._more.notify()  # a lingering committer stops at once
        if self._checkpoint_loop is not None and self._checkpoint_loop.running:
            self._checkpoint_loop.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.wait_idle()
        with self._lock:
            self._committing = True  # no batch while the last checkpoint runs
        try:
            await self._in_thread(self._checkpoint)
        finally:
            self._checkpoint_done()
        await self.wait_idle()
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def wait_idle(self) -> Deferred[None]:
        """Fires when no commit batch is running or queued."""
        with self._lock:
            idle = not self._committing and not self._queue
        if idle:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    # -- committing -----------------------------------------------------------

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _has_space(self) -> bool:
        """Free space check, cached for a second (statvfs is not free)."""
        now = self._clock.seconds()
        if now - self._space_checked_at >= 1.0 or now < self._space_checked_at:
            self._space_checked_at = now
            try:
                st = os.statvfs(self.layout.root)
                self._space_ok = st.f_bavail * st.f_frsize >= self._min_free
            except OSError:
                self._space_ok = False
        return self._space_ok

    def _enqueue(self, item: _Commit) -> None:
        """Reactor: queue a message for the committer; start it if idle."""
        with self._lock:
            self._queue.append(item)
            if self._committing:
                self._more.notify()
                return
            self._committing = True
        self._start_committer()

    def _start_committer(self) -> None:
        d = self._in_thread(self._commit_loop)
        d.addErrback(self._committer_crashed)
        d.addBoth(lambda _: self._maybe_idle())

    def _commit_loop(self) -> None:
        """Committer thread: commit batch after batch until the queue is empty.

        The next batch starts as soon as the previous sync returns, without a
        round trip through the reactor; replies go back by ``callFromThread``.
        """
        while True:
            with self._lock:
                if not self._queue and self._checkpoint_wanted is None and self._linger > 0 and self.running:
                    # Linger for the next message: under load this saves a
                    # thread hand-off and a wake-up of the reactor per batch.
                    self._more.wait(self._linger)
                checkpoint, self._checkpoint_wanted = self._checkpoint_wanted, None
                if checkpoint is None and not self._queue:
                    self._committing = False
                    return
                batch, self._queue = self._queue, []
            if checkpoint is not None:
                self._checkpoint_between_batches(checkpoint)
            if not batch:
                continue
            if self._metrics is not None:
                self._metrics.spool_commit_batch.observe(len(batch))
            try:
                self._commit_batch(batch)
            except Exception as e:  # pragma: no cover - a bug
                self._log.failure("commit batch crashed")
                for item in batch:
                    self._threads.callFromThread(self._fail, item, StorageFailed(f"internal error while storing: {e!r}"))

    def _checkpoint_between_batches(self, rotate: bool) -> None:
        """Committer thread: a checkpoint asked for while the committer was busy."""
        try:
            self._checkpoint(rotate)
        except Exception:  # noqa: BLE001 - logged; the next checkpoint tries again
            self._log.failure("checkpoint failed")

    def _committer_crashed(self, failure: Failure) -> None:  # pragma: no cover - a bug
        self._log.failure("the committer crashed", failure)
        with self._lock:
            self._committing = False

    def _maybe_idle(self) -> None:
        """Reactor: wake ``wait_idle`` callers once nothing is queued or running."""
        with self._lock:
            idle = not self._committing and not self._queue
        if idle:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)

    def _commit_batch(self, batch: list[_Commit]) -> None:
        """Committer thread: one journal append and one sync for the batch."""
        good: list[_Commit] = []
        for item in batch:
            w = item.writer
            try:
                if w.failure is not None:
                    raise w.failure
                item.record = envelope_record(w.id, w.received_at, item.envelope, w.size)
                if w.tmp_path is not None:
                    w.finish_file(self.layout.raw_path(w.id))
                good.append(item)
            except Exception as e:  # noqa: BLE001 - reported to the client as storage
                w.discard_files()
                self._fail_from_thread(item, e)
        if not good:
            return
        try:
            seq = self._append_journal(good)
        except Exception as e:  # noqa: BLE001
            for item in good:
                if item.writer.tmp_path is not None:
                    _unlink_quietly(self.layout.raw_path(item.writer.id))
                self._fail_from_thread(item, e)
            return
        self._last_error = None
        with self._lock:
            self._live[seq] = self._live.get(seq, 0) + len(good)
        self._threads.callFromThread(self._acknowledge, good, seq)

    def _fail_from_thread(self, item: _Commit, error: BaseException) -> None:
        if isinstance(error, OSError):
            self._last_error = os.strerror(error.errno) if error.errno else str(error)
            msg = "the spool's disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "could not write the message to the spool"
            error = StorageFailed(msg, retry_after=60)
        elif not isinstance(error, GomailError):
            error = StorageFailed("could not write the message to the spool", retry_after=60)
        self._threads.callFromThread(self._fail, item, error)

    def _fail(self, item: _Commit, error: BaseException) -> None:
        self._log.error("storing {msg_id} failed: {error}", msg_id=item.writer.id, error=str(error))
        if self._metrics is not None:
            self._metrics.errors.labels("storage").inc()
        item.deferred.errback(error)

    def _acknowledge(self, items: list[_Commit], seq: int) -> None:
        """Reactor thread: the batch is durable; reply, then hand it on."""
        for item in items:
            self._unprocessed[item.writer.id] = seq
        metrics = self._metrics
        if metrics is not None:
            metrics.child(metrics.spool_messages, "unprocessed").set(len(self._unprocessed))
        for item in items:
            w = item.writer
            if metrics is not None:
                metrics.child(metrics.messages_received, item.envelope.transport).inc()
                metrics.message_size.observe(w.size)
            item.deferred.callback(StoredMessage(w.id, w.received_at, w.size))
        for item in items:
            raw = bytes(item.writer.buffer) if item.writer.buffer is not None else None
            item.writer.buffer = None
            assert item.record is not None
            if self.on_stored is not None:
                self.on_stored(item.record, raw)

    def _append_journal(self, items: list[_Commit]) -> int:
        assert self._journal_fd is not None
        chunks: list[bytes] = []
        for item in items:
            record = json.dumps(item.record, separators=(",", ":")).encode("utf-8")
            raw = bytes(item.writer.buffer) if item.writer.buffer is not None else b""
            crc = zlib.crc32(raw, zlib.crc32(record))
            chunks += [_HEAD.pack(_MAGIC, len(record), len(raw), crc), record, raw]
        data = b"".join(chunks)
        start = self._journal_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._journal_fd, view) :]
            os.fdatasync(self._journal_fd)
        except OSError:
            # Leave no partial entry behind: cut the segment back.
            try:
                os.ftruncate(self._journal_fd, start)
            except OSError:
                pass
            raise
        self._journal_size += len(data)
        return self._journal_seq

    # -- after acceptance (called by the processor) --------------------------

    def mark_done(self, message_id: str) -> None:
        """Reactor thread: the message is processed (files written, handed on)."""
        seq = self._unprocessed.pop(message_id, None)
        if seq is not None:
            with self._lock:
                left = self._live.get(seq, 0) - 1
                if left > 0:
                    self._live[seq] = left
                else:
                    self._live.pop(seq, None)
            self._done_since_checkpoint += 1
            if self._metrics is not None:
                self._metrics.child(self._metrics.spool_messages, "unprocessed").set(len(self._unprocessed))

    # -- checkpoints and recovery ------------------------------------------

    def _segment_path(self, seq: int) -> str:
        return os.path.join(self.layout.journal, f"{seq:012d}.log")

    def _open_segment(self) -> None:
        self._journal_seq += 1
        path = self._segment_path(self._journal_seq)
        self._journal_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._journal_size = 0
        _fsync_dir(self.layout.journal)

    def _periodic_checkpoint(self) -> None:
        if not (self._done_since_checkpoint or self._journal_size > self._journal_max):
            return
        rotate = self._journal_size > 0
        with self._lock:
            if self._committing or self._queue:
                # The committer is busy (or lingering): it runs the
                # checkpoint between two batches.
                if self._committing and self._checkpoint_wanted is None:
                    self._checkpoint_wanted = rotate
                    self._done_since_checkpoint = 0
                    self._more.notify()
                return
            self._committing = True  # the committer waits for the checkpoint
        self._done_since_checkpoint = 0
        d = self._in_thread(self._checkpoint, rotate)
        d.addErrback(lambda f: self._log.failure("checkpoint failed", f))
        d.addBoth(lambda _: self._checkpoint_done())

    def _checkpoint_done(self) -> None:
        """Reactor: commit what arrived during the checkpoint, or go idle."""
        with self._lock:
            self._checkpoint_wanted = None  # one asked for meanwhile: this one did it
            resume = bool(self._queue)
            self._committing = resume
        if resume:
            self._start_committer()
        else:
            self._maybe_idle()

    def _checkpoint(self, rotate: bool = True) -> None:
        """Committer thread: sync the written files, then drop old segments.

        One ``syncfs`` covers every message file and delivery job written
        since the previous checkpoint; only then are the journal segments
        whose messages are all processed deleted.  Runs only while no batch
        is being appended (in the committer, or with ``_committing`` held).
        """
        with self._lock:
            oldest_live = min(self._live, default=None)
        upto = self._journal_seq if oldest_live is None else min(self._journal_seq, oldest_live - 1)
        if rotate and self._journal_size > 0 and self._journal_fd is not None:
            old = self._journal_fd
            self._open_segment()
            os.close(old)
        old_segments = [n for n in os.listdir(self.layout.journal) if n.endswith(".log") and int(n[:-4]) <= upto and int(n[:-4]) != self._journal_seq]
        if not old_segments:
            return
        _sync_filesystem(self.layout.root)
        for name in old_segments:
            os.unlink(os.path.join(self.layout.journal, name))

    def recover(self) -> list[tuple[dict[str, Any], bytes | None]]:
        """Replay the journal and clear ``tmp/``; the messages to process.

        Runs at start-up, before anything is served, so it may block.  A
        journal entry whose record file is missing, unreadable or still
        ``accepted`` was not processed: its raw file is rewritten from the
        journal if needed and it is returned for processing again.
        """
        for name in os.listdir(self.layout.tmp):
            _unlink_quietly(os.path.join(self.layout.tmp, name))
        for dirpath, _dirs, files in os.walk(self.layout.messages):
            for name in files:
                if name.endswith(".tmp"):
                    _unlink_quietly(os.path.join(dirpath, name))
        segments = sorted(n for n in os.listdir(self.layout.journal) if n.endswith(".log"))
        pending: list[tuple[dict[str, Any], bytes | None]] = []
        for name in segments:
            seq = int(name[:-4])
            self._journal_seq = max(self._journal_seq, seq)
            for record, raw in _read_journal(os.path.join(self.layout.journal, name)):
                message_id = record.get("id", "")
                if not is_valid_id(message_id):
                    continue
                raw_path = self.layout.raw_path(message_id)
                if raw and not _complete(raw_path, len(raw)):
                    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
                    _write_atomic(raw_path, raw)
                if self._processed(message_id):
                    continue
                pending.append((record, None))
                self._unprocessed[message_id] = seq
                self._live[seq] = self._live.get(seq, 0) + 1
        if segments and not pending:
            _sync_filesystem(self.layout.root)
            for name in segments:
                os.unlink(os.path.join(self.layout.journal, name))
            _fsync_dir(self.layout.journal)
        self._log.info(
            "spool recovered: {segments} journal segments read, {pending} messages to process again",
            segments=len(segments),
            pending=len(pending),
        )
        return pending

    def _processed(self, message_id: str) -> bool:
        try:
            with open(self.layout.record_path(message_id), "rb") as f:
                record = json.loads(f.read())
        except (OSError, ValueError):
            return False
        return record.get("delivery", {}).get("state") not in (None, "accepted")

    # -- reading (for delivery and the processor) --------------------------

    def read_record(self, message_id: str) -> dict[str, Any]:
        """The record of a message (blocking; call in a thread)."""
        with open(self.layout.record_path(message_id), "rb") as f:
            result: dict[str, Any] = json.loads(f.read())
        return result

    def read_raw(self, message_id: str) -> bytes:
        """The raw bytes of a message (blocking; call in a thread)."""
        with open(self.layout.raw_path(message_id), "rb") as f:
            return f.read()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _complete(path: str, size: int) -> bool:
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def _read_journal(path: str) -> Any:
    """Yield ``(record, raw)`` for each complete, intact entry of a segment."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + _HEAD.size <= len(data):
        magic, rlen, blen, crc = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        end = start + rlen + blen
        if magic != _MAGIC or end > len(data):
            return
        record_bytes, raw = data[start : start + rlen], data[start + rlen : end]
        if zlib.crc32(raw, zlib.crc32(record_bytes)) != crc:
            return
        try:
            record = json.loads(record_bytes)
        except ValueError:
            return
        yield record, raw
        pos = end


__all__ = ["Spool", "SpoolLayout", "SpoolWriter", "envelope_record"]
