"""Talking to Serve: apply a config, wait until the app serves it, read it back.

Every change to an app goes through ``apply_config``: the ModelServer deployment with the given
options and ``ServingConfig``, applied without blocking, then watched (with progress) until Serve
reports the app RUNNING *and* the app's own GET answer shows the expected variants and weights.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from ray_deploy.errors import DeployError
from ray_deploy.progress import Waiter, report
from ray_deploy.serving.config import (
    VARIANT_APP_SEPARATOR,
    ServingConfig,
    variant_app_name,
    variant_app_options,
)

logger = logging.getLogger(__name__)

_POLL_S = 0.5


def serve_details() -> dict[str, Any]:
    # Serve has no public Python call for the deployed configs; this is what `serve status` and
    # the dashboard's /api/serve/applications/ are built on.
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


@dataclass(frozen=True)
class DeploymentState:
    status: str
    message: str
    replica_states: dict[str, int]


@dataclass(frozen=True)
class AppState:
    status: str
    message: str
    deployments: dict[str, DeploymentState]


def app_states(details: dict[str, Any] | None = None) -> dict[str, AppState]:
    """Every Serve app's state (status, message, replicas counted by state), read from Serve's
    details (or ``details``, read already).

    ``serve.status()`` says the same, but builds a pydantic model of every app and deployment in
    the calling process: 0.55 s of CPU per call with 30 apps on one head, and a deploy polls it.
    """
    apps = (serve_details() if details is None else details).get("applications") or {}
    return {name: _app_state(entry) for name, entry in apps.items()}


def _app_state(entry: dict[str, Any]) -> AppState:
    deployments = {}
    for name, deployment in (entry.get("deployments") or {}).items():
        counts: dict[str, int] = {}
        for replica in deployment.get("replicas") or []:
            state = _enum_name(replica.get("state"))
            counts[state] = counts.get(state, 0) + 1
        deployments[name] = DeploymentState(
            _enum_name(deployment.get("status")), deployment.get("message") or "", counts
        )
    return AppState(_enum_name(entry.get("status")), entry.get("message") or "", deployments)


def _enum_name(value: Any) -> str:
    # Serve's details hold its own enums (ApplicationStatus.RUNNING); over REST, their values.
    return str(getattr(value, "value", value) or "")


def apply_config(
    app: str,
    route_prefix: str,
    options: dict[str, Any],
    url: str,
    timeout_s: float,
    replaced: list[str] | None = None,
) -> None:
    """Apply ModelServer ``options`` (user_config included) to ``app`` and wait until it serves them.

    ``replaced``: replicas of a failed release that never started, ended once Serve has the new
    config (see ``end_replicas``).

    Raises:
        DeployError: Serve refused the app, or it did not serve the config within ``timeout_s``.
    """
    from ray_deploy.serving.server import server_deployment

    config = ServingConfig.model_validate(options["user_config"])
    ensure_variant_apps(config, timeout_s)
    _run(server_deployment(options).bind(), app, route_prefix)
    end_replicas(app, replaced or [], timeout_s)
    wait_until_serving(app, url, config, timeout_s)
    prune_variant_apps(config)


def ensure_variant_apps(config: ServingConfig, timeout_s: float) -> None:
    """Start the Serve app of every isolated variant ``config`` names (running ones are kept)."""
    from ray_deploy.serving.server import variant_deployment

    running = app_states()
    for variant in config.variants:
        if variant.isolated is None:
            continue
        name = variant_app_name(config.app, variant)
        if name not in running or running[name].status != "RUNNING":
            report(f"starting isolated variant {variant.label} as Serve app {name!r} ...")
            _run(variant_deployment(variant_app_options(config.app, variant)).bind(), name, None)
        _wait_running(name, timeout_s)


def prune_variant_apps(config: ServingConfig) -> None:
    """Delete isolated-variant apps of ``config.app`` that it no longer names (traffic has left them;
    Serve lets their running requests finish before the replicas stop)."""
    from ray import serve

    keep = {variant_app_name(config.app, v) for v in config.variants if v.isolated is not None}
    for name in variant_apps(config.app):
        if name not in keep:
            report(f"removing isolated variant app {name!r}: it no longer serves {config.app!r}")
            serve.delete(name, _blocking=False)


def variant_apps(app: str, details: dict[str, Any] | None = None) -> list[str]:
    prefix = app + VARIANT_APP_SEPARATOR
    apps = (serve_details() if details is None else details).get("applications") or {}
    return sorted(name for name in apps if name.startswith(prefix))


def _wait_running(name: str, timeout_s: float) -> None:
    waiter = Waiter(f"isolated variant app {name!r}")
    deadline = time.monotonic() + timeout_s
    stall = SchedulingWatch()
    while time.monotonic() < deadline:
        status = app_states().get(name)
        state = status.status if status else "NOT_STARTED"
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise DeployError(f"isolated variant app {name!r} is {state}: {status.message}")
        if state == "RUNNING":
            return
        replicas = "; ".join(
            f"{d} " + ", ".join(f"{n} {r}" for r, n in info.replica_states.items())
            for d, info in (status.deployments.items() if status else [])
        )
        waiter.update(f"{state}; replicas: {replicas or 'none yet'}{stall.note}")
        if status is not None:
            stall.check(name, [d.message for d in status.deployments.values()])
        time.sleep(_POLL_S)
    raise DeployError(f"isolated variant app {name!r} did not start within {timeout_s:g}s (deploy_timeout_s)")


def _run(application: Any, app: str, route_prefix: str) -> None:
    from ray import serve
    from ray.serve.api import RunTarget

    try:
        serve.run_many(
            [RunTarget(target=application, name=app, route_prefix=route_prefix)],
            wait_for_applications_running=False,
        )
    except Exception as exc:
        raise DeployError(f"Serve refused app {app!r} at route {route_prefix}: {exc}") from exc


def wait_until_serving(app: str, url: str, config: ServingConfig, timeout_s: float) -> None:
    """Until the app is RUNNING and its GET answer shows ``config``'s variants, or DeployError."""
    waiter = Waiter(f"app {app!r}")
    expected = _fingerprint(config)
    deadline = time.monotonic() + timeout_s
    messages: list[str] = []
    stall = SchedulingWatch()
    while time.monotonic() < deadline:
        status = app_states().get(app)
        if status is None:
            waiter.update("waiting for Serve to register the app")
        else:
            messages = [f"{name}: {d.status} {d.message}".strip() for name, d in status.deployments.items()]
            messages += [status.message] if status.message else []
            state = status.status
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployError(f"app {app!r} is {state}: " + "; ".join(m for m in messages if m))
            replicas = {
                name: ", ".join(f"{count} {replica_state}" for replica_state, count in d.replica_states.items())
                for name, d in status.deployments.items()
            }
            waiter.update(
                f"{state}; replicas: " + "; ".join(f"{n} {r or 'none yet'}" for n, r in replicas.items()) + stall.note
            )
            if state == "RUNNING" and _serves(url, expected, _front_headers(app)):
                return
            stall.check(app, [d.message for d in status.deployments.values()])
        time.sleep(_POLL_S)
    detail = "; ".join(m for m in messages if m) or "no status message from Serve"
    raise DeployError(
        f"app {app!r} did not become healthy within {timeout_s:g}s (deploy_timeout_s): {detail}. "
        "If replicas wait for resources, lower num_cpus/num_gpus or add nodes."
    )


