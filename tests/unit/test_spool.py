"""Tests for gomail.spool: durable writes, group commit, recovery."""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.trial.unittest import SynchronousTestCase

from gomail.errors import StorageFailed, Unavailable
from gomail.ids import is_valid_id
from gomail.interfaces import Envelope
from gomail.metrics import GomailMetrics
from gomail.spool import Spool, _read_journal, write_message_files
from tests.fakes import ManualThreadPool, ThreadlessReactor

RAW = b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: Hello\r\nMessage-ID: <m1@example.org>\r\n\r\nHi Bob\r\n"
ENVELOPE = Envelope(
    transport="smtp",
    mail_from="alice@example.org",
    rcpt_to=("bob@example.com", "carol@example.com"),
    helo="mx.example.org",
    client_address="203.0.113.5",
    client_port=4321,
)


class SpoolTestBase(SynchronousTestCase):
    def make_spool(self, auto: bool = True, **kwargs: object) -> Spool:
        self.dir = getattr(self, "dir", None) or self.mktemp()
        self.reactor = ThreadlessReactor()
        self.reactor.advance(1_790_000_000)
        self.pool = ManualThreadPool(auto=auto)
        self.metrics = GomailMetrics(CollectorRegistry())
        self.stored: list[tuple[str, bytes | None]] = []
        spool = Spool(self.dir, self.reactor, self.pool, self.metrics, on_stored=lambda i, r: self.stored.append((i, r)), **kwargs)  # type: ignore[arg-type]
        spool.startService()
        self.addCleanup(lambda: spool.running and self._stop(spool))
        return spool

    def _stop(self, spool: Spool) -> None:
        d = spool.stopService()
        self.pool.auto = True
        self.pool.run_all()
        self.successResultOf(d)


class StoreTests(SpoolTestBase):
    def test_store_is_durable_in_the_journal_and_hands_the_record_on(self) -> None:
        """A stored message is in the journal at ack time; the processor gets its record and bytes."""
        spool = self.make_spool()
        stored = self.successResultOf(spool.store(ENVELOPE, RAW))
        self.assertTrue(is_valid_id(stored.id))
        self.assertEqual(stored.size, len(RAW))
        self.assertEqual(stored.received_at, "2026-09-21T14:13:20.000Z")
        ((record, raw),) = self.stored
        self.assertEqual(raw, RAW)
        self.assertEqual(record["id"], stored.id)
        self.assertEqual(record["sender"], "alice@example.org")
        self.assertEqual(record["recipient"], "bob@example.com")
        self.assertEqual(
            record["connection"],
            {"client_address": "203.0.113.5", "client_hostname": None, "client_helo": "mx.example.org", "client_port": 4321},
        )
        self.assertEqual(record["envelope"]["rcpt_to"], ["bob@example.com", "carol@example.com"])
        self.assertEqual(record["delivery"], {"state": "accepted"})
        (segment,) = os.listdir(spool.layout.journal)
        entries = list(_read_journal(os.path.join(spool.layout.journal, segment)))
        self.assertEqual(entries, [(record, RAW)])
        self.assertEqual(spool.unprocessed, 1)

    def test_message_files_go_in_the_dated_folder(self) -> None:
        """write_message_files lays out messages/YYYY/MM/DD/<id>.eml and .json."""
        spool = self.make_spool()
        stored = self.successResultOf(spool.store(ENVELOPE, RAW))
        ((record, raw),) = self.stored
        write_message_files(spool.layout, {**record, "delivery": {"state": "stored"}}, raw)
        spool.mark_done(stored.id)
        folder = os.path.join(self.dir, "messages", "2026", "09", "21")
        with open(os.path.join(folder, f"{stored.id}.eml"), "rb") as f:
            self.assertEqual(f.read(), RAW)
        self.assertEqual(spool.read_record(stored.id)["delivery"], {"state": "stored"})
        self.assertEqual(spool.unprocessed, 0)

    def test_ids_sort_by_time_and_are_unique(self) -> None:
        """Ids made in one millisecond and later still sort in order and differ."""
        spool = self.make_spool()
        ids = [self.successResultOf(spool.store(ENVELOPE, RAW)).id for _ in range(3)]
        self.reactor.advance(0.5)
        ids.append(self.successResultOf(spool.store(ENVELOPE, RAW)).id)
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 4)

    def test_ack_waits_for_the_journal_sync(self) -> None:
        """The commit Deferred fires only after the committer ran."""
        spool = self.make_spool(auto=False)
        d = spool.store(ENVELOPE, RAW)
        self.assertNoResult(d)
        self.pool.run_one()
        self.successResultOf(d)

    def test_group_commit_batches_messages_that_arrive_during_a_sync(self) -> None:
        """Messages waiting for the committer share one sync; one arriving during a sync gets the next, in the same run."""
        spool = self.make_spool(auto=False)
        waiting = [spool.store(ENVELOPE, RAW + bytes([65 + i])) for i in range(4)]
        self.assertEqual(len(self.pool.queue), 1)
        real_append = spool._append_journal
        late: list[Any] = []

        def append(items: Any) -> int:
            if not late:  # a message finishes arriving while this batch syncs
                late.append(spool.store(ENVELOPE, RAW))
            return real_append(items)

        spool._append_journal = append  # type: ignore[method-assign]
        self.pool.run_one()
        for d in waiting + late:
            self.successResultOf(d)
        self.assertEqual(self.pool.queue, [])
        samples = {s.labels.get("le"): s.value for m in self.metrics.registry.collect() for s in m.samples if s.name == "gomail_spool_commit_batch_size_bucket"}
        self.assertEqual((samples["1.0"], samples["4.0"]), (1, 2))
        self.assertTrue(self.successResultOf(spool.wait_idle()) is None)

    def test_refuses_when_not_running(self) -> None:
        """A stopped spool refuses new messages as unavailable."""
        spool = self.make_spool()
        self._stop(spool)
        self.assertRaises(Unavailable, spool.begin)

    def test_backlog_of_unprocessed_messages_applies_back_pressure(self) -> None:
        """Past max_unprocessed, new messages are refused as unavailable until some are processed."""
        spool = self.make_spool(max_unprocessed=2)
        first = self.successResultOf(spool.store(ENVELOPE, RAW))
        self.successResultOf(spool.store(ENVELOPE, RAW))
        error = self.assertRaises(Unavailable, spool.begin)
        self.assertEqual(error.retry_after, 30)
        spool.mark_done(first.id)
        spool.begin().abort()


