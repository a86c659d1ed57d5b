"""Fakes for testing code that uses the delivery service (like ``treq.testing``).

Nothing here is used in production.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from gomail.errors import NotFound


class SynchronousThreadPool:
    """Runs "threaded" calls at once, in the caller's thread.

    Provides the one method ``deferToThreadPool`` uses.
    """

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], object], func: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        try:
            result = func(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ThreadlessClock(Clock):
    """A ``Clock`` that also has ``callFromThread`` (runs the call at once)."""

    def callFromThread(self, f: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class MessageSource:
    """An in-memory stand-in for the spool's ``load_message``."""

    def __init__(self) -> None:
        self.messages: dict[str, tuple[dict[str, Any], bytes]] = {}
        self.loads: list[str] = []

    def add(self, record: dict[str, Any], raw: bytes) -> dict[str, Any]:
        """Store a message (the record is round-tripped through JSON, as on disk)."""
        record = json.loads(json.dumps(record))
        self.messages[record["id"]] = (record, raw)
        return record

    def load(self, message_id: str) -> Deferred[tuple[dict[str, Any], bytes]]:
        """``load_message``: the stored message, or ``NotFound``."""
        self.loads.append(message_id)
        if message_id not in self.messages:
            return fail(NotFound("no such message", {"message_id": message_id}))
        return succeed(self.messages[message_id])


HANG = object()
"""A scripted answer that never comes (the request stays open)."""


@dataclass
class ReceivedRequest:
    """One request a :class:`ScriptedReceiver` saw."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    request: Request = field(repr=False)


class ScriptedReceiver(Resource):
    """A webhook receiver for ``StubTreq`` that answers from a script.

    Each answer is ``(status, headers, body)``, :data:`HANG`, or a callable
    taking the :class:`ReceivedRequest` and returning one of those.  When the
    script runs out, ``default`` answers.
    """

    isLeaf = True

    def __init__(self, script: list[Any] | None = None, default: Any = (200, {}, b"ok")) -> None:
        super().__init__()
        self.script = list(script or [])
        self.default = default
        self.requests: list[ReceivedRequest] = []
        self.hanging: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        assert request.content is not None
        request.content.seek(0)
        received = ReceivedRequest(
            method=request.method.decode("ascii"),
            path=request.path.decode("utf-8"),
            headers={k.decode("latin-1").lower(): v[0].decode("latin-1") for k, v in request.requestHeaders.getAllRawHeaders()},
            body=request.content.read(),
            request=request,
        )
        self.requests.append(received)
        answer = self.script.pop(0) if self.script else self.default
        if callable(answer):
            answer = answer(received)
        if answer is HANG:
            self.hanging.append(request)
            return NOT_DONE_YET
        status, headers, body = answer
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


def sample_record(
    message_id: str = "01JDTESTMESSAGE0000000000A",
    rcpt_to: tuple[str, ...] = ("app@example.com",),
    **overrides: Any,
) -> dict[str, Any]:
    """A stored-message record as the spool writes it."""
    record: dict[str, Any] = {
        "id": message_id,
        "received_at": "2026-11-25T19:30:00.123Z",
        "transport": "smtp",
        "sender": "alice@example.org",
        "recipient": rcpt_to[0] if rcpt_to else None,
        "subject": "Hello",
        "message_id": "<abc@example.org>",
        "connection": {
            "client_address": "203.0.113.5",
            "client_hostname": "mail.example.org",
            "client_helo": "mail.example.org",
            "client_port": 40000,
        },
        "authentication": {"spf": "pass"},
        "envelope": {
            "mail_from": "alice@example.org",
            "rcpt_to": list(rcpt_to),
            "helo": "mail.example.org",
            "client": {"address": "203.0.113.5", "port": 40000, "hostname": "mail.example.org"},
            "transport": "smtp",
            "tls": True,
            "body": "8BITMIME",
            "smtputf8": False,
            "protocol": "ESMTPS",
        },
        "size": 0,
        "message": {
            "headers": [{"name": "Subject", "value": "Hello"}],
            "subject": "Hello",
            "from": [{"address": "alice@example.org", "name": "Alice"}],
            "sender": [],
            "to": [{"address": rcpt_to[0] if rcpt_to else "", "name": None}],
            "cc": [],
            "reply_to": [],
            "date": "2026-11-25T19:29:58Z",
            "message_id": "<abc@example.org>",
            "in_reply_to": None,
            "references": [],
            "text": "Hi there\n",
            "html": None,
            "charsets": {"text": "utf-8", "html": None},
            "attachments": [],
            "defects": [],
        },
    }
    record.update(overrides)
    return record


def temp_dir(case: Any) -> str:
    """A fresh temporary directory removed when the test case ends.

    Unlike trial's ``mktemp`` under pytest, nothing is left in the working
    directory.
    """
    path = tempfile.mkdtemp(prefix="gomail-delivery-")
    case.addCleanup(shutil.rmtree, path, True)
    return path