SCHEDULE_STALL_S = 30.0
"""Default of ``RAY_DEPLOY_SCHEDULE_STALL_S``: how long replicas may wait for resources while no
node is on its way (longer for an autoscaler slow to react, shorter where none runs)."""


def schedule_stall_s() -> float:
    raw = os.environ.get("RAY_DEPLOY_SCHEDULE_STALL_S")
    if raw in (None, ""):
        return SCHEDULE_STALL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DeployError(f"RAY_DEPLOY_SCHEDULE_STALL_S: expected a number of seconds above 0, got {raw!r}")
    return value


class SchedulingWatch:
    """Fails a wait that cannot end: replicas wait for resources and no node is on its way.

    Serve reports replicas that wait for resources ("... to be scheduled. Resources required for
    each replica: ..., total resources available: ..."). While the cluster's autoscaler launches
    nodes the wait goes on (and says so); when nothing is launching for ``schedule_stall_s()``, no
    node type can hold the replicas or the autoscaler is at its maximum, and waiting longer would
    only hang.
    """

    def __init__(self, stall_s: float | None = None):
        self.stall_s = schedule_stall_s() if stall_s is None else stall_s
        self.since: float | None = None
        self.note = ""

    def check(self, app: str, messages: list[str]) -> None:
        launching = _nodes_on_the_way()
        waiting = [m for m in messages if "to be scheduled" in (m or "")]
        if launching:
            self.since = None
            self.note = f"; the autoscaler is starting {launching}"
            return
        if not waiting:
            self.since, self.note = None, ""
            return
        now = time.monotonic()
        self.since = self.since or now
        self.note = "; replicas wait for resources, no node is starting"
        if now - self.since >= self.stall_s:
            raise DeployError(
                f"app {app!r}: replicas cannot be scheduled and no node is being added for them "
                f"(for {self.stall_s:g}s): {waiting[0]} No node type of this cluster offers these resources, "
                "or its autoscaler is at max_workers: lower num_cpus/num_gpus/memory/resources or add a node type."
            )


