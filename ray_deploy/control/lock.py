"""One change at a time per app, across processes: a lock table on the cluster.

The table is one detached actor (``LockTable``, namespace ``ray_deploy``) that every process
asks: taking or releasing a lock is one call, with no process started per lock. Each lock names
its owner as Ray knows it: a driver by its job, an actor (the rollout controller) by its id and
process. A lock whose owner is gone (a deploy killed mid-change, a controller that Ray restarted)
is taken over by the next process that asks, so a crashed change never leaves an app locked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from ray_deploy.errors import AppLocked
from ray_deploy.progress import report
from ray_deploy.registry.lineage import who

logger = logging.getLogger(__name__)

LOCK_TABLE_NAME = "locks"
LOCK_NAMESPACE = "ray_deploy"
# A rollout controller holds the lock only while it applies one transition (seconds): a change
# that meets it waits this long, with progress, instead of failing.
BRIEF_HOLDERS = ("rollout",)
BRIEF_WAIT_S = 120.0
_KV_KEY = b"ray_deploy.locks"


class LockTable:
    """App name -> the lock on it (token, what it is for, who, and its owner as Ray knows it).

    One actor serializes every take and release; the table is also kept in the cluster's KV
    store, so a restarted table still knows the locks that were held."""

    def __init__(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_get

        saved = _internal_kv_get(_KV_KEY)
        self._locks: dict[str, dict[str, Any]] = json.loads(saved) if saved else {}

    def take(self, app: str, token: str, info: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any] | None:
        """Take ``app``'s lock; None when taken, else the holder's info (its owner is alive)."""
        held = self._locks.get(app)
        if held is not None and held["token"] != token and _alive(held["owner"]):
            return held["info"]
        if held is not None and held["token"] != token:
            logger.warning("lock of app %s: its holder %s is gone; taken over", app, held["info"])
        self._locks[app] = {"token": token, "info": info, "owner": owner}
        self._save()
        return None

    def release(self, app: str, token: str) -> bool:
        """Release ``app``'s lock if ``token`` holds it."""
        held = self._locks.get(app)
        if held is None or held["token"] != token:
            return False
        del self._locks[app]
        self._save()
        return True

    def _save(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(_KV_KEY, json.dumps(self._locks))


def _alive(owner: dict[str, Any]) -> bool:
    """Whether a lock's owner still runs: its actor (the same process of it), or its driver's job.

    Reads the cluster's actor and job tables (Ray's private state API: no public call answers
    this without the dashboard); if they cannot be read, the owner counts as alive, so a lock is
    never taken from a live holder (a wait then ends in ``AppLocked`` naming it)."""
    from ray._private import state

    try:
        if owner.get("actor"):
            actor = state.actors(actor_id=owner["actor"]) or {}
            return actor.get("State") == "ALIVE" and actor.get("Pid") == owner.get("pid")
        if owner.get("job"):
            jobs = {job["JobID"]: job for job in state.jobs()}
            job = jobs.get(owner["job"])
            return job is not None and not job.get("IsDead")
    except Exception as exc:
        logger.warning("could not tell whether lock owner %s is alive: %s", owner, exc)
        return True
    return True


_TABLE_CLASS: Any = None


def lock_table() -> Any:
    """The cluster's lock table actor (created on first use)."""
    import ray

    global _TABLE_CLASS
    if _TABLE_CLASS is None:
        # On the head node (Ray's own `node:__internal_head__` resource): worker nodes come and go.
        _TABLE_CLASS = ray.remote(
            num_cpus=0, resources={"node:__internal_head__": 0.001}, max_restarts=-1, max_task_retries=-1
        )(LockTable)
    return _TABLE_CLASS.options(
        name=LOCK_TABLE_NAME, namespace=LOCK_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def _owner() -> dict[str, Any]:
    """This process as Ray knows it: an actor by id and process, a driver by its job."""
    import ray

    context = ray.get_runtime_context()
    actor = context.get_actor_id()
    if actor:
        return {"actor": actor, "pid": os.getpid()}
    return {"job": context.get_job_id()}


@contextlib.contextmanager
def app_lock(app: str, purpose: str, wait_for: tuple[str, ...] | None = BRIEF_HOLDERS) -> Iterator[None]:
    """Hold the app's change lock for the block, or raise AppLocked naming who holds it.

    A holder whose purpose is in ``wait_for`` (None: any holder) is waited for, up to
    ``BRIEF_WAIT_S`` with progress; any other holder fails the call at once. The lock is released
    when the block ends; if this process dies first, the next process that asks takes it over.
    """
    import ray

    table = lock_table()
    token = uuid.uuid4().hex
    info = {
        "purpose": purpose,
        "user": who(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    owner = _owner()
    deadline = time.monotonic() + BRIEF_WAIT_S
    said_at = 0.0  # when the wait was last reported (every 10 s, not every try)
    while True:
        held = ray.get(table.take.remote(app, token, info, owner), timeout=60)
        if held is None:
            break
        held_by = f"{held.get('user')} on {held.get('host')} (pid {held.get('pid')}, {held.get('purpose')}, since {held.get('since')})"
        waits = wait_for is None or held.get("purpose") in wait_for
        if not waits or time.monotonic() >= deadline:
            raise AppLocked(f"app {app!r} is being changed by {held_by}; wait for that to finish and try again")
        if time.monotonic() - said_at >= 10.0:
            report(f"app {app!r}: waiting for a change by {held_by} to finish ...")
            said_at = time.monotonic()
        time.sleep(0.5)
    try:
        yield
    finally:
        try:
            ray.get(table.release.remote(app, token), timeout=60)
        except Exception as exc:  # the lock is taken over once this process is gone
            logger.warning("could not release the lock of app %s: %s", app, exc)
