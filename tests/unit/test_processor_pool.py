"""Tests for gomail.processor's parser processes (real processes)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from gomail.processor import parser_processes


class ParserProcessTests(SynchronousTestCase):
    """Parser processes run at the configured niceness."""

    def test_niceness(self) -> None:
        """Each parser process runs at the niceness given (never below the daemon's own)."""
        base = os.nice(0)
        pool = parser_processes(1, nice=7)
        try:
            self.assertEqual(pool.submit(os.nice, 0).result(timeout=60), max(base, 7))
        finally:
            pool.shutdown(wait=True)