def _nodes_on_the_way() -> str:
    """'2 node(s) (gpu_worker)' while the cluster's autoscaler launches nodes; '' if none or unknown.

    Ray 2.60's ``ray start --head`` runs the v1 autoscaler, which publishes its report in the GCS
    key-value store (what ``ray status`` prints); the v2 autoscaler answers a GCS call instead.
    """
    types: list[str] = []
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        report_v1 = json.loads(raw).get("autoscaler_report", {}) if raw else {}
        for node_type, count in (report_v1.get("pending_launches") or {}).items():
            types += [node_type] * int(count)
        types += [entry[1] for entry in report_v1.get("pending_nodes") or [] if len(entry) > 1]
    except Exception as exc:
        logger.debug("no v1 autoscaler report: %s", exc)
    if not types:
        try:
            import ray
            from ray.autoscaler.v2.sdk import get_cluster_status

            status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
            types = [launch.ray_node_type_name for launch in status.pending_launches for _ in range(launch.count)]
            types += [node.ray_node_type_name for node in status.pending_nodes]
        except Exception as exc:
            logger.debug("no v2 autoscaler status: %s", exc)
    return f"{len(types)} node(s) ({', '.join(sorted(set(types)))})" if types else ""


def _fingerprint(config: ServingConfig) -> list[tuple[str, str, float]]:
    return [(v.label, v.model.uri, float(v.weight)) for v in config.variants]


def _front_headers(app: str) -> dict[str, str]:
    """The header a replica behind a front wants on HTTP requests (``serving.access``): ``url`` is
    Serve's proxy for an app read back from Serve (the front's address is the head's, which this
    process may not reach), and Serve's proxy passes the header on. Never logged."""
    from ray_deploy.serving.access import HEADER_NAME, app_secret, cluster_key

    try:
        key = cluster_key()
    except Exception:  # no key to be had: replicas that need one answer 503, and the wait goes on
        return {}
    return {HEADER_NAME: app_secret(key, app).decode("ascii")} if key else {}


def _serves(url: str, expected: list[tuple[str, str, float]], headers: dict[str, str] | None = None) -> bool:
    # Replicas apply a new config one by one; ask a few times so most of them have it.
    for _ in range(3):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as answer:
                described = json.loads(answer.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        seen = [(v.get("label"), v.get("model"), float(v.get("weight", -1))) for v in described.get("variants", [])]
        if seen != expected:
            return False
    return True


def starting_replicas(app: str) -> list[str]:
    """Actor names of the app's replicas that are still starting (possibly never placed by Ray)."""
    entry = (serve_details().get("applications") or {}).get(app) or {}
    return [
        replica["actor_name"]
        for deployment in (entry.get("deployments") or {}).values()
        for replica in deployment.get("replicas") or []
        if replica.get("state") == "STARTING" and replica.get("actor_name")
    ]


def end_replicas(app: str, names: list[str], timeout_s: float = 60.0) -> threading.Thread | None:
    """End, on a background thread, replicas of ``app`` that never started once Serve stops them.

    Serve asks each replica it stops to shut down gracefully and waits up to its graceful-shutdown
    timeout (20 s) for the answer, which a replica that Ray could never place does not give. So
    each of ``names`` is ended as soon as Serve stops it, as its details show (STOPPING, or no
    longer listed); not before: Serve would start a replica it still wants again. Returns the
    thread (None when there is nothing to end).
    """
    if not names:
        return None

    def watch() -> None:
        import ray

        left, deadline = set(names), time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            entry = (serve_details().get("applications") or {}).get(app) or {}
            states = {
                replica.get("actor_name"): replica.get("state")
                for deployment in (entry.get("deployments") or {}).values()
                for replica in deployment.get("replicas") or []
            }
            for name in sorted(left):
                # Serve lists a replica it is stopping as STOPPING, or (an app being deleted) no more.
                if states.get(name, "STOPPING") == "STOPPING":
                    left.discard(name)
                    try:  # Serve's replicas live in Ray namespace "serve"
                        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                    except ValueError:
                        pass  # gone already
            time.sleep(0.2)

    thread = threading.Thread(target=watch, name=f"end-replicas-{app}", daemon=True)
    thread.start()
    return thread


def remove_new_app(app: str, timeout_s: float = 60.0) -> None:
    """Delete an app whose first deploy failed (nothing of it ever served), and wait until it is
    gone; its replicas that never started are ended at once (``end_replicas``)."""
    from ray import serve

    report(f"removing app {app!r}: its first deploy failed")
    ending = end_replicas(app, starting_replicas(app), timeout_s)
    serve.delete(app, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while app in (serve_details().get("applications") or {}) and time.monotonic() < deadline:
        time.sleep(0.2)
    if ending is not None:
        ending.join(timeout=1.0)


def url_base() -> str:
    http = serve_details().get("http_options") or {}
    host, port = http.get("host"), http.get("port") or 8000
    return f"http://{'127.0.0.1' if host in (None, '0.0.0.0') else host}:{port}"
