"""What a serving app is, as pure data: the config its replicas receive and its Serve options.

The application is one deployment, ``ModelServer``, whose ``user_config`` is the whole
``ServingConfig``: model references (never the models), predictors, weights and where the
models came from. Keeping it in ``user_config`` means the Ray dashboard shows what each app
serves, and Serve's own config file format (``to_serve_config``) rebuilds the same app.

Nothing here imports Ray or the replica code: the control plane builds and compares these
objects, the replica (``serving.server``) reads them. The deployment objects themselves, with their
Serve version pinned to the code the replicas run, are built in ``serving.server``.
"""

from __future__ import annotations

import hashlib
import os
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ray_deploy.errors import RayDeployError
from ray_deploy.models.artifacts import ModelRef
from ray_deploy.serving.capture import capture_root
from ray_deploy.spec import AutoscalingSpec, CaptureSpec, DeploymentSpec, RolloutSpec

SERVER_DEPLOYMENT = "ModelServer"
VARIANT_APP_SEPARATOR = "--"
APP_BUILDER_IMPORT_PATH = "ray_deploy.serving.server:app_builder"
VARIANT_APP_BUILDER_IMPORT_PATH = "ray_deploy.serving.server:variant_app_builder"


GC_THRESHOLD = 20_000
"""Generation-0 threshold of the garbage collector in a serving replica (Python's is 700).

Requests in flight hold a few dozen container objects each (frames, dicts, ASGI messages), so
at 32 concurrent requests Python's threshold is crossed every dozen requests or so and a
collection walks objects that are about to be freed anyway: measured in a loaded replica, the
collector took ~10 us of a ~160 us request (6%). With this threshold, the same replica ran one
collection in ~90,000 requests. Only cyclic garbage waits longer (at most this many objects); everything else is
still freed by reference counting at once. ``RAY_DEPLOY_GC_THRESHOLD`` sets another value
(forwarded from the deploying process to the replicas); 0 keeps Python's."""
GC_THRESHOLD_ENV = "RAY_DEPLOY_GC_THRESHOLD"

PREDICT_THREADS = 2
"""Predictions a replica runs at once for predictors that declare ``thread_safe = True`` (the
built-in ONNX predictor does: onnxruntime's ``run`` is thread-safe and releases the GIL).
Predictions that are not quick leave the event loop for a thread; with one thread, a prediction
that finishes waits for the GIL while the loop decodes the next request (orjson and numpy hold it
for a millisecond at 1,024 rows), and the model sits idle meanwhile. With two, one runs while the
other waits: measured at 1,024 rows per request, c=8, 2 cores: 288 -> 344 requests/s.
``RAY_DEPLOY_PREDICT_THREADS`` sets another number (forwarded to the replicas); other predictors
always predict one at a time."""
PREDICT_THREADS_ENV = "RAY_DEPLOY_PREDICT_THREADS"


def predict_threads_setting(environ: Any) -> int:
    """Thread-safe predictors' predictions at once per replica, from ``RAY_DEPLOY_PREDICT_THREADS``."""
    raw = environ.get(PREDICT_THREADS_ENV, "").strip()
    if not raw:
        return PREDICT_THREADS
    if not raw.isdigit() or int(raw) < 1:
        raise RayDeployError(f"{PREDICT_THREADS_ENV}={raw!r}: expected a whole number of threads, 1 or more")
    return int(raw)


def gc_threshold_setting(environ: Any) -> int:
    """The replicas' generation-0 GC threshold from ``RAY_DEPLOY_GC_THRESHOLD`` (0: Python's own)."""
    raw = environ.get(GC_THRESHOLD_ENV, "").strip()
    if not raw:
        return GC_THRESHOLD
    if not raw.isdigit():
        raise RayDeployError(f"{GC_THRESHOLD_ENV}={raw!r}: expected a whole number of objects (0 keeps Python's)")
    return int(raw)


