"""The twistd plugin's options and ``makeService`` (the only place that
imports the global reactor)."""

from __future__ import annotations

import os
import secrets
from typing import Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from gomail.config import Config, ConfigError, load

_log = Logger()

TOKEN_FILE = "http-token"


class Options(usage.Options):
    """``twistd gomail`` options; flags override environment and file."""

    optParameters = [
        ["config", "c", None, "YAML configuration file (default: built-in defaults, or $GOMAIL_CONFIG)."],
        ["data-dir", None, None, "Spool folder (data_dir)."],
        ["http-listen", None, None, "HTTP endpoint, e.g. tcp:3000:interface=127.0.0.1 (http.listen)."],
        ["smtp-listen", None, None, "SMTP endpoint, e.g. tcp:2525:interface=127.0.0.1 (smtp.listen)."],
        ["hostname", None, None, "SMTP host name (hostname)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["set"] = {}
        self["domains"] = []

    def opt_set(self, assignment: str) -> None:
        """Set any key: --set smtp.max_recipients=50 (repeatable)."""
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise usage.UsageError("--set takes key.path=value")
        import yaml

        try:
            self["set"][key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            self["set"][key.strip()] = value

    def opt_domain(self, domain: str) -> None:
        """Accept mail for this domain (repeatable; replaces 'domains')."""
        self["domains"].append(domain)

    def flags(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for option, key in (("data-dir", "data_dir"), ("http-listen", "http.listen"), ("smtp-listen", "smtp.listen"), ("hostname", "hostname")):
            if self[option] is not None:
                out[key] = self[option]
        if self["domains"]:
            out["domains"] = list(self["domains"])
        out.update(self["set"])
        return out


def load_from_options(options: Options) -> Config:
    path = options["config"] or os.environ.get("GOMAIL_CONFIG")
    try:
        return load(path, os.environ, options.flags())
    except ConfigError as e:
        lines = "\n".join(f"  {p}: {m}" for p, m in e.errors)
        raise usage.UsageError(f"invalid configuration:\n{lines}") from e


def ensure_token(config: Config) -> tuple[str, str | None]:
    """The API token, and the file it was generated into (None if configured).

    With no token configured, a strong one is generated on first start and
    kept in ``data_dir/http-token`` with mode 0600; later starts reuse it.
    """
    if config.http.bearer_token:
        return config.http.bearer_token, None
    os.makedirs(config.data_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(config.data_dir, TOKEN_FILE))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
        if len(token) >= 32:
            return token, path
        os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token, path


def makeService(options: Options) -> IService:
    """Build the daemon's service tree with the global reactor."""
    import sys

    from twisted.internet import reactor

    from gomail.service import build_service

    # The reactor thread shares the GIL with the I/O threads; a short switch
    # interval keeps a busy worker thread from stalling it for 5 ms at a time.
    sys.setswitchinterval(0.0005)
    config = load_from_options(options)
    for warning in config.warnings:
        _log.warn("config: {warning}", warning=warning)
    token, token_path = ensure_token(config)
    if token_path:
        _log.info(
            "API token: none configured; using the generated one in {path} (mode 0600). "
            "Send it as 'Authorization: Bearer <token>', e.g. -H \"Authorization: Bearer $(cat {path})\"",
            path=token_path,
        )
    else:
        _log.info("API token: from the configuration (send it as 'Authorization: Bearer <token>')")
    service = build_service(config, reactor, token)
    # Twisted re-raises SIGTERM/SIGINT after shutdown so the exit status shows
    # the signal (143).  A completed graceful drain is a clean exit for
    # gomail: exit 0, as systemd units and supervisors expect.
    reactor.addSystemEventTrigger("after", "shutdown", _exit_cleanly, reactor)
    _reload_on_sighup(reactor, service, options)
    return service


def read_for_reload(options: Options) -> tuple[Config, Any]:
    """The configuration and the SMTP TLS options it names (reads files: run in a thread)."""
    from gomail.service import smtp_tls

    config = load_from_options(options)
    return config, smtp_tls(config)


def _reload_on_sighup(reactor: Any, service: Any, options: Options) -> None:
    """SIGHUP re-reads the configuration (and certificate) in a thread and
    applies the rate limits and the certificate on the reactor."""
    import signal

    from twisted.internet.threads import deferToThreadPool

    def failed(failure: Any) -> None:
        _log.error("configuration not reloaded: {error}", error=str(failure.value))

    def reload() -> None:
        d = deferToThreadPool(reactor, reactor.getThreadPool(), read_for_reload, options)
        d.addCallback(lambda loaded: service.reload(*loaded))
        d.addErrback(failed)

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))


def _exit_cleanly(reactor: Any) -> None:
    if hasattr(reactor, "_exitSignal"):
        reactor._exitSignal = None
