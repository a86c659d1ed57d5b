"""Run the real daemon (``twistd -n gomail``) on loopback for end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "it-Zq7mV2xR9pL4tW8kN3bH6yF1cJ5sD0gA-eU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true; bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def tool(name: str) -> str | None:
    """The path of a command-line tool, looking in /usr/sbin too (postfix)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


class Daemon:
    """One gomail process with its own data dir and loopback ports."""

    def __init__(self, workdir: str, config: str = "", env: dict[str, str] | None = None, limit_loopback: bool = False) -> None:
        self.workdir = workdir = os.path.abspath(workdir)
        os.makedirs(workdir, exist_ok=True)
        self.data_dir = os.path.join(workdir, "data")
        self.http_port = free_port()
        self.smtp_port = free_port()
        self.config_path = os.path.join(workdir, "gomail.yaml")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(
                f"hostname: mx.test\n"
                f"data_dir: {self.data_dir}\n"
                f"domains: [example.com]\n"
                f"http:\n  listen: 'tcp:{self.http_port}:interface=127.0.0.1'\n  bearer_token: {TOKEN}\n"
                f"smtp:\n  listen: 'tcp:{self.smtp_port}:interface=127.0.0.1'\n"
                f"logging: {{format: json}}\n"
                + ("" if limit_loopback else "rate_limit: {allow: ['127.0.0.0/8']}\n")
                + config
            )
        self.env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(workdir, "gomail.log")
        self.starts = 0

    def edit_config(self, old: str, new: str) -> None:
        """Replace ``old`` (which must be there) with ``new`` in the config file, before start."""
        with open(self.config_path, encoding="utf-8") as f:
            text = f.read()
        assert old in text, old
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "--logger=gomail.logs.observer", "gomail", "--config", self.config_path],
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gomail exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                status, _, _ = self.request("GET", "/ready")
                return status == 200
            except OSError:
                return False

        wait_until(ready, timeout)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = resp.read()
                status, hdrs = resp.status, dict(resp.headers)
        except urllib.error.HTTPError as e:
            data = e.read()
            status, hdrs = e.code, dict(e.headers)
        try:
            return status, hdrs, json.loads(data)
        except ValueError:
            return status, hdrs, data

    def post_message(self, raw: bytes, recipient: str = "someone@example.com") -> tuple[int, Any]:
        status, _, doc = self.request(
            "POST",
            "/mail/inbound",
            raw,
            {"Authorization": f"Bearer {TOKEN}", "Content-Type": "message/rfc822", "X-Original-Recipient": recipient},
        )
        return status, doc

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def message_files(self) -> dict[str, str]:
        """id -> folder of every stored record."""
        out: dict[str, str] = {}
        for dirpath, _dirs, files in os.walk(os.path.join(self.data_dir, "messages")):
            for name in files:
                if name.endswith(".json"):
                    out[name[:-5]] = dirpath
        return out

    def read_record(self, message_id: str) -> dict[str, Any]:
        folder = self.message_files()[message_id]
        with open(os.path.join(folder, f"{message_id}.json"), "rb") as f:
            result: dict[str, Any] = json.loads(f.read())
        return result

    def read_raw(self, message_id: str) -> bytes:
        folder = self.message_files()[message_id]
        with open(os.path.join(folder, f"{message_id}.eml"), "rb") as f:
            return f.read()

    def rss_kib(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0
