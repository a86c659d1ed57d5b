"""Tests for gomail.processor's parser processes (real processes)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from gomail.processor import parser_processes


class ParserProcessTests(SynchronousTestCase):
    """Parser processes run at the configured niceness."""

    def test_niceness(self) -> None:
        """Each parser process runs niceness steps below the daemon."""
        base = os.nice(0)
        pool = parser_processes(1, nice=7)
        try:
            self.assertEqual(pool.submit(os.nice, 0).result(timeout=60), min(19, base + 7))
        finally:
            pool.shutdown(wait=True)
