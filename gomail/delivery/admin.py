"""Queue operations for ``gomail queue ...``, safe while the daemon runs.

How a CLI process and the running daemon share the queue:

* Every write to the job directory, by either process, holds an exclusive
  ``flock`` on ``<jobs>/.lock`` and replaces the job file atomically
  (see :mod:`gomail.delivery.jobs`).
* Writes are compare-and-swap on the job's ``revision``.  When the daemon
  finishes an attempt on a job the operator changed meanwhile (retried or
  purged), its write fails and it takes the operator's version instead: the
  operator wins, and the daemon never resurrects a purged job.
* The CLI's changes rewrite a change token (``<jobs>/.changes``).  The
  daemon reads that small file every ``delivery.scan_interval`` (1 s by
  default) and, when it changed, reloads the job directory: a retried job is
  then sent within about one scan interval; a purged one is forgotten.

We chose this over a control-request directory that only the daemon applies
because the CLI then works the same whether or not the daemon runs, and
reports errors (unknown id) at once.  The same operations are available on a
running service as ``DeliveryService.list_jobs/retry/retry_dead/purge`` (for
the HTTP API).
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

from gomail.delivery.jobs import DEAD, STATES, Job, JobStore, check_job_id
from gomail.errors import InvalidSyntax, NotFound

JOBS_DIRECTORY = "jobs"
"""The job store's directory under the data directory."""


def jobs_directory(data_dir: str) -> str:
    """Where the job store of ``data_dir`` lives."""
    return os.path.join(data_dir, JOBS_DIRECTORY)


def open_store(data_dir: str) -> JobStore:
    """The job store of a data directory (the daemon uses the same one)."""
    return JobStore(jobs_directory(data_dir))


def list_jobs(store: JobStore, state: str | None = None, route: str | None = None) -> list[Job]:
    """Stored jobs, sorted by id (oldest message first).

    Args:
        store: The job store.
        state: ``pending`` or ``dead``; all if ``None``.
        route: A route name; all if ``None``.

    Raises:
        InvalidSyntax: For an unknown state.
    """
    if state is not None and state not in STATES:
        raise InvalidSyntax("unknown job state", {"state": state, "states": list(STATES)})
    return [job for job in store.load_all() if (state is None or job.state == state) and (route is None or job.route == route)]


def retry(store: JobStore, job_id: str, now: float | None = None) -> Job:
    """Make one job pending and due now (any state); resets its ``max_age``.

    Args:
        store: The job store.
        job_id: The job id.
        now: The current time (default: the wall clock).

    Returns:
        The job as written.

    Raises:
        InvalidSyntax: For a malformed id.
        NotFound: If there is no such job.
    """
    job = store.requeue(check_job_id(job_id), time.time() if now is None else now)
    assert job is not None
    return job


def retry_dead(store: JobStore, route: str | None = None, since: float | None = None, now: float | None = None) -> list[Job]:
    """Make dead jobs pending and due now.

    Args:
        store: The job store.
        route: Only this route's dead jobs.
        since: Only jobs that died at or after this time (Unix seconds).
        now: The current time (default: the wall clock).

    Returns:
        The jobs requeued.
    """
    when = time.time() if now is None else now
    requeued = []
    for job in list_jobs(store, DEAD, route):
        if since is not None and job.updated_at < since:
            continue
        try:
            new = store.requeue(job.id, when, only_dead=True)
        except NotFound:
            continue
        if new is not None:
            requeued.append(new)
    return requeued


def purge(store: JobStore, job_id: str) -> Job:
    """Remove one job for good.

    Returns:
        The job as it was.

    Raises:
        InvalidSyntax: For a malformed id.
        NotFound: If there is no such job.
    """
    return store.purge(check_job_id(job_id))


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def describe(job: Job) -> dict[str, Any]:
    """A job for display (``queue list --json``, ``GET /queue``): times in ISO 8601."""
    data = job.to_json()
    for name in ("created_at", "next_due", "updated_at", "requeued_at"):
        data[name] = _iso(data[name])
    return data
