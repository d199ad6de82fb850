"""Deploying, inspecting and deleting apps.

``deploy`` is build then apply:

1. connect (the local head is started if needed) and build the ``ServingConfig``;
2. preflight: a Ray task on the cluster loads every model by reference, checks its hash and
   builds its predictor, so a broken model never replaces a working one;
3. apply with Serve and wait, with progress, until the app is RUNNING and answers with the new
   config; on failure or timeout the previous config is put back (or the new app removed), and
   the error says why, with Serve's own status messages.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ray_deploy.artifacts import ModelRef
from ray_deploy.cluster import ClusterInfo, connect
from ray_deploy.errors import DeployError, LineageError, RayDeployError
from ray_deploy.lineage import LineageSource, Registry, VersionRef, record_deployment
from ray_deploy.progress import Waiter, report
from ray_deploy.serving.app import SERVER_DEPLOYMENT, ServingConfig, build_application, serving_config
from ray_deploy.serving.metrics import app_metrics
from ray_deploy.spec import DeploymentSpec

logger = logging.getLogger(__name__)

_POLL_S = 0.5


@dataclass(frozen=True)
class DeployResult:
    """What was deployed, where it answers, and the model versions that record it."""

    app: str
    url: str
    route_prefix: str
    cluster: ClusterInfo
    config: ServingConfig
    seconds: float
    preflight: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, VersionRef] = field(default_factory=dict)
    registry: Registry | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as stored in the step's ``ray_serve`` artifact."""
        return {
            "app": self.app,
            "url": self.url,
            "route_prefix": self.route_prefix,
            "address": self.cluster.address,
            "dashboard_url": self.cluster.dashboard_url,
            "registry_uri": self.registry.registry_uri if self.registry else None,
            "variants": [
                {
                    "name": v.name,
                    "weight": v.weight,
                    "shadow": v.shadow,
                    "predictor": v.predictor,
                    "model_uri": v.model.uri,
                    "sha256": v.model.sha256,
                    "model_version": v.model_version,
                    "model_ref": v.model.model_dump(mode="json"),
                }
                for v in self.config.variants
            ],
            "deploy_seconds": round(self.seconds, 3),
        }


def deploy(
    spec: DeploymentSpec,
    models: dict[str, ModelRef],
    predictors: dict[str, str] | None = None,
    source: dict[str, str] | None = None,
    code_dir: str | None = None,
    lineage: LineageSource | None = None,
) -> DeployResult:
    """Serve ``models`` as the app ``spec`` describes, replacing any running version safely.

    Args:
        spec: validated deployment spec.
        models: variant name -> model reference.
        predictors: variant name -> resolved predictor (defaults to each variant's own).
        source: provenance to show in the dashboard and the app's GET answer.
        code_dir: directory holding user predictor modules, shipped with the deployment.
        lineage: where the models came from; with ``spec.lineage`` each variant becomes an MLflow
            model version, tagged both ways, and the aliases follow the traffic.

    Returns:
        A ``DeployResult`` with the URL the app answers on (and the model versions).

    Raises:
        RegistryUnreachable: the MLflow registry does not answer; nothing was changed.
        ClusterUnreachable: the cluster does not answer at the address tried.
        ArtifactError, PredictorError: a model failed its preflight; nothing was changed.
        DeployError: Serve did not bring the app up; the previous version was put back.
        LineageError: recording the deployment failed; the previous version was put back.
    """
    started = time.monotonic()
    if source is None and lineage is not None:
        source = {
            "flow": lineage.flow,
            "run_id": lineage.run_id,
            "step": lineage.step,
            "task": lineage.task,
            "user": lineage.user,
        }
    config = serving_config(spec, models, predictors or {}, source)
    registry = Registry() if spec.lineage and lineage is not None else None
    if registry is not None:
        report(f"checking the MLflow registry at {registry.registry_uri} ...")
        registry.check_reachable()
    with connect(spec.address, code_dir=code_dir) as cluster:
        report(f"checking {len(config.variants)} model(s) on the cluster before deploying {spec.app!r} ...")
        checked = preflight(config, timeout_s=spec.deploy_timeout_s)
        versions: dict[str, VersionRef] = {}
        if registry is not None:
            versions = _register_versions(registry, spec, config, lineage)
            config = config.with_versions({n: str(v) for n, v in versions.items()}, registry.registry_uri)
        previous = running_deployment_options(spec.app)
        url = cluster.http_url + spec.route
        report(f"deploying app {spec.app!r} at {url} ({spec.num_replicas} replica(s)) ...")
        _apply(build_application(spec, config), spec.app, spec.route)
        try:
            _wait_until_serving(spec.app, url, config, spec.deploy_timeout_s)
        except DeployError as failure:
            _restore(spec.app, spec.route, previous)
            _mark_failed(registry, versions, str(failure))
            raise failure
        if registry is not None:
            try:
                record_deployment(
                    registry,
                    versions,
                    {v.name: v.weight for v in config.variants},
                    {
                        "ray.app": spec.app,
                        "ray.deployment": SERVER_DEPLOYMENT,
                        "ray.route": spec.route,
                        "ray.url": url,
                        "ray.address": cluster.address,
                        "ray.dashboard_url": cluster.dashboard_url or "",
                    },
                    spec.production_alias,
                    spec.canary_alias,
                )
            except Exception as exc:
                # Nothing may serve unrecorded: put the previous version back.
                _restore(spec.app, spec.route, previous)
                _mark_failed(registry, versions, f"registry write failed: {exc}")
                raise LineageError(
                    f"recording the deployment in the MLflow registry at {registry.registry_uri} failed ({exc}); "
                    f"app {spec.app!r} was put back to its previous version"
                ) from exc
            for variant, version in versions.items():
                report(f"variant {variant!r} is MLflow model version {version} ({registry.registry_uri})")
    seconds = time.monotonic() - started
    report(f"app {spec.app!r} is serving at {url} ({seconds:.1f}s)")
    return DeployResult(spec.app, url, spec.route, cluster, config, seconds, checked, versions, registry)