class VariantConfig(BaseModel):
    """A variant as a replica sees it: the model by reference plus how to serve it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    weight: float
    predictor: str = Field(description="Resolved predictor name (never 'auto') or 'module:Class'.")
    predictor_config: dict[str, Any] = Field(default_factory=dict)
    model: ModelRef
    model_version: str | None = Field(None, description="MLflow registered model version, as name/version.")
    shadow: bool = Field(False, description="Gets a copy of live requests; its answers are only compared.")
    release: str | None = Field(
        None, description="Which build of the variant: 'v<MLflow version>' or a short content hash."
    )
    isolated: dict[str, float] | None = Field(
        None,
        description="Served from its own Serve app with these resources (num_replicas, num_cpus, num_gpus); "
        "None: loaded in the app's own replicas.",
    )

    @property
    def label(self) -> str:
        """Unique within an app: two releases of one variant serve side by side during a rollout."""
        return f"{self.name}@{self.release}" if self.release else self.name

    @property
    def version_number(self) -> str | None:
        """The registered model version's number (``cancer/3`` -> ``3``); None when unregistered."""
        return self.model_version.rsplit("/", 1)[-1] if self.model_version else None

    @property
    def identity(self) -> tuple[str, str, str, str]:
        """What must match for two entries to be the same loaded model (weights aside)."""
        import json

        return (
            self.name,
            self.model.model_dump_json(),
            self.predictor,
            json.dumps(self.predictor_config, sort_keys=True) + json.dumps(self.isolated, sort_keys=True),
        )

    def deployment_name(self) -> str:
        """An isolated variant's deployment (and the suffix of its app): named by variant and release."""
        return f"{self.name}-{self.release or 'r'}"


class RolloutPhase(StrEnum):
    """Where an app stands in a rollout: the one list of statuses shown by the CLI and the docs.

    The moves allowed between them are ``ray_deploy.control.phases.TRANSITIONS``.
    """

    SETTLED = "settled"  # one release serves; no rollout (the config carries no RolloutState)
    STAGED = "staged"  # the new release is loaded beside the serving one and gets no traffic yet
    STEPPING = "stepping"  # traffic is moving: the controller waits out a step, then judges its gate
    HOLDING = "holding"  # the plan stopped short of 100%: waits for promote or rollback by an operator
    PROMOTED = "promoted"  # final: the new release took all traffic and the old models were dropped
    ROLLED_BACK = "rolled_back"  # final: the old release serves all traffic again


