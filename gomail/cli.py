"""The ``gomail`` command: server, validate, queue, version."""

from __future__ import annotations

import argparse
import json
import os
import sys

import gomail
from gomail.config import ConfigError, json_schema, load


def _config_path(args: argparse.Namespace) -> str | None:
    return args.config or os.environ.get("GOMAIL_CONFIG")


def cmd_server(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the daemon in the foreground: the same service as ``twistd -n gomail``."""
    from twisted.scripts import twistd

    argv = ["twistd", "--nodaemon", "--pidfile="]
    if args.log_format == "json":
        argv.append("--logger=gomail.logs.observer")
    else:
        argv.append("--logger=gomail.logs.text_observer")
    argv.append("gomail")
    if args.config:
        argv += ["--config", args.config]
    argv += rest
    sys.argv = argv
    twistd.run()
    return 0


def cmd_validate(args: argparse.Namespace, rest: list[str]) -> int:
    """Check a configuration; list every error with its path."""
    if args.show_schema:
        print(json.dumps(json_schema(), indent=2))
        return 0
    path = _config_path(args)
    try:
        config = load(path, os.environ, {})
    except ConfigError as e:
        if args.json:
            print(json.dumps({"valid": False, "config": path, "errors": [{"path": p, "message": m} for p, m in e.errors]}, indent=2))
        else:
            print(f"{path or '(defaults)'}: {len(e.errors)} error(s)", file=sys.stderr)
            for p, m in e.errors:
                print(f"  {p}: {m}", file=sys.stderr)
        return 1
    from gomail.config import describe

    if args.json:
        print(json.dumps({"valid": True, "config": path, "warnings": list(config.warnings), "effective": describe(config)}, indent=2))
    else:
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{path or '(defaults)'}: valid")
        print(json.dumps(describe(config), indent=2))
    return 0


def cmd_queue(args: argparse.Namespace, rest: list[str]) -> int:
    """Inspect and replay delivery jobs; safe while the daemon runs."""
    from gomail.delivery import admin
    from gomail.errors import GomailError

    try:
        config = load(_config_path(args), os.environ, {})
    except ConfigError as e:
        for p, m in e.errors:
            print(f"  {p}: {m}", file=sys.stderr)
        return 1
    store = admin.open_store(config.data_dir)
    try:
        if args.action == "list":
            jobs = [admin.describe(job) for job in admin.list_jobs(store, state=args.state, route=args.route)]
            if args.json:
                print(json.dumps(jobs, indent=2))
            else:
                for job in jobs:
                    print(f"{job['id']}  {job['state']:<8} {job['route']:<16} attempts={job['attempts']} next={job['next_due']} last={job.get('last_status')}")
                print(f"{len(jobs)} job(s)")
            return 0
        if args.action == "retry" and args.dead:
            since = _parse_since(args.since) if args.since else None
            retried = admin.retry_dead(store, route=args.route, since=since)
            print(f"{len(retried)} dead job(s) queued for retry")
            return 0
        if not args.id:
            print("give a job id" + (" or --dead" if args.action == "retry" else ""), file=sys.stderr)
            return 2
        if args.action == "retry":
            admin.retry(store, args.id)
            print(f"{args.id} queued for retry")
        else:
            admin.purge(store, args.id)
            print(f"{args.id} purged")
        return 0
    except GomailError as e:
        print(f"{e.category}: {e.message} {json.dumps(e.details) if e.details else ''}".rstrip(), file=sys.stderr)
        return 1


def _parse_since(text: str) -> float:
    """Unix seconds from a number, an ISO 8601 time, or a duration ago (``2h``)."""
    import time
    from datetime import datetime

    from gomail.config import duration

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time() - duration(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gomail`` console script."""
    parser = argparse.ArgumentParser(prog="gomail", description="Inbound mail (SMTP, HTTP) to signed webhooks.")
    parser.add_argument("--version", action="version", version=f"gomail {gomail.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="run the daemon in the foreground (same as twistd -n gomail)")
    server.add_argument("--config", "-c")
    server.add_argument("--log-format", choices=("json", "text"), default=os.environ.get("GOMAIL_LOGGING__FORMAT", "json"))
    server.set_defaults(func=cmd_server)

    validate = sub.add_parser("validate", help="check a configuration file")
    validate.add_argument("--config", "-c")
    validate.add_argument("--json", action="store_true")
    validate.add_argument("--show-schema", action="store_true", help="print the JSON Schema of the configuration")
    validate.set_defaults(func=cmd_validate)

    queue = sub.add_parser("queue", help="inspect and replay webhook deliveries")
    queue.add_argument("action", choices=("list", "retry", "purge"))
    queue.add_argument("id", nargs="?")
    queue.add_argument("--config", "-c")
    queue.add_argument("--state", choices=("pending", "dead"))
    queue.add_argument("--route")
    queue.add_argument("--dead", action="store_true", help="retry: every dead job")
    queue.add_argument("--since", help="retry --dead: only jobs dead since (unix time, ISO time, or 2h ago)")
    queue.add_argument("--json", action="store_true")
    queue.set_defaults(func=cmd_queue)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "server":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    result: int = args.func(args, rest)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