def _register_versions(
    registry: Registry, spec: DeploymentSpec, config: ServingConfig, lineage: LineageSource
) -> dict[str, VersionRef]:
    run_id = registry.mirror_run(lineage)
    return {
        v.name: registry.register_version(spec.model_name, v.name, v.model, lineage, run_id, v.predictor)
        for v in config.variants
    }


def _mark_failed(registry: Registry | None, versions: dict[str, VersionRef], reason: str) -> None:
    if registry is None:
        return
    for version in versions.values():
        try:
            registry.set_tags(version, {"ray_deploy.status": "failed", "ray_deploy.failure": reason[:4000]})
        except Exception as exc:  # the registry may be the thing that failed
            logger.warning("could not mark %s as failed: %s", version, exc)


def preflight(config: ServingConfig, timeout_s: float) -> list[dict[str, Any]]:
    """Load every variant on the cluster, as a replica would, without touching the app.

    Raises:
        ArtifactError, PredictorError: the error the model or predictor raised, unchanged.
        DeployError: the check did not finish within ``timeout_s``.
    """
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_check_variants)
    ref = task.remote(config.model_dump(mode="json"))
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise DeployError(f"preflight: loading the models on the cluster took longer than {timeout_s:g}s") from None
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), RayDeployError) else None
        if cause is not None:
            raise type(cause)(cause.message) from None
        raise DeployError(f"preflight: loading the models on the cluster failed: {exc}") from None


def _check_variants(user_config: dict[str, Any]) -> list[dict[str, Any]]:
    import os

    import numpy as np

    from ray_deploy.predictors import BUILTIN_PREDICTOR_PATHS
    from ray_deploy.serving.server import load_variant

    config = ServingConfig.model_validate(user_config)
    checked = []
    for variant_config in config.variants:
        variant = load_variant(variant_config)
        if variant_config.predictor in BUILTIN_PREDICTOR_PATHS and variant.n_features:
            # A built-in that cannot answer one row of zeros would fail every request.
            variant.predictor.predict(np.zeros((1, variant.n_features)))
        checked.append({**variant.describe(), "node_pid": os.getpid()})
    return checked


def _apply(application: Any, app: str, route_prefix: str) -> None:
    from ray import serve
    from ray.serve.api import RunTarget

    try:
        serve.run_many(
            [RunTarget(target=application, name=app, route_prefix=route_prefix)],
            wait_for_applications_running=False,
        )
    except Exception as exc:
        raise DeployError(f"Serve refused app {app!r} at route {route_prefix}: {exc}") from exc


