"""Reading live apps: status, the config an app serves, its lineage checked hop by hop; deleting one."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from ray_deploy.cluster import connect
from ray_deploy.control.apply import app_states, serve_details, variant_apps
from ray_deploy.control.lock import app_lock
from ray_deploy.control.phases import ACTIVE
from ray_deploy.errors import DeployError
from ray_deploy.progress import report
from ray_deploy.registry.history import recorded_rollout
from ray_deploy.registry.lineage import Registry
from ray_deploy.registry.trace import Hop, trace_config
from ray_deploy.registry.trace import trace_model as _trace_model
from ray_deploy.serving.config import SERVER_DEPLOYMENT, ServingConfig, variant_app_name, variant_summary
from ray_deploy.serving.metrics import app_devices, app_metrics, get_collector, replica_reports

logger = logging.getLogger(__name__)


def app_status(app: str | None = None, address: str | None = None) -> list[dict[str, Any]]:
    """Status of the apps this package deployed (all, or one): state, URL and variants."""
    with connect(address, start_local=False) as cluster:
        everything = serve_details()
        details = everything.get("applications", {})
        statuses = app_states(everything)
        apps = []
        for name, detail in sorted(details.items()):
            if app is not None and name != app:
                continue
            server = detail.get("deployments", {}).get(SERVER_DEPLOYMENT)
            user_config = ((server or {}).get("deployment_config") or {}).get("user_config")
            if not user_config:
                continue
            config = ServingConfig.model_validate(user_config)
            status = statuses.get(name)
            isolated = variant_apps(name, everything)
            reports = replica_reports(name, _live_replicas(details, [name, *isolated]))
            apps.append(
                {
                    "app": name,
                    "status": status.status if status else "UNKNOWN",
                    "url": cluster.http_url + config.route_prefix,
                    "replicas": {
                        **{d: dict(s.replica_states) for d, s in (status.deployments.items() if status else [])},
                        **{
                            d: dict(s.replica_states)
                            for other in isolated
                            if other in statuses
                            for d, s in statuses[other].deployments.items()
                        },
                    },
                    "variants": [
                        {**variant_summary(v), "isolated_app": variant_app_name(name, v) if v.isolated else None}
                        for v in config.variants
                    ],
                    "phase": config.phase.value,
                    "rollout": config.rollout.model_dump(mode="json") if config.rollout else None,
                    "controller": _controller(name, config),
                    "last_rollout": _last_rollout(config, user_config),
                    "source": config.source,
                    "capture": config.capture.model_dump(mode="json") if config.capture else None,
                    "metrics": app_metrics(name),
                    "devices": app_devices(reports),
                    "replica_placement": {r: info.get("placement", {}) for r, info in reports.items()},
                    "config": user_config,
                }
            )
        if app is not None and not apps:
            raise DeployError(f"no app {app!r} deployed by ray-deploy on {cluster.address}")
        return apps


def _live_replicas(details: dict[str, Any], apps: list[str]) -> set[str]:
    return {
        replica.get("replica_id")
        for app in apps
        for deployment in (details.get(app) or {}).get("deployments", {}).values()
        for replica in deployment.get("replicas", [])
        if replica.get("state") == "RUNNING"
    }


def app_serving_config(app: str, address: str | None = None) -> tuple[ServingConfig, str, str]:
    """What a running app serves, read back from Serve: (config, status, URL).

    Raises:
        DeployError: no app of that name was deployed by ray-deploy on the cluster.
    """
    (row,) = app_status(app, address)
    return ServingConfig.model_validate(row["config"]), row["status"], row["url"]


def delete_app(app: str, address: str | None = None) -> bool:
    """Delete an app, its rollout controller and its stats; True if it existed (deleting a missing
    app is not an error)."""
    return bool(delete_apps([app], address))


def delete_apps(apps: list[str], address: str | None = None, timeout_s: float = 120.0) -> list[str]:
    """Delete several apps at once (their replicas drain side by side); returns those that existed.

    Each app's lock is held until it is gone: a deploy of the same name waits or is turned away
    rather than finding a half-deleted app.

    Raises:
        DeployError: an app was still there after ``timeout_s``.
    """
    from ray import serve

    from ray_deploy.control.controller import stop_controller

    deleting: list[str] = []
    with connect(address, start_local=False), contextlib.ExitStack() as locks:
        existing = set(app_states())
        for app in apps:
            locks.enter_context(app_lock(app, "delete"))
            stop_controller(app)  # first: a controller mid-rollout would bring the app back
            names = [name for name in (app, *variant_apps(app)) if name in existing]
            if app in existing:
                report(f"deleting app {app!r} ...")
            for name in names:
                serve.delete(name, _blocking=False)
            deleting.extend(names)
        deadline = time.monotonic() + timeout_s
        while deleting and time.monotonic() < deadline:
            left = set(app_states())
            if not left & set(deleting):
                break
            time.sleep(0.2)
        still = sorted(set(app_states()) & set(deleting))
        if still:
            raise DeployError(f"apps still being deleted after {timeout_s:g}s: {', '.join(still)}")
        for app in apps:
            _forget_stats(app)
    return [app for app in apps if app in existing]


def _forget_stats(app: str) -> None:
    """A new app of the same name starts its stats from zero (best effort: the app is gone either way)."""
    import ray

    try:
        collector = get_collector(create=False)
        if collector is not None:
            ray.get(collector.forget.remote(app), timeout=10)
    except Exception as exc:
        logger.warning("could not clear the stats of deleted app %s: %s", app, exc)


def _controller(app: str, config: ServingConfig) -> str | None:
    """The rollout controller driving the app now, by name (see the Ray dashboard's Actors page)."""
    from ray_deploy.control.controller import controller_name, find_controller

    if config.phase not in ACTIVE:
        return None
    return controller_name(app) if find_controller(app) is not None else None


def _last_rollout(config: ServingConfig, user_config: dict[str, Any]) -> dict[str, Any] | None:
    """How the app's last rollout ended: from its config (None: it never had one), or, for an app
    deployed by an older ray-deploy whose config has no such field, as the registry recorded it."""
    if config.last_rollout is not None or "last_rollout" in user_config:
        return config.last_rollout.model_dump(mode="json") if config.last_rollout else None
    if not config.registry_uri:
        return None
    try:
        registry = Registry(config.registry_uri, config.registry_uri)
        names = sorted({v.model_version.rsplit("/", 1)[0] for v in config.variants if v.model_version})
        records = [r for r in (recorded_rollout(registry, n, config.app) for n in names) if r]
    except Exception as exc:  # the status of the app itself does not depend on the registry
        return {"error": f"registry at {config.registry_uri} did not answer: {type(exc).__name__}"}
    return max(records, key=lambda r: r.get("recorded_at", ""), default=None)


def trace_app(app: str, address: str | None = None, registry: Registry | None = None) -> dict[str, list[Hop]]:
    """The lineage of every variant an app serves, from the live Serve app to the training data.

    Returns:
        variant label -> its chain of hops, app first; each hop says whether it checks out.
    """
    config, status, url = app_serving_config(app, address)
    return trace_config(app, config, status, url, registry)


def trace_model(reference: str, registry: Registry | None = None, address: str | None = None) -> list[Hop]:
    """The lineage of one model version (``NAME/VERSION`` or ``NAME@ALIAS``), with the app serving it."""
    return _trace_model(reference, app_serving_config, registry, address)
