"""User-facing progress: one helper, so long waits always say what they wait for.

Messages go to stderr (a Metaflow task shows them in its log) unless ``RAY_DEPLOY_QUIET=1``.
Library code never prints otherwise; diagnostics go through ``logging``.
"""

from __future__ import annotations

import os
import sys
import time

_PREFIX = "[ray-deploy]"


def report(message: str) -> None:
    """Tell the user what is happening now."""
    if os.environ.get("RAY_DEPLOY_QUIET", "") not in ("", "0"):
        return
    print(f"{_PREFIX} {message}", file=sys.stderr, flush=True)


class Waiter:
    """Reports a wait's state when it changes, and at most every ``every_s`` seconds otherwise."""

    def __init__(self, what: str, every_s: float = 10.0):
        self.what = what
        self.every_s = every_s
        self.started = time.monotonic()
        self._last_state: str | None = None
        self._last_report = 0.0

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def update(self, state: str) -> None:
        now = time.monotonic()
        if state != self._last_state or now - self._last_report >= self.every_s:
            report(f"{self.what}: {state} ({self.elapsed_s:.0f}s)")
            self._last_state = state
            self._last_report = now
