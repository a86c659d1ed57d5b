"""Tests for gomail.delivery.jobs: the durable, shared job store."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from twisted.trial.unittest import SynchronousTestCase

from gomail.delivery.jobs import DEAD, PENDING, Job, JobConflict, JobStore, check_job_id, job_id
from gomail.delivery.testing import temp_dir
from gomail.errors import InvalidSyntax, NotFound

MID = "01JDTESTMESSAGE0000000000A"


def make_job(route: str = "app", recipient: str | None = None, **changes: object) -> Job:
    job = Job(
        id=job_id(MID, route, recipient),
        message_id=MID,
        route=route,
        recipients=(recipient or "a@example.com",),
        created_at=100.0,
        next_due=100.0,
        updated_at=100.0,
    )
    return replace(job, **changes)  # type: ignore[arg-type]


class JobIdTests(SynchronousTestCase):
    """Stable job ids."""

    def test_stable_and_distinct(self) -> None:
        """The same inputs give the same id; route or recipient change it."""
        self.assertEqual(job_id(MID, "app"), job_id(MID, "app"))
        self.assertTrue(job_id(MID, "app").startswith(MID + "-"))
        self.assertEqual(len({job_id(MID, "app"), job_id(MID, "other"), job_id(MID, "app", "a@x"), job_id(MID, "app", "b@x")}), 4)
        self.assertEqual(check_job_id(job_id(MID, "app")), job_id(MID, "app"))

    def test_unsafe_ids_refused(self) -> None:
        """Ids that could escape the directory are refused."""
        self.assertRaises(InvalidSyntax, job_id, "../etc", "app")
        for bad in ("../x", "a/b", ".lock", "", "x.json"):
            self.assertRaises(InvalidSyntax, check_job_id, bad)


class JobStoreTests(SynchronousTestCase):
    """Create, update, reload."""

    def setUp(self) -> None:
        self.directory = temp_dir(self)
        self.store = JobStore(self.directory)

    def test_create_and_reload(self) -> None:
        """Created jobs are on disk at revision 1 and reload identically in a new store."""
        [stored] = self.store.create([make_job()])
        self.assertEqual(stored.revision, 1)
        self.assertEqual(JobStore(self.directory).load_all(), [stored])
        with open(os.path.join(self.directory, stored.id + ".json"), "rb") as f:
            self.assertEqual(json.loads(f.read())["state"], PENDING)

    def test_create_is_idempotent(self) -> None:
        """Creating an existing job leaves the stored one unchanged."""
        [first] = self.store.create([make_job()])
        dead = self.store.save(make_job(state=DEAD, attempts=3, revision=1))
        [again] = self.store.create([make_job()])
        self.assertEqual(again, dead)
        self.assertEqual(self.store.load_all(), [dead])
        self.assertEqual(first.revision + 1, dead.revision)

    def test_save_is_compare_and_swap(self) -> None:
        """save writes revision n+1 only over revision n."""
        [stored] = self.store.create([make_job()])
        saved = self.store.save(replace(stored, attempts=1))
        self.assertEqual((saved.revision, saved.attempts), (2, 1))
        conflict = self.assertRaises(JobConflict, self.store.save, stored)
        self.assertEqual(conflict.current, saved)
        self.store.delete(stored.id)
        self.assertIsNone(self.assertRaises(JobConflict, self.store.save, saved).current)

    def test_atomic_update_leaves_no_temp_files(self) -> None:
        """Writes go through a temp file renamed into place; nothing else is left."""
        [stored] = self.store.create([make_job()])
        self.store.save(stored)
        names = sorted(n for n in os.listdir(self.directory) if not n.startswith(".lock"))
        self.assertEqual(names, [stored.id + ".json"])

    def test_recover_removes_half_written_files(self) -> None:
        """recover removes temp files a crash left; jobs stay."""
        [stored] = self.store.create([make_job()])
        with open(os.path.join(self.directory, f".{stored.id}.json.tmp"), "wb") as f:
            f.write(b'{"id": "trunc')
        self.assertEqual(self.store.recover(), 1)
        self.assertEqual(self.store.load_all(), [stored])

    def test_corrupt_file_is_set_aside(self) -> None:
        """A corrupt job file is renamed *.corrupt and skipped."""
        [stored] = self.store.create([make_job()])
        bad = job_id(MID, "other")
        with open(os.path.join(self.directory, bad + ".json"), "wb") as f:
            f.write(b"{not json")
        self.assertEqual(self.store.load_all(), [stored])
        self.assertTrue(os.path.exists(os.path.join(self.directory, bad + ".json.corrupt")))
        self.flushLoggedErrors()

    def test_unknown_fields_survive(self) -> None:
        """Fields a newer version wrote are kept through a rewrite."""
        [stored] = self.store.create([make_job()])
        path = os.path.join(self.directory, stored.id + ".json")
        with open(path) as f:
            data = json.load(f)
        data["future"] = {"x": 1}
        with open(path, "w") as f:
            json.dump(data, f)
        reloaded = self.store.get(stored.id)
        assert reloaded is not None
        self.store.save(reloaded)
        with open(path) as f:
            self.assertEqual(json.load(f)["future"], {"x": 1})

    def test_requeue_and_purge(self) -> None:
        """requeue makes a job pending and due now and resets its age; purge removes it; both signal a change."""
        [pending, stored] = self.store.create([make_job("other"), make_job()])
        dead = self.store.save(replace(stored, state=DEAD, attempts=9))
        token = self.store.changes()
        self.assertIsNone(self.store.requeue(pending.id, 500.0, only_dead=True))
        self.assertEqual(self.store.changes(), token)
        requeued = self.store.requeue(dead.id, 500.0)
        assert requeued is not None
        self.assertEqual(
            (requeued.state, requeued.next_due, requeued.requeued_at, requeued.age_from, requeued.attempts),
            (PENDING, 500.0, 500.0, 500.0, 9),
        )
        self.assertNotEqual(self.store.changes(), token)
        self.assertIsNone(self.store.requeue(dead.id, 600.0, only_dead=True))
        token = self.store.changes()
        self.assertEqual(self.store.purge(dead.id).id, dead.id)
        self.assertNotEqual(self.store.changes(), token)
        self.assertEqual(self.store.load_all(), [pending])
        self.assertRaises(NotFound, self.store.purge, dead.id)
        self.assertRaises(NotFound, self.store.requeue, dead.id, 1.0)

    def test_delete(self) -> None:
        """delete says whether there was a file."""
        [stored] = self.store.create([make_job()])
        self.assertTrue(self.store.delete(stored.id))
        self.assertFalse(self.store.delete(stored.id))
        self.assertIsNone(self.store.get(stored.id))

    def test_bad_state_refused(self) -> None:
        """A stored state outside pending/dead is a corrupt document."""
        self.assertRaises(ValueError, Job.from_json, {**make_job().to_json(), "state": "paused"})
        self.assertRaises(ValueError, Job.from_json, {"id": "x"})
