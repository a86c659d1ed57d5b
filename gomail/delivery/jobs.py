"""The durable delivery queue: one JSON file per job.

Layout of the job directory::

    <id>.json       one job (``Job.to_json``), replaced atomically on change
    .<id>.tmp       a job being written (removed by :meth:`JobStore.recover`)
    .lock           an advisory ``flock`` held for every write
    .changes        a token rewritten on every operator change

Every write (create, save, delete, requeue) happens under an exclusive
``flock`` on ``.lock``, so the daemon and an operator's CLI in another process
never interleave a read-modify-write.  Updates are compare-and-swap on the
job's ``revision``: a writer that read revision ``n`` can only write ``n + 1``;
if someone else wrote in between, :class:`JobConflict` tells it to reload.
Readers take no lock: ``os.replace`` makes each file change atomic.

Operator changes (:meth:`JobStore.requeue`, :meth:`JobStore.purge`) also
rewrite ``.changes``; the delivery service reads that one small file every
``scan_interval`` and reloads the directory when it changed.

All methods block on file I/O: the delivery service calls them in a thread
pool; the CLI calls them directly.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.logger import Logger

from gomail.errors import InvalidSyntax, NotFound

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
STATES: tuple[str, ...] = (PENDING, DEAD)
"""States stored on disk.  A delivered job is deleted, not kept."""

_SAFE_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,199}\Z")
_SAFE_MESSAGE_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
_SUFFIX = ".json"
_LOCK = ".lock"
_CHANGES = ".changes"


def job_id(message_id: str, route: str, recipient: str | None = None) -> str:
    """The stable id of a job, also its ``webhook-id``.

    The same message and route (and recipient, with per-recipient fan-out)
    always give the same id, so re-submitting after a crash finds the same
    job, and a receiver can de-duplicate retries and crash-repeats.

    Args:
        message_id: The gomail message id (letters, digits, ``_``, ``-``).
        route: The route name.
        recipient: The recipient, for per-recipient fan-out only.

    Returns:
        ``<message_id>-<16 hex digits>``.

    Raises:
        InvalidSyntax: If the message id is not safe in a file name.
    """
    if not _SAFE_MESSAGE_ID.match(message_id):
        raise InvalidSyntax("bad message id", {"message_id": message_id[:64]})
    key = f"{route}\n{recipient if recipient is not None else ''}".encode()
    return f"{message_id}-{hashlib.sha256(key).hexdigest()[:16]}"


def check_job_id(value: str) -> str:
    """Return ``value`` if it can be a job id, else raise ``InvalidSyntax``."""
    if not _SAFE_ID.match(value):
        raise InvalidSyntax("bad job id", {"job_id": value[:64]})
    return value


@dataclass(frozen=True, slots=True)
class Job:
    """One delivery of one message to one route (and recipient).

    Attributes:
        id: The stable job id (see :func:`job_id`), sent as ``webhook-id``.
        message_id: The gomail message id.
        route: The route name.
        recipients: The envelope recipients this delivery is for.
        state: ``pending`` or ``dead``.
        attempts: Webhook calls made so far.
        created_at: When the job was created, Unix seconds.
        next_due: When the next attempt is due, Unix seconds.
        updated_at: When the state last changed, Unix seconds.
        requeued_at: When an operator last retried the job; ``max_age`` is
            counted from here instead of ``created_at`` once set.
        last_status: HTTP status of the last attempt, if any.
        last_error: What went wrong last: the first bytes of the response
            body, or a short description of the connection error.
        revision: Incremented by every write (compare-and-swap).
    """

    id: str
    message_id: str
    route: str
    recipients: tuple[str, ...]
    state: str = PENDING
    attempts: int = 0
    created_at: float = 0.0
    next_due: float = 0.0
    updated_at: float = 0.0
    requeued_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    revision: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def age_from(self) -> float:
        """The time ``max_age`` is counted from."""
        return self.requeued_at if self.requeued_at is not None else self.created_at

    def to_json(self) -> dict[str, Any]:
        """The JSON document stored on disk (and shown by ``queue list``)."""
        data = dict(self.extra)
        data.update(
            id=self.id,
            message_id=self.message_id,
            route=self.route,
            recipients=list(self.recipients),
            state=self.state,
            attempts=self.attempts,
            created_at=self.created_at,
            next_due=self.next_due,
            updated_at=self.updated_at,
            requeued_at=self.requeued_at,
            last_status=self.last_status,
            last_error=self.last_error,
            revision=self.revision,
        )
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        """Read a stored document; unknown keys are kept, not lost.

        Raises:
            ValueError: If a required field is missing or has the wrong type.
        """
        known = {
            "id",
            "message_id",
            "route",
            "recipients",
            "state",
            "attempts",
            "created_at",
            "next_due",
            "updated_at",
            "requeued_at",
            "last_status",
            "last_error",
            "revision",
        }
        try:
            job = cls(
                id=check_job_id(str(data["id"])),
                message_id=str(data["message_id"]),
                route=str(data["route"]),
                recipients=tuple(str(r) for r in data["recipients"]),
                state=str(data.get("state", PENDING)),
                attempts=int(data.get("attempts", 0)),
                created_at=float(data.get("created_at", 0.0)),
                next_due=float(data.get("next_due", 0.0)),
                updated_at=float(data.get("updated_at", 0.0)),
                requeued_at=None if data.get("requeued_at") is None else float(data["requeued_at"]),
                last_status=None if data.get("last_status") is None else int(data["last_status"]),
                last_error=None if data.get("last_error") is None else str(data["last_error"]),
                revision=int(data.get("revision", 0)),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, InvalidSyntax) as e:
            raise ValueError(f"bad job document: {e!r}") from e
        if job.state not in STATES:
            raise ValueError(f"bad job state {job.state!r}")
        return job


class JobConflict(Exception):
    """A compare-and-swap write lost: the job changed (or vanished) on disk.

    Attributes:
        current: The job as it is on disk now, or ``None`` if it is gone.
    """

    def __init__(self, current: Job | None) -> None:
        super().__init__(current.id if current else "gone")
        self.current = current


class JobStore:
    """Durable jobs, one JSON file each, safe to share between processes.

    Args:
        directory: The job directory (created if missing).
        fsync: Whether to ``fsync`` files and the directory when writing.
            Always on in production; tests may turn it off for speed.
    """

    _log = Logger()

    def __init__(self, directory: str, *, fsync: bool = True) -> None:
        self.directory = directory
        self._fsync = fsync
        os.makedirs(directory, exist_ok=True)

    # -- paths and raw file access ------------------------------------------

    def _path(self, job_id: str) -> str:
        return os.path.join(self.directory, check_job_id(job_id) + _SUFFIX)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.directory, _LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_path(self, path: str) -> Job | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return Job.from_json(json.loads(data))

    def _write_file(self, name: str, data: bytes) -> None:
        path = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f".{name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _write(self, job: Job) -> None:
        data = json.dumps(job.to_json(), separators=(",", ":"), sort_keys=True).encode("utf-8")
        self._write_file(check_job_id(job.id) + _SUFFIX, data)

    def _sync_directory(self) -> None:
        if not self._fsync:
            return
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _touch_changes(self) -> None:
        self._write_file(_CHANGES, uuid.uuid4().hex.encode("ascii"))

    # -- reading --------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or ``None``.

        Raises:
            InvalidSyntax: For a malformed id.
            ValueError: If the stored file is corrupt.
        """
        return self._read_path(self._path(job_id))

    def ids(self) -> list[str]:
        """The ids of every stored job, sorted (message ids sort by time)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(_SUFFIX)] for n in names if n.endswith(_SUFFIX) and not n.startswith("."))

    def load_all(self) -> list[Job]:
        """Every readable job, sorted by id.

        A corrupt file (which atomic writes should make impossible) is logged
        and renamed to ``<id>.json.corrupt`` for inspection, not deleted.
        """
        jobs = []
        for name in self.ids():
            path = os.path.join(self.directory, name + _SUFFIX)
            try:
                job = self._read_path(path)
            except (ValueError, OSError) as e:
                self._quarantine(path, repr(e))
                continue
            if job is not None:
                jobs.append(job)
        return jobs

    def _quarantine(self, path: str, reason: str) -> None:
        self._log.error("corrupt job file {path} set aside: {reason}", path=path, reason=reason)
        with self._locked():
            try:
                os.replace(path, path + ".corrupt")
            except FileNotFoundError:
                pass

    def changes(self) -> str:
        """A token that changes whenever an operator changed the store."""
        try:
            with open(os.path.join(self.directory, _CHANGES), "rb") as f:
                return f.read().decode("ascii", "replace")
        except FileNotFoundError:
            return ""

    # -- writing --------------------------------------------------------------

    def recover(self) -> int:
        """Remove half-written temporary files left by a crash.

        Returns:
            How many were removed.
        """
        removed = 0
        with self._locked():
            for name in os.listdir(self.directory):
                if name.startswith(".") and name.endswith(".tmp"):
                    try:
                        os.unlink(os.path.join(self.directory, name))
                        removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    def create(self, jobs: Sequence[Job]) -> list[Job]:
        """Store new jobs; a job whose id already exists is left as it is.

        This makes re-submitting a message after a crash a no-op.  New files
        and the directory are fsynced before this returns.

        Args:
            jobs: Jobs to create (their ``revision`` is ignored).

        Returns:
            The jobs as stored, in the same order: the new ones at revision 1,
            existing ones unchanged.
        """
        result = []
        wrote = False
        with self._locked():
            for job in jobs:
                existing = self._read_path(self._path(job.id))
                if existing is not None:
                    result.append(existing)
                    continue
                new = replace(job, revision=1)
                self._write(new)
                wrote = True
                result.append(new)
            if wrote:
                self._sync_directory()
        return result

    def save(self, job: Job) -> Job:
        """Write a changed job, if nobody else changed it since it was read.

        Args:
            job: The new contents; its ``revision`` must be the revision that
                is on disk now.

        Returns:
            The job as written (``revision`` incremented).

        Raises:
            JobConflict: The job on disk has another revision, or is gone.
        """
        with self._locked():
            current = self._read_path(self._path(job.id))
            if current is None or current.revision != job.revision:
                raise JobConflict(current)
            new = replace(job, revision=job.revision + 1)
            self._write(new)
        return new

    def delete(self, job_id: str) -> bool:
        """Remove a job (after delivery).

        Returns:
            Whether there was a file to remove.
        """
        path = self._path(job_id)
        with self._locked():
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
        return True

    # -- operator changes (also rewrite the change token) ----------------------

    def requeue(self, job_id: str, now: float, *, only_dead: bool = False, notify: bool = True) -> Job | None:
        """Make a job pending and due now; reset its ``max_age`` clock.

        Args:
            job_id: The job id.
            now: The current time, Unix seconds.
            only_dead: Leave the job alone unless it is dead.
            notify: Rewrite the change token so a running daemon reloads.

        Returns:
            The job as written, or ``None`` if ``only_dead`` and it was not.

        Raises:
            NotFound: There is no such job.
        """
        with self._locked():
            current = self._read_path(self._path(job_id))
            if current is None:
                raise NotFound("no such job", {"job_id": job_id})
            if only_dead and current.state != DEAD:
                return None
            new = replace(
                current,
                state=PENDING,
                next_due=now,
                updated_at=now,
                requeued_at=now,
                revision=current.revision + 1,
            )
            self._write(new)
            if notify:
                self._touch_changes()
        return new

    def purge(self, job_id: str, *, notify: bool = True) -> Job:
        """Remove a job for good, whatever its state.

        Args:
            job_id: The job id.
            notify: Rewrite the change token so a running daemon reloads.

        Returns:
            The job as it was.

        Raises:
            NotFound: There is no such job.
        """
        path = self._path(job_id)
        with self._locked():
            current = self._read_path(path)
            if current is None:
                raise NotFound("no such job", {"job_id": job_id})
            try:
                os.unlink(path)
            except OSError as e:  # pragma: no cover - raced with nothing: we hold the lock
                if e.errno != errno.ENOENT:
                    raise
            if notify:
                self._touch_changes()
        return current
