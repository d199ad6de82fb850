"""Deploying, inspecting and deleting apps.

``deploy`` is build then apply:

1. connect (the local head is started if needed) and build the ``ServingConfig``;
2. preflight: a Ray task on the cluster loads every model by reference, checks its hash and
   builds its predictor, so a broken model never replaces a working one;
3. a first deploy is applied as is; a new release of a running app is rolled out by its
   ``rollout`` policy (``traffic.roll_out``): loaded beside the serving release on the live
   replicas, then given traffic step by step with gates, so no request is dropped;
4. each change is waited for, with progress, until the app is RUNNING and answers with the new
   config, and recorded in the registry; on failure the app is put back as it was (or the new
   app removed), and the error says why, with Serve's own status messages.

Changes to one app hold its lock (``apply.app_lock``): a second deployer gets ``AppLocked``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ray_deploy.cluster import ClusterInfo, connect
from ray_deploy.control.apply import (
    RunningApp,
    remove_new_app,
    restore,
    running_app,
)
from ray_deploy.control.lock import app_lock
from ray_deploy.control.rollout import Plan
from ray_deploy.control.traffic import Mover, finish, roll_out
from ray_deploy.errors import DeployError, LineageError, RayDeployError, RolloutFailed
from ray_deploy.models.artifacts import ModelRef
from ray_deploy.progress import report
from ray_deploy.registry.history import TrafficRecorder
from ray_deploy.registry.lineage import LineageSource, Registry, VersionRef
from ray_deploy.serving.config import (
    SERVER_DEPLOYMENT,
    ServingConfig,
    deployment_options,
    serving_config,
)
from ray_deploy.spec import DeploymentSpec

logger = logging.getLogger(__name__)


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
    rollout: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as stored in the step's ``ray_serve`` artifact."""
        return {
            "app": self.app,
            "url": self.url,
            "route_prefix": self.route_prefix,
            "address": self.cluster.address,
            "dashboard_url": self.cluster.dashboard_url,
            "registry_uri": self.registry.registry_uri if self.registry else None,
            "rollout": self.rollout,
            "variants": [
                {
                    "name": v.name,
                    "label": v.label,
                    "release": v.release,
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


def _unchanged(running: RunningApp, config: ServingConfig, options: dict[str, Any]) -> bool:
    """Whether applying ``config`` with ``options`` would change nothing that runs: the same task
    deploying the same release again (e.g. run again by @retry). Then nothing is applied and
    nothing recorded twice. Another task (possibly with other user code) always applies."""
    if running.config.model_dump(exclude={"rollout"}) != config.model_dump(exclude={"rollout"}):
        return False
    return _same_options(running.options, options)


def _same_options(running: dict[str, Any], incoming: dict[str, Any]) -> bool:
    # Serve reports its defaults too (e.g. every actor resource, autoscaling fields not given).
    for key in (set(running) | set(incoming)) - {"user_config"}:
        have, want = running.get(key), incoming.get(key)
        if key == "ray_actor_options":
            have, want = have or {}, want or {}
            if any((have.get(k) or None) != (want.get(k) or None) for k in RESOURCE_KEYS):
                return False
        elif key == "autoscaling_config" and have and want:
            if any(have.get(k) != v for k, v in want.items()):
                return False
        elif have != want:
            return False
    return True


RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "accelerator_type", "resources")


def deploy(
    spec: DeploymentSpec,
    models: dict[str, ModelRef],
    predictors: dict[str, str] | None = None,
    source: dict[str, str] | None = None,
    code_dir: str | None = None,
    lineage: LineageSource | None = None,
) -> DeployResult:
    """Serve ``models`` as the app ``spec`` describes, replacing any running release safely.

    Args:
        spec: validated deployment spec.
        models: variant name -> model reference.
        predictors: variant name -> resolved predictor (defaults to each variant's own).
        source: provenance to show in the dashboard and the app's GET answer.
        code_dir: directory holding user predictor modules, shipped with the deployment.
        lineage: where the models came from; with ``spec.lineage`` each variant becomes an MLflow
            model version, tagged both ways, and the aliases follow the traffic.

    Returns:
        A ``DeployResult`` with the URL the app answers on, the model versions, and what the
        rollout did.

    Raises:
        RegistryUnreachable: the MLflow registry does not answer; nothing was changed.
        ClusterUnreachable: the cluster does not answer at the address tried.
        AppLocked: another process is changing the same app; nothing was changed.
        ArtifactError, PredictorError: a model failed its preflight; nothing was changed.
        RolloutFailed: a gate failed; the previous release serves all traffic again.
        DeployError: Serve did not bring the app up; the previous release was put back.
        LineageError: recording the deployment failed; the previous release was put back.
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
    registry_answer: Future | None = None
    if registry is not None:
        report(f"checking the MLflow registry at {registry.registry_uri} ...")
        registry.check_address()  # an address that does not answer fails here, before the cluster is asked
        # The registry's first answer (seconds when it creates an embedded store) overlaps the
        # cluster connection and the preflight; it is awaited before anything changes.
        registry_answer = _in_background(registry.first_answer)
    with connect(spec.address, code_dir=code_dir) as cluster, app_lock(spec.app, "deploy"):
        report(f"checking {len(config.variants)} model(s) on the cluster before deploying {spec.app!r} ...")
        checked = preflight(config, timeout_s=spec.deploy_timeout_s)
        versions: dict[str, VersionRef] = {}
        if registry is not None:
            registry_answer.result()
            versions = _register_versions(registry, spec, config, lineage)
            config = config.with_versions({n: str(v) for n, v in versions.items()}, registry.registry_uri)
        running = running_app(spec.app)
        url = cluster.http_url + spec.route
        options = {k: v for k, v in deployment_options(spec, config).items() if k != "user_config"}
        recorder = None
        if registry is not None:
            recorder = TrafficRecorder(
                registry,
                spec.app,
                deployment_tags={
                    "ray.app": spec.app,
                    "ray.deployment": SERVER_DEPLOYMENT,
                    "ray.route": spec.route,
                    "ray.url": url,
                    "ray.address": cluster.address,
                    "ray.dashboard_url": cluster.dashboard_url or "",
                },
                production_alias=spec.production_alias,
                canary_alias=spec.canary_alias,
                options=options,
                code_dir=code_dir,
            )
        mover = Mover(spec.app, spec.route, url, options, spec.deploy_timeout_s, recorder)
        rollout: dict[str, Any] = {}
        try:
            if running is None:
                report(f"deploying app {spec.app!r} at {url} ({spec.num_replicas} replica(s)) ...")
                mover.apply(config, "deployed", "first deploy", settled=True)
            else:
                plan = Plan.between(running.config, config)
                interrupted = running.config.rollout
                if not plan.new_labels and not plan.old_labels and interrupted is not None:
                    # This very release was being rolled out when its deploy stopped (e.g. the
                    # task died and @retry runs it again): finish that rollout, don't start another.
                    if set(interrupted.new) == {v.label for v in plan.new} and spec.rollout.plan[-1] >= 100:
                        finish(mover, Plan.resume(running.config), config, "finishing the interrupted rollout")
                    else:
                        report(f"app {spec.app!r}: this release is already rolling out; nothing to change")
                elif not plan.new_labels and not plan.old_labels:
                    if _unchanged(running, config.with_variants(plan.new), options):
                        report(f"app {spec.app!r}: already serving this release; nothing to change")
                    else:
                        mover.apply(config, "deployed", "same models, settings updated", settled=True)
                else:
                    rollout = roll_out(mover, plan, config, running.config, spec.rollout)
            if running is not None:
                config = running_app(spec.app).config  # unchanged variants keep their release
        except RolloutFailed:
            raise
        except DeployError as failure:
            _undo(spec.app, running)
            _mark_failed(registry, versions, str(failure))
            raise failure
        except Exception as exc:
            # The app changed but the registry write failed: nothing may serve unrecorded.
            _undo(spec.app, running)
            _mark_failed(registry, versions, f"registry write failed: {exc}")
            where = registry.registry_uri if registry is not None else "the registry"
            raise LineageError(
                f"recording the deployment in the MLflow registry at {where} failed ({exc}); "
                f"app {spec.app!r} was put back to its previous version"
            ) from exc
        if registry is not None:
            for variant, version in versions.items():
                report(f"variant {variant!r} is MLflow model version {version} ({registry.registry_uri})")
    seconds = time.monotonic() - started
    report(f"app {spec.app!r} is serving at {url} ({seconds:.1f}s)")
    return DeployResult(spec.app, url, spec.route, cluster, config, seconds, checked, versions, registry, rollout)


def _in_background(work: Callable[[], Any]) -> Future:
    """Run ``work`` on a daemon thread (a hung registry never holds the process at exit)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="ray-deploy-background", daemon=True).start()
    return future


def _undo(app: str, running: RunningApp | None) -> None:
    if running is None:
        remove_new_app(app)
    else:
        restore(running)


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

    from ray_deploy.models.predictors import BUILTIN_PREDICTOR_PATHS
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