class RolloutState(BaseModel):
    """A rollout under way, kept in the app's config so that any process (the controller after a
    restart, an operator's CLI, ``restore``) reads where it stands and can resume, promote or roll
    it back: the phase and step, the weights by label before and after, and the policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str
    phase: RolloutPhase = RolloutPhase.STEPPING
    step: int = Field(0, ge=0, description="Steps of the policy's plan taken so far (0: staged).")
    percent: float
    old: dict[str, float]
    new: dict[str, float]
    started_at: str
    started_by: str = Field("", description="Who started the rollout; the controller records its steps as theirs.")
    policy: RolloutSpec = Field(default_factory=RolloutSpec, description="The policy the controller follows.")


class RolloutOutcome(BaseModel):
    """How the app's last rollout ended, kept in its config so that ``status`` reads it from Serve
    (the registry holds the same record, tag ``ray_deploy.rollout.<app>``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    phase: RolloutPhase
    reason: str = ""
    new: tuple[str, ...] = Field((), description="Labels of the release the rollout brought (or tried to).")
    recorded_at: str
    by: str = ""


class AppSettings(BaseModel):
    """Settings of the app that later processes need (operators, the rollout controller, restore):
    replicas ignore them, but keeping them in the config persists them with the app."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    production_alias: str = "production"
    canary_alias: str = "canary"
    deployment_tags: dict[str, str] = Field(
        default_factory=dict, description="Tags every serving model version gets (the Ray app, route, URL, cluster)."
    )
    code_dir: str | None = Field(None, description="Directory of user predictor code on the deploying machine.")
    deploy_timeout_s: float = 300.0
    placement: dict[str, Any] | None = Field(
        None,
        description="The ModelServer's placement_group_bundles/strategy: Serve's own details leave them out, "
        "so a later process re-applying the app would otherwise drop its placement groups.",
    )


class CaptureConfig(BaseModel):
    """Prediction capture and labels as replicas apply them: the spec's options with the root resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str = Field(description="Where captures and labels are written: a local directory or an s3:// URL.")
    sample: float
    flush_s: float
    max_pending: int
    quality: str
    goal: str
    feedback_token_env: str | None = None


def capture_config(spec: CaptureSpec, models: dict[str, ModelRef]) -> CaptureConfig:
    """Where an app's captures go: the spec's ``path``, else beside the first Metaflow model's
    artifacts (``<datastore root>/ray_deploy_captures``), else ``$RAY_DEPLOY_HOME/captures``."""
    roots = [m.datastore_root for m in models.values() if m.kind == "metaflow" and m.datastore_root]
    home = str(Path(os.environ.get("RAY_DEPLOY_HOME") or Path.home() / ".ray_deploy"))
    root = capture_root(roots[0] if roots else None, spec.path, home)
    return CaptureConfig(
        root=root,
        sample=spec.sample,
        flush_s=spec.flush_s,
        max_pending=spec.max_pending,
        quality=spec.quality,
        goal=spec.goal,
        feedback_token_env=spec.feedback_token_env,
    )


class ServingConfig(BaseModel):
    """Everything a ModelServer replica needs; travels as the deployment's user_config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app: str
    route_prefix: str
    variants: tuple[VariantConfig, ...]
    max_request_bytes: int
    max_batch_size: int
    batch_wait_timeout_s: float
    source: dict[str, str] = Field(
        default_factory=dict, description="Where this deployment came from, e.g. the Metaflow task pathspec."
    )
    registry_uri: str | None = Field(None, description="MLflow registry holding the variants' model versions.")
    capture: CaptureConfig | None = Field(None, description="Prediction capture and labels, if on.")
    rollout: RolloutState | None = Field(None, description="The rollout in progress, if any.")
    last_rollout: RolloutOutcome | None = Field(None, description="How the last rollout ended, if one did.")
    settings: AppSettings = Field(default_factory=AppSettings, description="Persisted control-plane settings.")

    @property
    def phase(self) -> RolloutPhase:
        return self.rollout.phase if self.rollout is not None else RolloutPhase.SETTLED

    def with_versions(self, versions: dict[str, str], registry_uri: str) -> ServingConfig:
        """The same config with each variant's registered model version (and release) filled in."""
        variants = tuple(
            v.model_copy(
                update={
                    "model_version": versions.get(v.name),
                    "release": f"v{versions[v.name].rsplit('/', 1)[-1]}" if v.name in versions else v.release,
                }
            )
            for v in self.variants
        )
        return self.model_copy(update={"variants": variants, "registry_uri": registry_uri})

    def with_variants(self, variants: list[VariantConfig] | tuple[VariantConfig, ...]) -> ServingConfig:
        return self.model_copy(update={"variants": tuple(variants)})

    @property
    def served(self) -> tuple[VariantConfig, ...]:
        """Variants that answer requests (not shadows), with traffic or not."""
        return tuple(v for v in self.variants if not v.shadow)

    def weights(self) -> dict[str, float]:
        """Traffic share by label (shadows and unweighted entries included at 0)."""
        return {v.label: v.weight for v in self.variants}


def variant_summary(variant: VariantConfig) -> dict[str, Any]:
    """The one plain form of a variant shown to users (status, deploy results, operator commands)."""
    return {
        "name": variant.name,
        "label": variant.label,
        "release": variant.release,
        "weight": variant.weight,
        "shadow": variant.shadow,
        "predictor": variant.predictor,
        "model_uri": variant.model.uri,
        "model_version": variant.model_version,
    }


def serving_config(
    spec: DeploymentSpec,
    models: dict[str, ModelRef],
    predictors: dict[str, str],
    source: dict[str, str] | None = None,
) -> ServingConfig:
    """Pair a spec's variants with their resolved model references and predictor names.

    Args:
        spec: the validated deployment spec.
        models: variant name -> model reference.
        predictors: variant name -> predictor name with ``auto`` already resolved.
        source: free-form provenance shown in the dashboard (flow, run, task pathspec).
    """
    variants = tuple(
        VariantConfig(
            name=v.name,
            weight=v.weight,
            predictor=predictors.get(v.name, v.predictor),
            predictor_config=v.predictor_config,
            model=models[v.name],
            shadow=v.shadow,
            release=content_release(models[v.name]),
            isolated={
                "num_replicas": v.num_replicas or spec.num_replicas,
                "num_cpus": spec.num_cpus if v.num_cpus is None else v.num_cpus,
                "num_gpus": spec.num_gpus if v.num_gpus is None else v.num_gpus,
            }
            if v.isolate
            else None,
        )
        for v in spec.variants
    )
    return ServingConfig(
        app=spec.app,
        route_prefix=spec.route,
        variants=variants,
        max_request_bytes=spec.max_request_bytes,
        max_batch_size=spec.max_batch_size,
        batch_wait_timeout_s=spec.batch_wait_timeout_s,
        source=dict(source or {}),
        capture=capture_config(spec.capture, models) if spec.capture is not None else None,
        settings=AppSettings(
            production_alias=spec.production_alias,
            canary_alias=spec.canary_alias,
            deploy_timeout_s=spec.deploy_timeout_s,
        ),
    )


def content_release(model: ModelRef) -> str:
    """A release name from the model's content, used when no registry numbers the versions."""
    return (model.sha256 or hashlib.sha256(model.uri.encode("utf-8")).hexdigest())[:8]


def variant_app_name(app: str, variant: VariantConfig) -> str:
    """The Serve app an isolated variant runs in: ``<app>--<variant>-<release>``."""
    return f"{app}{VARIANT_APP_SEPARATOR}{variant.deployment_name()}"


def variant_app_options(app: str, variant: VariantConfig) -> dict[str, Any]:
    """Deployment options of an isolated variant's VariantServer."""
    resources = variant.isolated or {}
    actor_options: dict[str, Any] = {"num_cpus": resources.get("num_cpus", 1.0)}
    if resources.get("num_gpus"):
        actor_options["num_gpus"] = resources["num_gpus"]
    return {
        "name": variant.deployment_name(),
        "max_surge_percent": 100,
        "num_replicas": int(resources.get("num_replicas", 1)),
        "ray_actor_options": actor_options,
        "user_config": {"app": app, "variant": variant.model_dump(mode="json")},
    }


def deployment_options(spec: DeploymentSpec, config: ServingConfig) -> dict[str, Any]:
    """Options of the ModelServer deployment, in the names ``Deployment.options`` takes."""
    actor_options: dict[str, Any] = {"num_cpus": spec.num_cpus}
    if spec.num_gpus:
        actor_options["num_gpus"] = spec.num_gpus
    if spec.memory:
        actor_options["memory"] = spec.memory
    if spec.accelerator_type:
        actor_options["accelerator_type"] = spec.accelerator_type
    if spec.resources:
        actor_options["resources"] = dict(spec.resources)
    options: dict[str, Any] = {
        "name": SERVER_DEPLOYMENT,
        # When replicas must restart (new code or resources), start the replacements first:
        # the old replicas serve until the new ones are up.
        "max_surge_percent": 100,
        "num_replicas": spec.num_replicas,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "ray_actor_options": actor_options,
        "user_config": config.model_dump(mode="json"),
    }
    if spec.autoscaling is not None:
        del options["num_replicas"]
        options["autoscaling_config"] = autoscaling_config(spec.autoscaling)
    if spec.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = spec.max_replicas_per_node
    if spec.placement is not None:
        options["placement_group_bundles"] = [dict(bundle) for bundle in spec.placement.bundles]
        options["placement_group_strategy"] = spec.placement.strategy
    return options


def autoscaling_config(autoscaling: AutoscalingSpec) -> dict[str, Any]:
    """Serve's autoscaling_config for the app's ModelServer: the app's settings, the policy that
    also counts the requests the front holds (``serving.autoscale``), and replicas that report
    their load twice per look-back window (Serve's default is every 10 s, whatever the window)."""
    from ray_deploy.serving.autoscale import POLICY_FUNCTION

    return {
        **autoscaling.model_dump(exclude_none=True),
        "metrics_interval_s": min(10.0, max(0.5, autoscaling.look_back_period_s / 2)),
        "policy": {"policy_function": POLICY_FUNCTION},
    }


def to_serve_config(spec: DeploymentSpec, config: ServingConfig) -> dict[str, Any]:
    """The app in Ray Serve's own config format (an entry of ``applications`` in ``serve deploy``)."""
    options = deployment_options(spec, config)
    return {
        "name": spec.app,
        "route_prefix": spec.route,
        "import_path": APP_BUILDER_IMPORT_PATH,
        "args": {},
        "deployments": [options],
    }
