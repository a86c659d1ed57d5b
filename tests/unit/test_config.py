"""Tests for gomail.config: schema, precedence, aliases, secrets."""

from __future__ import annotations

import json
import os

import voluptuous as vol
from twisted.trial.unittest import SynchronousTestCase

from gomail import cli, config
from gomail.config import ConfigError, load
from tests.tls_files import write_certificate

STRONG = "Zq7mV2xR9pL4tW8kN3bH6yF1cJ5sD0gA-eU"


class LoadTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_defaults_need_no_file(self) -> None:
        """With no file, no environment and no flags the built-in defaults apply."""
        c = load(None, {}, {})
        self.assertEqual(c.http.listen, "tcp:3000:interface=127.0.0.1")
        self.assertEqual(c.smtp.listen, "tcp:2525:interface=127.0.0.1")
        self.assertEqual(c.data_dir, "./var/gomail")
        self.assertEqual(c.domains, ("localhost",))
        self.assertIsNone(c.http.bearer_token)
        self.assertEqual(c.http.max_body_size, 26214400)
        self.assertEqual(c.smtp.settings.max_recipients, 100)
        self.assertEqual(c.rate_limit.http_per_minute, 60)
        self.assertEqual(c.rate_limit.http_burst, 10)
        self.assertEqual(c.delivery.max_age, 259200)
        self.assertEqual(c.shutdown_timeout, 30)

    def test_parser_nice_is_bounded(self) -> None:
        """parser_nice defaults to 19 and takes 0-19 only."""
        self.assertEqual(load(None, {}, {}).parser_nice, 19)
        self.assertEqual(load(None, {"GOMAIL_PARSER_NICE": "5"}, {}).parser_nice, 5)
        with self.assertRaises(ConfigError) as ctx:
            load(None, {}, {"parser_nice": 20})
        self.assertEqual([p for p, _ in ctx.exception.errors], ["parser_nice"])
        self.assertEqual(config.json_schema()["properties"]["parser_nice"]["maximum"], 19)

    def test_precedence_flag_over_env_over_file(self) -> None:
        """A flag beats the environment, which beats the file, which beats the default."""
        path = self.write("hostname: file.example\nsmtp:\n  max_recipients: 7\n  idle_timeout: 5m\ndomains: [a.example]\n")
        env = {"GOMAIL_HOSTNAME": "env.example", "GOMAIL_SMTP__MAX_RECIPIENTS": "8"}
        c = load(path, env, {"hostname": "flag.example"})
        self.assertEqual(c.hostname, "flag.example")
        self.assertEqual(c.smtp.settings.hostname, "flag.example")
        self.assertEqual(c.smtp.settings.max_recipients, 8)
        self.assertEqual(c.smtp.settings.idle_timeout, 300.0)
        self.assertEqual(c.domains, ("a.example",))

    def test_every_error_is_reported_with_its_path_in_one_run(self) -> None:
        """A typo'd key, a bad type and a bad route field are all reported at once."""
        path = self.write(
            "smtp:\n  max_recipent: 5\n  idle_timeout: soon\nhttp:\n  listen: 3000\nroutes:\n  - name: app\n    match: ['*@example.com']\n    url: ftp://x\n"
        )
        with self.assertRaises(ConfigError) as ctx:
            load(path, {}, {})
        paths = [p for p, _ in ctx.exception.errors]
        self.assertEqual(paths, sorted(paths))
        self.assertEqual(set(paths), {"smtp.max_recipent", "smtp.idle_timeout", "http.listen", "routes[0].url"})
        messages = dict(ctx.exception.errors)
        self.assertEqual(messages["smtp.max_recipent"], "unknown key (typo?)")

    def test_weak_tokens_are_refused(self) -> None:
        """Short, placeholder and low-entropy tokens are refused unless allowed."""
        for token, reason in (
            ("change-this-to-a-secure-token", "known placeholder"),
            ("short-token", "characters long"),
            ("a" * 40, "too little variety"),
            ("abababababababababababababababababab", "too little variety"),
        ):
            with self.assertRaises(ConfigError) as ctx:
                load(None, {"GOMAIL_HTTP__BEARER_TOKEN": token}, {})
            (path, message), = ctx.exception.errors
            self.assertEqual(path, "http.bearer_token")
            self.assertIn(reason, message)
            self.assertNotIn(token, message)
        c = load(None, {"GOMAIL_HTTP__BEARER_TOKEN": "short", "GOMAIL_HTTP__ALLOW_WEAK_TOKEN": "true"}, {})
        self.assertEqual(c.http.bearer_token, "short")
        self.assertEqual(load(None, {"GOMAIL_HTTP__BEARER_TOKEN": STRONG}, {}).http.bearer_token, STRONG)

    def test_gomail_flat_keys_and_mail_env_are_aliases_with_warnings(self) -> None:
        """GoMail's flat keys and MAIL_* variables still work, with a deprecation warning."""
        path = self.write(f"port: 8025\nbearer_token: {STRONG}\nrate_limit_per_minute: 30\nrate_limit_burst: 5\nmail_hostname: mx.old\nprimary_domain: old.example\n")
        c = load(path, {"MAIL_DATA_DIR": "/tmp/x"}, {})
        self.assertEqual(c.http.listen, "tcp:8025:interface=127.0.0.1")
        self.assertEqual(c.http.bearer_token, STRONG)
        self.assertEqual((c.rate_limit.http_per_minute, c.rate_limit.http_burst), (30, 5))
        self.assertEqual(c.hostname, "mx.old")
        self.assertEqual(c.domains, ("old.example",))
        self.assertEqual(c.data_dir, "/tmp/x")
        self.assertEqual(len(c.warnings), 7)
        self.assertTrue(all("deprecated" in w for w in c.warnings))
        c2 = load(None, {"MAIL_PORT": "9000", "MAIL_PRIMARY_DOMAIN": "p.example"}, {})
        self.assertEqual(c2.http.listen, "tcp:9000:interface=127.0.0.1")
        self.assertEqual(c2.domains, ("p.example",))

    def test_routes_become_frozen_settings(self) -> None:
        """Routes are validated and converted, durations and sizes parsed."""
        path = self.write(
            "domains: [example.com]\nroutes:\n  - name: app\n    match: ['*@example.com', 'Boss@Example.com']\n"
            "    url: http://127.0.0.1:9000/hook\n    secrets: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw]\n    timeout: 10s\n"
            "    inline_attachments_max: 1MiB\ndelivery:\n  max_age: 3d\n"
        )
        c = load(path, {}, {})
        (route,) = c.routes
        self.assertEqual(route.match, ("*@example.com", "boss@example.com"))
        self.assertEqual(route.timeout, 10.0)
        self.assertEqual(route.inline_attachments_max, 1048576)
        self.assertEqual(c.delivery.max_age, 259200.0)
        from dataclasses import FrozenInstanceError

        with self.assertRaises(FrozenInstanceError):
            route.name = "x"  # type: ignore[misc]

    def test_duplicate_route_names_are_refused(self) -> None:
        """Two routes with one name are an error."""
        path = self.write("routes:\n  - {name: a, match: ['*'], url: 'http://x/'}\n  - {name: a, match: ['*'], url: 'http://y/'}\n")
        with self.assertRaises(ConfigError) as ctx:
            load(path, {}, {})
        self.assertEqual(ctx.exception.errors, [("routes[1].name", "duplicate route name 'a'")])

    def test_unreadable_and_non_mapping_files(self) -> None:
        """A missing file or a YAML list is a clear error."""
        with self.assertRaises(ConfigError) as ctx:
            load("/nonexistent/gomail.yaml", {}, {})
        self.assertIn("cannot read", ctx.exception.errors[0][1])
        with self.assertRaises(ConfigError) as ctx:
            load(self.write("- a\n- b\n"), {}, {})
        self.assertEqual(ctx.exception.errors[0][1], "the top level must be a mapping")

    def test_values_parse(self) -> None:
        """Durations and sizes accept units."""
        self.assertEqual(config.duration("1.5h"), 5400.0)
        self.assertEqual(config.duration(30), 30.0)
        self.assertEqual(config.size("25MiB"), 26214400)
        self.assertEqual(config.size("512k"), 524288)
        for bad in ("soon", "-1", True):
            self.assertRaises(vol.Invalid, config.duration, bad)