def _wait_until_serving(app: str, url: str, config: ServingConfig, timeout_s: float) -> None:
    """Until the app is RUNNING and its GET answer shows the new models, or DeployError."""
    from ray import serve

    waiter = Waiter(f"app {app!r}")
    expected = [v.model.uri for v in config.variants]
    deadline = time.monotonic() + timeout_s
    messages: list[str] = []
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is None:
            waiter.update("waiting for Serve to register the app")
        else:
            messages = [f"{name}: {d.status.value} {d.message}".strip() for name, d in status.deployments.items()]
            messages += [status.message] if status.message else []
            state = status.status.value
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployError(f"app {app!r} is {state}: " + "; ".join(m for m in messages if m))
            replicas = {
                name: ", ".join(f"{count} {replica_state}" for replica_state, count in d.replica_states.items())
                for name, d in status.deployments.items()
            }
            waiter.update(f"{state}; replicas: " + "; ".join(f"{n} {r or 'none yet'}" for n, r in replicas.items()))
            if state == "RUNNING" and _serves(url, expected):
                return
        time.sleep(_POLL_S)
    detail = "; ".join(m for m in messages if m) or "no status message from Serve"
    raise DeployError(
        f"app {app!r} did not become healthy within {timeout_s:g}s (deploy_timeout_s): {detail}. "
        "If replicas wait for resources, lower num_cpus/num_gpus or add nodes."
    )


def _serves(url: str, expected_uris: list[str]) -> bool:
    import json

    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            described = json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return [v.get("model") for v in described.get("variants", [])] == expected_uris


def running_deployment_options(app: str) -> dict[str, Any] | None:
    """The running ModelServer's deployment options for ``app``, or None if it is not deployed."""
    details = _serve_details().get("applications", {}).get(app)
    if not details:
        return None
    deployment = details.get("deployments", {}).get(SERVER_DEPLOYMENT)
    if not deployment:
        return None
    config = deployment.get("deployment_config", {})
    options = {
        "name": SERVER_DEPLOYMENT,
        "num_replicas": config.get("num_replicas", 1),
        "max_ongoing_requests": config.get("max_ongoing_requests"),
        "ray_actor_options": config.get("ray_actor_options") or {},
        "user_config": config.get("user_config"),
        "_route_prefix": details.get("route_prefix"),
    }
    return {k: v for k, v in options.items() if v is not None}


def _restore(app: str, route_prefix: str, previous: dict[str, Any] | None) -> None:
    from ray import serve

    from ray_deploy.serving.server import ModelServer

    if previous is None:
        report(f"removing app {app!r}: its first deploy failed")
        serve.delete(app)
        return
    report(f"putting the previous version of app {app!r} back ...")
    options = dict(previous)
    route = options.pop("_route_prefix", route_prefix)
    _apply(ModelServer.options(**options).bind(), app, route)
    config = ServingConfig.model_validate(options["user_config"])
    base = _url_base()
    try:
        _wait_until_serving(app, f"{base}{route}" if base else "", config, timeout_s=120)
    except DeployError as exc:
        logger.error("the previous version of %s did not come back: %s", app, exc)


def _url_base() -> str | None:
    http = _serve_details().get("http_options") or {}
    host, port = http.get("host"), http.get("port")
    if not port:
        return None
    return f"http://{'127.0.0.1' if host in (None, '0.0.0.0') else host}:{port}"


def _serve_details() -> dict[str, Any]:
    # Serve has no public Python call for the deployed configs; this is what `serve status` and
    # the dashboard's /api/serve/applications/ are built on.
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def app_status(app: str | None = None, address: str | None = None) -> list[dict[str, Any]]:
    """Status of the apps this package deployed (all, or one): state, URL and variants."""
    from ray import serve

    with connect(address, start_local=False) as cluster:
        details = _serve_details().get("applications", {})
        statuses = serve.status().applications
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
            apps.append(
                {
                    "app": name,
                    "status": status.status.value if status else "UNKNOWN",
                    "url": cluster.http_url + config.route_prefix,
                    "replicas": {d: dict(s.replica_states) for d, s in (status.deployments.items() if status else [])},
                    "variants": [
                        {
                            "name": v.name,
                            "weight": v.weight,
                            "predictor": v.predictor,
                            "model_uri": v.model.uri,
                            "model_version": v.model_version,
                        }
                        for v in config.variants
                    ],
                    "source": config.source,
                    "metrics": app_metrics(name),
                    "config": user_config,
                }
            )
        if app is not None and not apps:
            raise DeployError(f"no app {app!r} deployed by ray-deploy on {cluster.address}")
        return apps


def app_serving_config(app: str, address: str | None = None) -> tuple[ServingConfig, str, str]:
    """What a running app serves, read back from Serve: (config, status, URL).

    Raises:
        DeployError: no app of that name was deployed by ray-deploy on the cluster.
    """
    (row,) = app_status(app, address)
    return ServingConfig.model_validate(row["config"]), row["status"], row["url"]


def delete_app(app: str, address: str | None = None) -> bool:
    """Delete an app; True if it existed (deleting a missing app is not an error)."""
    from ray import serve

    with connect(address, start_local=False):
        exists = app in serve.status().applications
        if exists:
            report(f"deleting app {app!r} ...")
            serve.delete(app)
        return exists
