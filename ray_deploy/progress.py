"""User-facing progress: one helper, so long waits always say what they wait for.

Messages go to stderr (a Metaflow task shows them in its log) unless ``RAY_DEPLOY_QUIET=1``.
Library code never prints otherwise; diagnostics go through ``logging``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

_PREFIX = "[ray-deploy]"
_sinks: list[Callable[[str], None]] = []


def report(message: str) -> None:
    """Tell the user what is happening now."""
    for sink in list(_sinks):
        sink(message)
    if os.environ.get("RAY_DEPLOY_QUIET", "") not in ("", "0"):
        return
    print(f"{_PREFIX} {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def reporting_to(sink: Callable[[str], None]) -> Iterator[None]:
    """Also hand every message to ``sink`` for the block (the rollout controller streams them to
    the process that waits on it)."""
    _sinks.append(sink)
    try:
        yield
    finally:
        _sinks.remove(sink)


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
