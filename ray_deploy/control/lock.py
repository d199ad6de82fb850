"""One change at a time per app, across processes: a named Ray actor as the app's lock."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from ray_deploy.errors import AppLocked
from ray_deploy.progress import report
from ray_deploy.registry.lineage import who

LOCK_NAMESPACE = "ray_deploy_locks"
# A rollout controller holds the lock only while it applies one transition (seconds): a change
# that meets it waits this long, with progress, instead of failing.
BRIEF_HOLDERS = ("rollout",)
BRIEF_WAIT_S = 120.0


class _LockHolder:
    def __init__(self, info: dict[str, Any]):
        self._info = info

    def info(self) -> dict[str, Any]:
        return self._info


@contextlib.contextmanager
def app_lock(app: str, purpose: str, wait_for: tuple[str, ...] | None = BRIEF_HOLDERS) -> Iterator[None]:
    """Hold the app's change lock for the block, or raise AppLocked naming who holds it.

    A holder whose purpose is in ``wait_for`` (None: any holder) is waited for, up to
    ``BRIEF_WAIT_S`` with progress; any other holder fails the call at once. The lock is a named
    Ray actor owned by this process: Ray removes it when the block ends, and also when this
    process dies, so a crashed deploy never leaves an app locked.
    """
    import ray

    holder = ray.remote(num_cpus=0, max_restarts=0)(_LockHolder)
    name = f"lock:{app}"
    info = {
        "purpose": purpose,
        "user": who(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    actor = None
    released = 0  # tries while a gone holder's name is being released
    deadline = time.monotonic() + BRIEF_WAIT_S
    said_at = 0.0  # when the wait was last reported (every 10 s, not every try)
    while released < 20:
        try:
            actor = holder.options(name=name, namespace=LOCK_NAMESPACE).remote(info)
            break
        except ValueError:
            owner = _lock_owner(name)
            if owner is None:
                released += 1
                time.sleep(0.25)  # the previous holder is gone; its name is being released
                continue
            held_by = (
                f"{owner.get('user')} on {owner.get('host')} "
                f"(pid {owner.get('pid')}, {owner.get('purpose')}, since {owner.get('since')})"
            )
            waits = wait_for is None or owner.get("purpose") in wait_for
            if not waits or time.monotonic() >= deadline:
                raise AppLocked(
                    f"app {app!r} is being changed by {held_by}; wait for that to finish and try again"
                ) from None
            if time.monotonic() - said_at >= 10.0:
                report(f"app {app!r}: waiting for a change by {held_by} to finish ...")
                said_at = time.monotonic()
            time.sleep(1.0)
    if actor is None:
        raise AppLocked(f"app {app!r}: could not take its change lock (namespace {LOCK_NAMESPACE})")
    try:
        yield
    finally:
        ray.kill(actor, no_restart=True)


def _lock_owner(name: str) -> dict[str, Any] | None:
    import ray

    try:
        return ray.get(ray.get_actor(name, namespace=LOCK_NAMESPACE).info.remote(), timeout=10)
    except Exception:
        return None