class TLSConfigTests(SynchronousTestCase):
    """smtp.tls: the certificate and key are checked when the configuration loads."""

    def test_certificate_and_key_load(self) -> None:
        """Paths from the environment or the file; the key defaults to the certificate file."""
        cert, key = write_certificate(self.mktemp(), with_intermediate=True)
        config = load(None, {"GOMAIL_SMTP__TLS__CERTIFICATE": cert, "GOMAIL_SMTP__TLS__PRIVATE_KEY": key})
        self.assertEqual((config.smtp.tls_certificate, config.smtp.tls_private_key), (cert, key))
        both = self.mktemp()
        with open(both, "wb") as f, open(cert, "rb") as c, open(key, "rb") as k:
            f.write(c.read() + k.read())
        self.assertEqual(load(None, {}, {"smtp.tls.certificate": both}).smtp.tls_certificate, both)
        self.assertIsNone(load(None, {}).smtp.tls_certificate)

    def test_problems_are_reported_with_the_path(self) -> None:
        """A missing file, a file without a certificate or key, and a key of another certificate."""
        cert, key = write_certificate(self.mktemp())
        other_cert, other_key = write_certificate(self.mktemp())
        cases = [
            ({"smtp.tls.certificate": "/nonexistent/cert.pem"}, "smtp.tls.certificate", "cannot read the TLS certificate '/nonexistent/cert.pem'"),
            ({"smtp.tls.certificate": key}, "smtp.tls.certificate", "holds no PEM certificate"),
            ({"smtp.tls.certificate": cert}, "smtp.tls.certificate", "holds no PEM private key"),
            ({"smtp.tls.certificate": cert, "smtp.tls.private_key": other_key}, "smtp.tls.certificate", "does not match the certificate"),
            ({"smtp.tls.private_key": key}, "smtp.tls.private_key", "a private key needs smtp.tls.certificate too"),
        ]
        for flags, path, message in cases:
            with self.assertRaises(ConfigError) as caught:
                load(None, {}, flags)
            [(where, text)] = caught.exception.errors
            self.assertEqual(where, path, flags)
            self.assertIn(message, text)
        self.assertIsNotNone(load(None, {}, {"smtp.tls.certificate": other_cert, "smtp.tls.private_key": other_key}))


