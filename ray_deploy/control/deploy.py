"""Deploying a release: build, check, register, then apply it or hand it to the rollout controller.

``deploy`` goes forward through the layers (spec -> live app -> Serve and the registry):

1. connect (the local head is started if needed) and build the ``ServingConfig`` from the spec;
2. preflight: a Ray task on the cluster loads every model by reference, checks its hash and
   builds its predictor, so a broken model never replaces a working one;
3. register each variant as an MLflow model version (lineage on);
4. read the live app (``control.live.LiveApp``): a first deploy is applied as is; a new release of
   a running app is staged beside the serving release (phase ``staged``) and handed to the app's
   rollout controller on the cluster (``control.controller``), which moves traffic by the
   ``rollout`` policy with gates; the deploy waits for its outcome and streams its progress
   (``rollout={"wait": False}``: returns once the controller has taken over);
5. every change is waited for, with progress, until the app is RUNNING and answers with the new
   config, and recorded in the registry; on failure the app is put back as it was (or the new
   app removed), and the error names what failed.

The steps before the hand-over hold the app's lock (``control.lock``): a second deployer gets
``AppLocked`` (a rollout controller applying a step is waited for: it holds the lock for
seconds); a deploy that meets a rollout of another release under way is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from ray_deploy.cluster import ClusterInfo, connect
from ray_deploy.control.apply import schedule_stall_s, serve_details
from ray_deploy.control.controller import controller_name, start_controller, wait_for_outcome, warm_controller
from ray_deploy.control.live import LiveApp, overlapping_app, plain
from ray_deploy.control.lock import app_lock
from ray_deploy.control.phases import ACTIVE, IN_PROGRESS, check_move
from ray_deploy.control.rollout import Plan
from ray_deploy.errors import DeployError, LineageError, RayDeployError, RolloutStateError, SpecError
from ray_deploy.models.artifacts import ModelRef, fetch_mlflow_model, mlflow_uris, without_credentials
from ray_deploy.progress import report
from ray_deploy.registry.history import Action
from ray_deploy.registry.lineage import LineageSource, Registry, VersionRef, recorded_at, tracking_uri, who
from ray_deploy.registry.lineage import registry_uri as default_registry_uri
from ray_deploy.serving.config import (
    SERVER_DEPLOYMENT,
    RolloutPhase,
    ServingConfig,
    deployment_options,
    serving_config,
    variant_summary,
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
                {**variant_summary(v), "sha256": v.model.sha256, "model_ref": v.model.model_dump(mode="json")}
                for v in self.config.variants
            ],
            "deploy_seconds": round(self.seconds, 3),
        }


def _unchanged(running: LiveApp, config: ServingConfig, options: dict[str, Any]) -> bool:
    """Whether applying ``config`` with ``options`` would change nothing that runs: the same task
    deploying the same release again (e.g. run again by @retry). Then nothing is applied and
    nothing recorded twice. Another task (possibly with other user code) always applies."""
    # The rollout fields say how the app got here, not what it serves.
    unserved = {"rollout", "last_rollout"}
    if running.config.model_dump(exclude=unserved) != config.model_dump(exclude=unserved):
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
            if not _holds(have, want):
                return False
        elif have != want:
            return False
    return True


def _holds(have: Any, want: Any) -> bool:
    """Whether ``have`` says all that ``want`` says (Serve fills in what was not given)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(_holds(have.get(k), v) for k, v in want.items())
    return have == want


RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "accelerator_type", "resources")