class LargeMessageTests(SpoolTestBase):
    def test_large_message_streams_to_tmp_and_lands_intact(self) -> None:
        """Past the spill threshold the bytes go to tmp/ and the final file is exact at ack time."""
        spool = self.make_spool(spill_threshold=64)
        writer = spool.begin()
        chunks = [RAW] + [bytes([48 + i % 10]) * 50 + b"\r\n" for i in range(20)]
        for chunk in chunks:
            writer.write(chunk)
        self.assertIsNone(writer.buffer)
        stored = self.successResultOf(writer.commit(ENVELOPE))
        with open(spool.layout.raw_path(stored.id), "rb") as f:
            self.assertEqual(f.read(), b"".join(chunks))
        self.assertEqual(os.listdir(spool.layout.tmp), [])
        self.assertEqual([(r["id"], raw) for r, raw in self.stored], [(stored.id, None)])

    def test_backpressure_deferred_fires_when_disk_catches_up(self) -> None:
        """write() asks the caller to pause past max_backlog and resumes it later."""
        spool = self.make_spool(auto=False, spill_threshold=10, max_backlog=100)
        writer = spool.begin()
        self.assertIsNone(writer.write(b"x" * 50))
        pause = writer.write(b"y" * 200)
        self.assertIsNotNone(pause)
        self.assertNoResult(pause)
        self.pool.run_all()
        self.successResultOf(pause)

    def test_abort_removes_the_temporary_file(self) -> None:
        """An aborted large message leaves nothing in tmp/."""
        spool = self.make_spool(spill_threshold=10)
        writer = spool.begin()
        writer.write(b"z" * 100)
        self.assertEqual(len(os.listdir(spool.layout.tmp)), 1)
        writer.abort()
        self.assertEqual(os.listdir(spool.layout.tmp), [])