class ValidateCommandTests(SynchronousTestCase):
    def run_cli(self, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        self.patch(os, "environ", dict(env or {}))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_validate_reports_typo_and_weak_token(self) -> None:
        """`gomail validate` exits 1 and names the typo'd key and the weak token."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("htpp:\n  listen: x\nhttp:\n  bearer_token: change-this-to-a-secure-token\n")
        code, out, err = self.run_cli("validate", "--config", path)
        self.assertEqual(code, 1)
        self.assertIn("htpp: unknown key (typo?)", err)
        self.assertIn("http.bearer_token: the token is weak: it is a known placeholder", err)
        self.assertNotIn("change-this-to-a-secure-token", err)

    def test_validate_json_masks_secrets(self) -> None:
        """--json prints the effective config with the token masked."""
        code, out, _ = self.run_cli("validate", "--json", env={"GOMAIL_HTTP__BEARER_TOKEN": STRONG})
        self.assertEqual(code, 0)
        doc = json.loads(out)
        self.assertTrue(doc["valid"])
        self.assertEqual(doc["effective"]["http"]["bearer_token"], "********")
        self.assertNotIn(STRONG, out)

    def test_show_schema_is_json_schema(self) -> None:
        """--show-schema prints a JSON Schema forbidding unknown keys."""
        code, out, _ = self.run_cli("validate", "--show-schema")
        self.assertEqual(code, 0)
        schema = json.loads(out)
        self.assertEqual(schema["type"], "object")
        self.assertFalse(schema["additionalProperties"])
        self.assertEqual(schema["properties"]["smtp"]["properties"]["max_recipients"]["default"], 100)
        self.assertTrue(schema["properties"]["http"]["properties"]["bearer_token"]["writeOnly"])
        self.assertEqual(schema["properties"]["routes"]["items"]["required"], ["name", "url"])


class ExampleConfigTests(SynchronousTestCase):
    def test_the_shipped_example_is_valid_and_documents_every_key(self) -> None:
        """etc/gomail.yaml validates and names every key of the schema (the token only in a comment)."""
        import yaml

        path = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "gomail.yaml")
        c = load(path, {}, {})
        self.assertEqual(c.smtp.listen, "tcp:25")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        doc = yaml.safe_load(text)
        missing: list[str] = []

        def walk(spec: dict[str, object], data: dict[str, object], prefix: str) -> None:
            for key, sub in spec.items():
                if isinstance(sub, dict):
                    walk(sub, data.get(key) or {}, f"{prefix}{key}.")  # type: ignore[arg-type]
                elif isinstance(sub, list):
                    walk(sub[0], (data.get(key) or [{}])[0], f"{prefix}{key}[0].")  # type: ignore[index]
                elif key not in data:
                    missing.append(prefix + key)

        walk(config.SPEC, doc, "")
        self.assertEqual(missing, ["http.bearer_token"])
        self.assertIn("# bearer_token:", text)


class QueueCommandTests(ValidateCommandTests):
    def test_queue_commands_need_a_job_and_report_unknown_ones(self) -> None:
        """retry and purge without an id exit 2; an unknown id exits 1 with a not_found message; list shows none."""
        env = {"GOMAIL_DATA_DIR": self.mktemp()}
        self.assertEqual(self.run_cli("queue", "retry", env=env)[0], 2)
        code, _, err = self.run_cli("queue", "purge", env=env)
        self.assertEqual((code, err.strip()), (2, "give a job id"))
        code, _, err = self.run_cli("queue", "purge", "01JD0000000000000000000001.app", env=env)
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith(("not_found:", "syntax:")), err)
        code, out, _ = self.run_cli("queue", "list", env=env)
        self.assertEqual((code, out.strip()), (0, "0 job(s)"))
        code, out, _ = self.run_cli("queue", "retry", "--dead", env=env)
        self.assertEqual((code, out.strip()), (0, "0 dead job(s) queued for retry"))