def deploy(
    spec: DeploymentSpec,
    models: dict[str, ModelRef],
    predictors: dict[str, str] | None = None,
    source: dict[str, str] | None = None,
    code_dir: str | None = None,
    lineage: LineageSource | None = None,
    record: bool = False,
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
        record: with no ``lineage`` (MLflow models deployed by the MLflow deployments target),
            still record each variant in the registry: as the source version itself when it
            belongs to the app's registered model, else as a new version that points back to it.

    Returns:
        A ``DeployResult`` with the URL the app answers on, the model versions, and what the
        rollout did.

    Raises:
        RegistryUnreachable: the MLflow registry does not answer; nothing was changed.
        ClusterUnreachable: the cluster does not answer at the address tried.
        AppLocked: another process is changing the same app; nothing was changed.
        RolloutStateError: a rollout of another release is under way; nothing was changed.
        SpecError: the app's route overlaps another app's on the cluster; nothing was changed.
        ArtifactError, PredictorError: a model failed its preflight; nothing was changed.
        RolloutFailed: a gate failed; the previous release serves all traffic again.
        DeployError: Serve did not bring the app up (or the deploy failed after changing it); the
            previous release was put back.
        LineageError: recording the deployment failed; the previous release was put back.
    """
    started = time.monotonic()
    schedule_stall_s()  # a bad RAY_DEPLOY_SCHEDULE_STALL_S fails here, before anything changes
    if source is None and lineage is not None:
        source = {
            "flow": lineage.flow,
            "run_id": lineage.run_id,
            "step": lineage.step,
            "task": lineage.task,
            "user": lineage.user,
        }
    config = serving_config(spec, {name: _resolvable(ref) for name, ref in models.items()}, predictors or {}, source)
    registry = Registry() if spec.lineage and (lineage is not None or record) else None
    registry_answer: Future | None = None
    if registry is not None:
        report(f"checking the MLflow registry at {registry.registry_uri} ...")
        registry.check_address()  # an address that does not answer fails here, before the cluster is asked
        # The registry's first answer (seconds when it creates an embedded store) overlaps the
        # cluster connection and the preflight; it is awaited before anything changes.
        registry_answer = _in_background(registry.first_answer)
    with connect(spec.address, code_dir=code_dir) as cluster:
        url = cluster.http_url + spec.route
        config = config.model_copy(
            update={
                "settings": config.settings.model_copy(
                    update={
                        "code_dir": code_dir,
                        "placement": {
                            "placement_group_bundles": [dict(bundle) for bundle in spec.placement.bundles],
                            "placement_group_strategy": spec.placement.strategy,
                        }
                        if spec.placement
                        else None,
                        "deployment_tags": {
                            "ray.app": spec.app,
                            "ray.deployment": SERVER_DEPLOYMENT,
                            "ray.route": spec.route,
                            "ray.url": url,
                            "ray.address": cluster.address,
                            "ray.dashboard_url": cluster.dashboard_url or "",
                        },
                    }
                )
            }
        )
        options = {k: v for k, v in deployment_options(spec, config).items() if k != "user_config"}
        with app_lock(spec.app, "deploy"):
            overlap = overlapping_app(spec.app, spec.route)
            if overlap is not None:
                raise SpecError(
                    f"route_prefix: {spec.route!r} overlaps app {overlap[0]!r} at {overlap[1]!r} on the cluster at "
                    f"{cluster.address} (one route inside the other would take the other app's requests); "
                    "choose a route beside it, e.g. route_prefix='/<name>'"
                )
            if spec.app in (serve_details().get("applications") or {}):
                warm_controller(spec.app)  # a release on a live app is handed to it below
            report(f"checking {len(config.variants)} model(s) on the cluster before deploying {spec.app!r} ...")
            checked = preflight(config, timeout_s=spec.deploy_timeout_s)
            versions: dict[str, VersionRef] = {}
            if registry is not None:
                registry_answer.result()
                versions = _register_versions(registry, spec, config, lineage)
                # The app's config is visible in the dashboard: the registry's address, never its credentials
                # (processes that record later bring their own, as MLflow reads them from the environment).
                config = config.with_versions(
                    {n: str(v) for n, v in versions.items()}, without_credentials(registry.registry_uri)
                )
            live = LiveApp.read(spec.app)
            hand_over = _first_move(spec, live, config, options, url)
        rollout: dict[str, Any] = {}
        if hand_over:
            handle = start_controller(spec.app)
            rollout = {"strategy": spec.rollout.strategy, "controller": controller_name(spec.app)}
            if spec.rollout.wait:
                report(f"app {spec.app!r}: rollout controller {controller_name(spec.app)!r} drives the rollout ...")
                rollout.update(wait_for_outcome(spec.app, handle))
            else:
                rollout["state"] = "handed_over"
                report(
                    f"app {spec.app!r}: the rollout continues in controller {controller_name(spec.app)!r} on the "
                    f"cluster; `ray-deploy status {spec.app}` shows where it stands"
                )
        if live is not None:
            config = LiveApp.require(spec.app).config  # unchanged variants keep their release
        if registry is not None:
            for variant, version in versions.items():
                report(f"variant {variant!r} is MLflow model version {version} ({registry.registry_uri})")
    seconds = time.monotonic() - started
    report(f"app {spec.app!r} is serving at {url} ({seconds:.1f}s)")
    return DeployResult(spec.app, url, spec.route, cluster, config, seconds, checked, versions, registry, rollout)


def _first_move(
    spec: DeploymentSpec, live: LiveApp | None, config: ServingConfig, options: dict[str, Any], url: str
) -> bool:
    """Apply what this deploy changes while it holds the lock; True when a rollout controller
    takes it from there. Any failure puts the app back as it was before raising."""
    if live is None:
        report(f"deploying app {spec.app!r} at {url} ({spec.num_replicas} replica(s)) ...")
        target, before = LiveApp.new(config, options, url), None
        _changing(target, before, config, lambda: target.apply(config, Action.DEPLOYED, "first deploy", settled=True))
        return False
    plan = Plan.between(live.config, config)
    if live.phase in IN_PROGRESS:
        if not _is_rolling_out(live, config):
            rollout = live.config.rollout
            raise RolloutStateError(
                f"app {spec.app!r} is {live.phase.value} with {', '.join(rollout.new)} at {rollout.percent:g}%: "
                f"wait for that rollout to end, or `ray-deploy promote {spec.app}` / `ray-deploy rollback {spec.app}` "
                "before deploying another release"
            )
        if live.phase in ACTIVE:
            report(f"app {spec.app!r}: this release is already rolling out ({live.phase.value}); following it")
            return True
        report(f"app {spec.app!r}: this release already holds at {live.config.rollout.percent:g}%; nothing to change")
        return False
    target = replace(live, options=plain(options))
    if not plan.new_labels and not plan.old_labels:
        if _unchanged(live, config.with_variants(plan.new), options):
            report(f"app {spec.app!r}: already serving this release; nothing to change")
            return False
        _changing(
            target,
            live,
            config,
            lambda: target.apply(config, Action.DEPLOYED, "same models, settings updated", settled=True),
        )
        return False
    labels = ", ".join(sorted(plan.new_labels)) or "the new config"
    staged = config.with_variants(plan.at(0)).model_copy(
        update={"rollout": plan.state(spec.rollout, RolloutPhase.STAGED, 0, 0.0, recorded_at(), who())}
    )
    check_move(spec.app, live.phase, RolloutPhase.STAGED, "deploy")
    _changing(
        target,
        live,
        config,
        lambda: target.apply(staged, Action.STAGED, f"loading {labels} beside the serving release"),
    )
    return True


def _is_rolling_out(live: LiveApp, config: ServingConfig) -> bool:
    """Whether ``config`` is the release ``live`` is rolling out (a retried deploy of it)."""
    rollout = live.config.rollout
    by_label = {v.label: v for v in live.config.variants}
    incoming = {v.label: v for v in config.variants}
    return set(incoming) == set(rollout.new) and all(
        label in by_label and by_label[label].identity == v.identity for label, v in incoming.items()
    )


def _changing(target: LiveApp, before: LiveApp | None, config: ServingConfig, change: Callable[[], Any]) -> None:
    """Run ``change``; if it fails, put the app back (``before``; None: remove the new app), mark
    the new versions failed and raise an error that names what failed."""
    try:
        change()
    except RayDeployError as failure:
        _put_back(target, before)
        target.mark_failed(list(config.variants), str(failure))
        if isinstance(failure, LineageError):
            raise type(failure)(
                f"{failure.message}; app {target.name!r} was put back to its previous version"
            ) from failure
        raise
    except Exception as exc:
        _put_back(target, before)
        target.mark_failed(list(config.variants), f"{type(exc).__name__}: {exc}")
        raise DeployError(
            f"deploying app {target.name!r} failed after the app changed ({type(exc).__name__}: {exc}); "
            "it was put back to its previous version"
        ) from exc


def _put_back(target: LiveApp, before: LiveApp | None) -> None:
    (before or target).put_back()


def _resolvable(ref: ModelRef) -> ModelRef:
    """An MLflow reference made to resolve where it was made (against this process's tracking
    store and registry, not MLflow's default on the replica: an empty store in its directory),
    pinned to a version (``models:/name@alias`` -> ``models:/name/N``: an alias that moves later
    moves no replica) and to the sha256 of its files, checked wherever it is loaded."""
    if ref.kind != "mlflow":
        return ref
    update = {} if ref.tracking_uri else {"tracking_uri": tracking_uri(), "registry_uri": default_registry_uri()}
    pinned = ref.model_copy(update=update)
    with mlflow_uris(pinned.tracking_uri, pinned.registry_uri):
        if pinned.uri.startswith("models:/") and "@" in pinned.uri:
            registry = Registry(pinned.tracking_uri, pinned.registry_uri)
            pinned = pinned.model_copy(update={"uri": registry.resolve(pinned.uri).uri})
        if pinned.sha256 is None:
            pinned = pinned.model_copy(update={"sha256": fetch_mlflow_model(pinned)[1]})
    return ModelRef.model_validate(pinned.model_dump())


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


def _register_versions(
    registry: Registry, spec: DeploymentSpec, config: ServingConfig, lineage: LineageSource | None
) -> dict[str, VersionRef]:
    if lineage is None:
        return {
            v.name: registry.record_mlflow_model(spec.model_name, v.name, v.model, v.predictor) for v in config.variants
        }
    run_id = registry.mirror_run(lineage)
    return {
        v.name: registry.register_version(spec.model_name, v.name, v.model, lineage, run_id, v.predictor)
        for v in config.variants
    }


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
    from ray_deploy.serving.variant import load_variant

    config = ServingConfig.model_validate(user_config)
    checked = []
    for variant_config in config.variants:
        variant = load_variant(variant_config)
        if variant_config.predictor in BUILTIN_PREDICTOR_PATHS and variant.n_features:
            # A built-in that cannot answer one row of zeros would fail every request.
            variant.predictor.predict(np.zeros((1, variant.n_features)))
        checked.append({**variant.describe(), "node_pid": os.getpid()})
    return checked