class FailureTests(SpoolTestBase):
    def test_disk_full_is_a_storage_error_and_leaves_nothing(self) -> None:
        """ENOSPC on the journal gives StorageFailed, nothing handed on, /ready false."""
        spool = self.make_spool()

        def full(items: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        spool._append_journal = full  # type: ignore[method-assign]
        failure = self.failureResultOf(spool.store(ENVELOPE, RAW), StorageFailed)
        self.assertEqual(failure.value.message, "the spool's disk is full")
        self.assertEqual(failure.value.category, "storage")
        self.assertEqual(failure.value.status, 507)
        self.assertEqual(os.listdir(spool.layout.messages), [])
        self.assertEqual(self.stored, [])
        self.assertFalse(spool.is_writable())

    def test_journal_write_error_truncates_the_partial_entry(self) -> None:
        """A failed fdatasync cuts the segment back so no half entry stays."""
        spool = self.make_spool()
        self.successResultOf(spool.store(ENVELOPE, RAW))
        segment = os.path.join(spool.layout.journal, os.listdir(spool.layout.journal)[0])
        size = os.path.getsize(segment)
        real = os.fdatasync
        self.patch(os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        self.failureResultOf(spool.store(ENVELOPE, RAW), StorageFailed)
        self.patch(os, "fdatasync", real)
        self.assertEqual(os.path.getsize(segment), size)


class RecoveryTests(SpoolTestBase):
    def test_unprocessed_messages_are_replayed_after_a_crash(self) -> None:
        """Messages acknowledged but not processed come back from the journal, raw file rebuilt."""
        spool = self.make_spool()
        stored = self.successResultOf(spool.store(ENVELOPE, RAW))
        spool.running = False  # the process died: no orderly stop
        again = self.make_spool()
        with open(again.layout.raw_path(stored.id), "rb") as f:
            self.assertEqual(f.read(), RAW)
        self.assertEqual([(r["id"], raw) for r, raw in again.recovered], [(stored.id, None)])
        self.assertEqual(again.unprocessed, 1)

    def test_processed_messages_are_not_replayed(self) -> None:
        """A message whose record was written as processed is skipped at replay."""
        spool = self.make_spool()
        stored = self.successResultOf(spool.store(ENVELOPE, RAW))
        ((record, raw),) = self.stored
        write_message_files(spool.layout, {**record, "delivery": {"state": "queued"}}, raw)
        spool.running = False
        again = self.make_spool()
        self.assertEqual(again.recovered, [])
        self.assertEqual(again.read_record(stored.id)["id"], stored.id)

    def test_incomplete_journal_tail_is_dropped(self) -> None:
        """A half-written last entry (never acknowledged) is ignored, earlier ones kept."""
        spool = self.make_spool()
        stored = self.successResultOf(spool.store(ENVELOPE, RAW))
        segment = os.path.join(spool.layout.journal, os.listdir(spool.layout.journal)[0])
        with open(segment, "ab") as f:
            f.write(b"GMJ1\x00\x00\x01\x00garbage")
        spool.running = False
        again = self.make_spool()
        self.assertEqual([r["id"] for r, _ in again.recovered], [stored.id])

    def test_corrupt_entry_stops_the_replay_of_its_segment(self) -> None:
        """An entry whose checksum does not match is not trusted."""
        spool = self.make_spool()
        self.successResultOf(spool.store(ENVELOPE, RAW))
        segment = os.path.join(spool.layout.journal, os.listdir(spool.layout.journal)[0])
        with open(segment, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"XYZ")
        spool.running = False
        again = self.make_spool()
        self.assertEqual(again.recovered, [])

    def test_temp_leftovers_are_removed_at_start(self) -> None:
        """Files left in tmp/ by a crash are removed at start-up."""
        spool = self.make_spool()
        with open(os.path.join(spool.layout.tmp, "x.eml.tmp"), "wb") as f:
            f.write(b"partial")
        spool.running = False
        again = self.make_spool()
        self.assertEqual(os.listdir(again.layout.tmp), [])

    def test_checkpoint_drops_segments_once_their_messages_are_processed(self) -> None:
        """The journal segment goes only after every message in it is processed."""
        spool = self.make_spool()
        a = self.successResultOf(spool.store(ENVELOPE, RAW))
        b = self.successResultOf(spool.store(ENVELOPE, RAW))
        first_segment = sorted(os.listdir(spool.layout.journal))[0]
        spool.mark_done(a.id)
        self.reactor.advance(2.0)
        self.assertIn(first_segment, os.listdir(spool.layout.journal))
        spool.mark_done(b.id)
        self.reactor.advance(2.0)
        self.assertNotIn(first_segment, os.listdir(spool.layout.journal))


class LingeringCommitterTests(SpoolTestBase):
    """With ``commit_linger``, the committer thread waits for more work instead of leaving."""

    def run_committer(self, spool: Spool) -> threading.Thread:
        """Run the queued committer loop in a real thread (as the pool would)."""
        self.assertEqual(len(self.pool.queue), 1)
        thread = threading.Thread(target=self.pool.run_one, daemon=True)
        thread.start()
        return thread

    def watch(self, spool: Spool) -> None:
        """Count acknowledged messages and finished checkpoints, from any thread."""
        self.acked = threading.Semaphore(0)
        self.checkpointed = threading.Event()
        stored = spool.on_stored

        def on_stored(record: dict[str, Any], raw: bytes | None) -> None:
            assert stored is not None
            stored(record, raw)
            self.acked.release()

        checkpoint = spool._checkpoint

        def counted_checkpoint(rotate: bool = True) -> None:
            checkpoint(rotate)
            self.checkpointed.set()

        spool.on_stored = on_stored
        spool._checkpoint = counted_checkpoint  # type: ignore[method-assign]

    def wait_acked(self) -> None:
        """Wait (bounded) for the next acknowledgement."""
        self.assertTrue(self.acked.acquire(timeout=10), "no acknowledgement")

    def test_next_message_needs_no_new_hand_off(self) -> None:
        """A message arriving while the committer lingers is committed by the same thread run."""
        spool = self.make_spool(auto=False, commit_linger=30.0)
        self.watch(spool)
        first = spool.store(ENVELOPE, RAW)
        thread = self.run_committer(spool)
        self.wait_acked()
        self.assertTrue(first.called)
        second = spool.store(ENVELOPE, RAW)
        self.wait_acked()
        self.assertTrue(second.called)
        self.assertEqual(self.pool.queue, [])  # no second trip through the pool
        self.assertEqual(len(self.stored), 2)
        self.assertTrue(thread.is_alive())
        d = spool.stopService()
        thread.join(10)
        self.assertFalse(thread.is_alive())  # stopping wakes it at once
        self.pool.auto = True
        self.pool.run_all()
        self.successResultOf(d)

    def test_checkpoint_runs_between_batches(self) -> None:
        """A checkpoint due while the committer lingers runs in the committer's thread."""
        spool = self.make_spool(auto=False, commit_linger=30.0)
        self.watch(spool)
        stored = spool.store(ENVELOPE, RAW)
        thread = self.run_committer(spool)
        self.wait_acked()
        first_segment = sorted(os.listdir(spool.layout.journal))[0]
        spool.mark_done(self.successResultOf(stored).id)
        self.reactor.advance(2.0)  # the periodic checkpoint finds the committer busy
        self.assertTrue(self.checkpointed.wait(10))
        self.assertNotIn(first_segment, os.listdir(spool.layout.journal))
        self.assertEqual(self.pool.queue, [])
        self.assertTrue(thread.is_alive())
        d = spool.stopService()
        thread.join(10)
        self.pool.auto = True
        self.pool.run_all()
        self.successResultOf(d)

    def test_idle_committer_leaves(self) -> None:
        """Without more work the committer returns its thread after the linger."""
        spool = self.make_spool(auto=False, commit_linger=0.05)
        stored = spool.store(ENVELOPE, RAW)
        thread = self.run_committer(spool)
        thread.join(10)
        self.assertFalse(thread.is_alive())
        self.assertTrue(stored.called)
        self.successResultOf(spool.wait_idle())

    def test_checkpoint_keeps_a_segment_whose_batch_is_not_yet_acknowledged(self) -> None:
        """A checkpoint that runs while a batch is synced but its reply is on its
        way to the reactor keeps that batch's segment (a crash then loses nothing)."""
        spool = self.make_spool(auto=False, commit_linger=30.0)
        self.watch(spool)
        first = spool.store(ENVELOPE, RAW)
        thread = self.run_committer(spool)
        self.wait_acked()
        spool.mark_done(self.successResultOf(first).id)  # nothing unprocessed now
        synced, release = threading.Event(), threading.Event()
        append = spool._append_journal

        def append_then_wait(items: list[Any]) -> int:
            seq = append(items)
            synced.set()
            release.wait(10)
            return seq

        spool._append_journal = append_then_wait  # type: ignore[method-assign]
        second = spool.store(ENVELOPE, RAW)
        self.assertTrue(synced.wait(10))
        self.reactor.advance(2.0)  # the checkpoint comes due now
        release.set()
        self.wait_acked()
        second_id = self.successResultOf(second).id
        self.assertTrue(self.checkpointed.wait(10))
        self.assertEqual(len(os.listdir(spool.layout.journal)), 2)  # the checkpoint rotated
        in_journal = [r["id"] for n in sorted(os.listdir(spool.layout.journal)) for r, _ in _read_journal(os.path.join(spool.layout.journal, n))]
        self.assertIn(second_id, in_journal)
        # A crash now: a new spool on the same folder replays the message.
        again = Spool(self.dir, ThreadlessReactor(), ManualThreadPool(auto=True), None)
        self.assertIn(second_id, [record["id"] for record, _ in again.recover()])
        spool.stopService()
        thread.join(10)
