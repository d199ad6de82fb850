"""Typed, validated deployment specs: the one source of truth for every option.

The ``@ray_serve`` decorator, the ``ray-deploy`` CLI and the engine all build a
``DeploymentSpec``; an invalid value fails here with a ``SpecError`` naming the option,
what came in and what is allowed. This module imports nothing else from the package.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_deploy.errors import SpecError

BUILTIN_PREDICTORS = ("auto", "xgboost", "onnx", "python", "mlflow")
"""Predictor names that need no import path; anything else must be ``module:Class``."""

MLFLOW_URI_PREFIXES = ("models:/", "runs:/")
_APP_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_VARIANT_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REGISTERED_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


RESERVED_ROUTES = {
    "-": "'/-/' is Serve's own namespace (/-/routes, /-/healthz)",
    "v2": "'/v2' is reserved for the Open Inference Protocol (/v2/health/..., /v2/models/<app>/infer)",
}
"""First path segments no app may take, and why."""


def route_rule_broken(route: str) -> str | None:
    """Why ``route`` (a path starting with '/') cannot be an app's route, or None when it can."""
    if route == "/":
        return None
    segments = route[1:].split("/")
    if "" in segments:
        return "an empty path segment ('//'); write '/name' or '/name/sub'"
    if "." in segments or ".." in segments:
        return "'.' and '..' segments are not allowed (clients and proxies resolve them differently)"
    return RESERVED_ROUTES.get(segments[0])


def routes_overlap(one: str, other: str) -> bool:
    """Whether two app routes would shadow each other: equal, or one inside the other ('/seed' and
    '/seed/feedback': the outer app's own sub-routes, such as its feedback or health routes, would
    reach the inner app). '/' holds every route."""
    if one == other or "/" in (one, other):
        return True
    return other.startswith(one + "/") or one.startswith(other + "/")


def _parse_json_string(value: Any, field: str) -> Any:
    """Options given on the command line (``--with ray_serve:x=...``) may arrive as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{field} must be a JSON object, got text that is not JSON: {value!r} ({exc.msg})"
            ) from None
    return value


def one_of(value: str, field: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else a ValueError naming the field and the choices."""
    if value not in allowed:
        raise ValueError(f"{field} {value!r} is not one of {', '.join(allowed)}")
    return value


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class VariantSpec(_Spec):
    """One model served behind an app's route, with its share of the traffic."""

    name: str = Field("default", description="Variant name: letters, digits, '-' or '_'; shown in responses.")
    model: str = Field(
        "model",
        description="Name of the step artifact that holds the model, or an MLflow URI (models:/..., runs:/...).",
    )
    predictor: str = Field(
        "auto",
        description="Built-in predictor (auto, xgboost, onnx, python, mlflow) or a user class as 'module:Class'.",
    )
    predictor_config: dict[str, Any] = Field(
        default_factory=dict, description="JSON-serializable dict passed to the predictor's __init__ as config."
    )
    weight: float = Field(100.0, ge=0, le=100, description="Percent of requests routed to this variant.")
    shadow: bool = Field(
        False,
        description="Receive a copy of live requests; answers are compared with the served ones, never returned.",
    )
    derived_from: str | None = Field(
        None, description="Variant this one was derived from (e.g. its ONNX export); it must pass the parity gate."
    )
    isolate: bool | None = Field(
        None,
        description="Serve this variant from its own Serve app '<app>--<variant>-<release>' (own replicas and "
        "resources, its own line in the Ray dashboard; one extra hop per request). Default: only when it sets "
        "its own num_replicas/num_cpus/num_gpus.",
    )
    num_replicas: int | None = Field(None, ge=1, le=256, description="Isolated variant: its replicas (default: app's).")
    num_cpus: float | None = Field(
        None, ge=0, le=512, description="Isolated variant: CPUs per replica (default: app's)."
    )
    num_gpus: float | None = Field(
        None, ge=0, le=64, description="Isolated variant: GPUs per replica (default: app's)."
    )

    @model_validator(mode="after")
    def _own_resources_mean_isolated(self) -> VariantSpec:
        own = [n for n in ("num_replicas", "num_cpus", "num_gpus") if getattr(self, n) is not None]
        if own and self.isolate is False:
            raise ValueError(
                f"variant {self.name!r}: {', '.join(own)} need a deployment of its own; drop them or set isolate true"
            )
        if self.isolate is None:
            object.__setattr__(self, "isolate", bool(own))
        return self

    @model_validator(mode="before")
    @classmethod
    def _shadow_takes_no_share(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("shadow") in (True, "true", "True", 1):
            weight = data.get("weight", 0)
            if weight not in (0, 0.0, "0"):
                raise ValueError(
                    f"variant {data.get('name', '?')!r}: a shadow variant takes no share of traffic "
                    f"(weight {weight}); drop weight or set it to 0"
                )
            return {**data, "weight": 0}
        return data

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, value: str) -> str:
        if not _VARIANT_NAME.match(value):
            raise ValueError(f"variant name {value!r} must be 1-63 letters, digits, '-' or '_'")
        return value

    @field_validator("model")
    @classmethod
    def _model_is_artifact_name(cls, value: str) -> str:
        if not (_IDENTIFIER.match(value) or value.startswith(MLFLOW_URI_PREFIXES)):
            raise ValueError(
                f"model {value!r} must name a step artifact (a Python identifier such as 'model') "
                "or be an MLflow model URI (models:/name/1, runs:/<run_id>/model)"
            )
        return value

    @property
    def is_mlflow_uri(self) -> bool:
        return self.model.startswith(MLFLOW_URI_PREFIXES)

    @field_validator("predictor")
    @classmethod
    def _predictor_is_known(cls, value: str) -> str:
        if value in BUILTIN_PREDICTORS or _IMPORT_PATH.match(value):
            return value
        raise ValueError(
            f"predictor {value!r} is neither a built-in ({', '.join(BUILTIN_PREDICTORS)}) "
            "nor an import path of the form 'module:Class' (e.g. 'my_predictors:ScaledPredictor')"
        )

    @field_validator("predictor_config", mode="before")
    @classmethod
    def _predictor_config_from_text(cls, value: Any) -> Any:
        if value is None:
            return {}
        value = _parse_json_string(value, "predictor_config")
        try:
            json.dumps(value)
        except TypeError as exc:
            raise ValueError(f"predictor_config must be JSON-serializable ({exc})") from None
        return value

    @property
    def is_user_predictor(self) -> bool:
        return ":" in self.predictor


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementSpec(_Spec):
    """A placement group per replica: the replica runs in bundle 0, the rest is reserved beside it."""

    bundles: tuple[dict[str, float], ...] = Field(
        min_length=1,
        description='Resource bundles, e.g. [{"CPU": 1, "GPU": 1}, {"CPU": 2}]; bundle 0 holds the replica.',
    )
    strategy: str = Field("PACK", description="PACK, SPREAD, STRICT_PACK or STRICT_SPREAD.")

    @field_validator("strategy")
    @classmethod
    def _strategy_known(cls, value: str) -> str:
        return one_of(value, "strategy", PLACEMENT_STRATEGIES)

    @field_validator("bundles")
    @classmethod
    def _bundles_are_resources(cls, value: tuple[dict[str, float], ...]) -> tuple[dict[str, float], ...]:
        for index, bundle in enumerate(value):
            if not bundle or any(amount < 0 for amount in bundle.values()) or not any(bundle.values()):
                raise ValueError(f"bundle {index} must name at least one positive resource, e.g. {{'CPU': 1}}")
        return value


class AutoscalingSpec(_Spec):
    """Replica autoscaling by ongoing requests per replica (Serve's autoscaler)."""

    min_replicas: int = Field(1, ge=0, le=256, description="Fewest replicas (0 scales to zero when idle).")
    max_replicas: int = Field(4, ge=1, le=1024, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, le=1024, description="Replicas at start (default: min).")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(10.0, ge=0, description="Load must stay high this long before adding replicas.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Load must stay low this long before removing replicas.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window the request load is averaged over.")

    @model_validator(mode="after")
    def _bounds_in_order(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas {initial} must be between min_replicas {self.min_replicas} "
                f"and max_replicas {self.max_replicas}"
            )
        return self


QUALITY_METRICS = {"accuracy": "max", "mae": "min"}
"""Built-in quality metrics for delayed labels, and whether a higher ("max") or lower ("min") figure is better."""
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class CaptureSpec(_Spec):
    """Prediction capture and delayed labels (``capture={"sample": 0.1}``).

    A sampled copy of each request (its rows, the predictions, request id and key, variant,
    release, model version and latency) is written off the request path, in batches, as Parquet
    under the flow's Metaflow datastore root (``<root>/ray_deploy_captures``) or ``path``. Labels
    posted to ``<route>/feedback`` are stored beside the captures and give each variant a quality
    figure (``quality``) that ``ray-deploy status``, the registry and the rollout gates read.
    """

    sample: float = Field(0.1, gt=0, le=1, description="Fraction of requests captured, in (0, 1].")
    path: str | None = Field(
        None,
        description="Where captures go: an absolute local directory or an s3:// URL "
        "(default: <Metaflow datastore root>/ray_deploy_captures, else $RAY_DEPLOY_HOME/captures).",
    )
    flush_s: float = Field(5.0, ge=0.1, le=3600, description="Seconds between two writes of a replica's captures.")
    max_pending: int = Field(
        10_000,
        ge=10,
        le=10_000_000,
        description="Captured requests a replica holds while its writer is busy; beyond it they are dropped "
        "and counted (capture_dropped), and serving goes on.",
    )
    quality: str = Field(
        "accuracy",
        description="How a label scores its request: 'accuracy' (classifiers), 'mae' (regressors), or "
        "'module:function' taking (prediction, label) and returning a float.",
    )
    quality_goal: str | None = Field(
        None, description="'max' or 'min': whether a higher quality figure is better (default: the metric's own)."
    )
    feedback_token_env: str | None = Field(
        None,
        description="Name of an environment variable on the replicas holding a bearer token that feedback "
        "requests must send (Authorization: Bearer ...); the value itself is never written anywhere.",
    )

    @field_validator("path")
    @classmethod
    def _path_is_a_root(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("s3://") and len(value) > 5) and not value.startswith("/"):
            raise ValueError(f"path {value!r} must be an absolute directory ('/data/captures') or an s3:// URL")
        return value.rstrip("/") if value else value

    @field_validator("quality")
    @classmethod
    def _quality_known(cls, value: str) -> str:
        if value not in QUALITY_METRICS and not _IMPORT_PATH.match(value):
            raise ValueError(
                f"quality {value!r} must be {' or '.join(QUALITY_METRICS)}, or 'module:function' "
                "taking (prediction, label) and returning a float"
            )
        return value

    @field_validator("quality_goal")
    @classmethod
    def _goal_known(cls, value: str | None) -> str | None:
        return value if value is None else one_of(value, "quality_goal", ("max", "min"))

    @field_validator("feedback_token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(
                f"feedback_token_env {value!r} must be the NAME of an environment variable (letters, digits, '_'), "
                "not the token itself"
            )
        return value

    @property
    def goal(self) -> str:
        """'max' when a higher quality figure is better, else 'min'."""
        return self.quality_goal or QUALITY_METRICS.get(self.quality, "max")


ROLLOUT_STRATEGIES = ("immediate", "canary", "blue_green")


class RolloutSpec(_Spec):
    """How a new release of an app takes over from the one serving (ignored on a first deploy).

    Every strategy loads the new release beside the old one on the live replicas before it gets
    any traffic, so no request is dropped. ``immediate`` then moves all traffic at once;
    ``blue_green`` moves all traffic, watches for ``interval_s`` with the old release still
    loaded, and rolls back if a gate fails; ``canary`` moves traffic in ``steps`` (percent of
    requests to the new release), waiting ``interval_s`` and checking the gates after each.
    Steps that stop short of 100 leave the canary holding for ``ray-deploy promote`` or
    ``rollback``. The steps and gates are driven by a rollout controller on the cluster (a
    detached Ray actor per app), so a rollout outlives the process that started it.
    """

    strategy: str = Field("immediate", description="immediate, canary or blue_green.")
    steps: tuple[float, ...] = Field(
        (10.0, 50.0, 100.0), description="Canary: percent of traffic on the new release at each step, increasing."
    )
    interval_s: float = Field(30.0, ge=0, le=24 * 3600, description="Seconds each step runs before its gate.")
    max_error_rate: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Gate: the new release's server-error rate may exceed the old release's by at most this.",
    )
    max_p99_ms: float | None = Field(None, gt=0, description="Gate: the new release's p99 latency bound, in ms.")
    max_p99_ratio: float | None = Field(
        None, gt=0, description="Gate: the new release's p99 may be at most this multiple of the old one's."
    )
    min_requests: int = Field(
        0, ge=0, description="Gate: requests the new release must answer in a step before it can pass."
    )
    max_disagreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Gate: at most this fraction of the new release's requests may get another answer from the "
        "old release (the replicas ask the old release too, off the request path).",
    )
    max_prediction_shift: float | None = Field(
        None,
        gt=0,
        description="Gate: the new release's mean prediction may differ from the old release's by at most this "
        "many of the old release's standard deviations.",
    )
    min_quality_delta: float | None = Field(
        None,
        description="Gate (needs capture and labels): the new release's quality figure minus the old one's, "
        "counted in the metric's better direction, must be at least this (e.g. -0.02: at most 2 points worse).",
    )
    min_labels: int = Field(
        20, ge=1, description="Quality gate: labels each release needs before their quality figures are compared."
    )
    wait: bool = Field(
        True,
        description="Whether the deploy waits for the rollout's outcome; False: it ends once the rollout "
        "controller on the cluster has taken over (the outcome is recorded in the registry).",
    )

    @field_validator("strategy")
    @classmethod
    def _strategy_known(cls, value: str) -> str:
        return one_of(value, "strategy", ROLLOUT_STRATEGIES)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps_from_text(cls, value: Any) -> Any:
        return _parse_json_string(value, "steps") if isinstance(value, str) else value

    @field_validator("steps")
    @classmethod
    def _steps_increase(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("steps must list at least one percentage, e.g. [10, 50, 100]")
        if any(not 0 < step <= 100 for step in value) or list(value) != sorted(set(value)):
            raise ValueError(f"steps must be increasing percentages in (0, 100], e.g. [10, 50, 100]; got {list(value)}")
        return value

    @property
    def plan(self) -> tuple[float, ...]:
        """The traffic steps this strategy takes (percent on the new release)."""
        return self.steps if self.strategy == "canary" else (100.0,)

    @property
    def gated(self) -> bool:
        return self.strategy != "immediate"


class DeploymentSpec(_Spec):
    """Everything needed to serve one Ray Serve application."""

    app: str = Field(description="Ray Serve application name: lowercase letters, digits, '-' or '_'.")
    route_prefix: str | None = Field(None, description="HTTP route of the app; defaults to '/<app>'.")
    variants: tuple[VariantSpec, ...] = Field(min_length=1, description="Models served behind the route.")
    num_replicas: int = Field(1, ge=1, le=256, description="Replicas of the serving deployment.")
    num_cpus: float = Field(1.0, ge=0, le=512, description="CPUs reserved by each replica (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs reserved by each replica (fractions allowed).")
    memory: int | None = Field(None, ge=1, description="Memory reserved by each replica, in bytes.")
    accelerator_type: str | None = Field(
        None, description="Node accelerator each replica needs, e.g. 'A10G' or 'T4' (Ray's accelerator_type)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica reserves, e.g. {'inference_node': 1}."
    )
    max_replicas_per_node: int | None = Field(
        None, ge=1, le=100, description="Most replicas of the app on one node (not with placement)."
    )
    placement: PlacementSpec | None = Field(
        None,
        description="A placement group per replica: {'bundles': [{'CPU': 1, 'GPU': 1}, ...], 'strategy': 'PACK'}; "
        "the replica's own num_cpus/num_gpus/memory/resources must fit in bundle 0.",
    )
    autoscaling: AutoscalingSpec | None = Field(
        None,
        description="Replica autoscaling instead of num_replicas: {'min_replicas': 1, 'max_replicas': 4, "
        "'target_ongoing_requests': 2, 'upscale_delay_s': 10, 'downscale_delay_s': 60, 'initial_replicas': None}.",
    )
    max_ongoing_requests: int = Field(32, ge=1, le=10_000, description="Requests one replica handles at once.")
    max_batch_size: int = Field(
        1, ge=1, le=4096, description="Requests merged into one predict call; 1 turns server-side batching off."
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, le=10, description="Longest a request waits for a batch to fill, in seconds."
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request body accepted; larger ones get 413."
    )
    address: str | None = Field(
        None,
        description="Ray cluster address (host:port, ray://host:10001 or auto); default: RAY_ADDRESS or a local head.",
    )
    deploy_timeout_s: float = Field(
        300.0, gt=0, le=24 * 3600, description="Longest wait for replicas to become healthy before the deploy fails."
    )
    lineage: bool = Field(True, description="Record every deployed variant as an MLflow registered model version.")
    registered_model: str | None = Field(
        None, description="MLflow registered model name for the deployed versions; defaults to the app name."
    )
    data: tuple[str, ...] = Field(
        (),
        description="Input data the model came from: step artifact names, or pathspecs Flow/run/step/task/artifact.",
    )
    metrics: tuple[str, ...] = Field(
        (), description="Step artifacts holding the model's metrics (a number or a dict of numbers)."
    )
    parity_rows: str | None = Field(
        None,
        description="Held-out rows for the parity gate: an artifact, or a key inside one ('dataset.X_test'); "
        "default: generated rows.",
    )
    parity_rtol: float = Field(1e-5, ge=0, le=1, description="Relative tolerance of the parity gate.")
    parity_atol: float = Field(1e-6, ge=0, le=1, description="Absolute tolerance of the parity gate.")
    production_alias: str = Field("production", description="MLflow alias held by the version that serves all traffic.")
    canary_alias: str = Field("canary", description="MLflow alias held by a version that serves part of the traffic.")
    capture: CaptureSpec | None = Field(
        None,
        description="Capture a sample of requests and their predictions, and take delayed labels at "
        "<route>/feedback: {'sample': 0.1}; see CaptureSpec.",
    )
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec,
        description="How a new release replaces a serving one: {'strategy': 'canary', 'steps': [10, 50, 100], "
        "'interval_s': 30, 'max_error_rate': 0.01, 'max_p99_ms': None}; strategies immediate, canary, blue_green.",
    )

    @field_validator("app")
    @classmethod
    def _app_is_slug(cls, value: str) -> str:
        if not _APP_NAME.match(value):
            raise ValueError(
                f"app {value!r} must be 1-63 lowercase letters, digits, '-' or '_', starting with a letter or digit"
            )
        return value

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix_is_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or any(c in value for c in "{}?#* ") or (len(value) > 1 and value.endswith("/")):
            raise ValueError(
                f"route_prefix {value!r} must be a path such as '/cancer': starts with '/', no trailing '/'"
            )
        broken = route_rule_broken(value)
        if broken:
            raise ValueError(broken)
        return value

    @field_validator("data", "metrics", mode="before")
    @classmethod
    def _names_from_text(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str):
            value = _parse_json_string(value, info.field_name) if value.startswith("[") else [value]
        return value

    @field_validator("data")
    @classmethod
    def _data_are_artifacts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            parts = entry.split("/")
            if not (len(parts) == 1 and _IDENTIFIER.match(entry)) and not (len(parts) == 5 and all(parts)):
                raise ValueError(
                    f"data entry {entry!r} must be a step artifact name (e.g. 'dataset') "
                    "or an artifact pathspec Flow/run/step/task/artifact"
                )
        return value

    @field_validator("metrics")
    @classmethod
    def _metrics_are_artifacts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if not _IDENTIFIER.match(entry):
                raise ValueError(f"metrics entry {entry!r} must be a step artifact name such as 'scores'")
        return value

    @field_validator("registered_model")
    @classmethod
    def _registered_model_name(cls, value: str | None) -> str | None:
        if value is not None and not _REGISTERED_MODEL.match(value):
            raise ValueError(
                f"registered_model {value!r} must be 1-200 letters, digits, '.', '-' or '_' (no '/', ':' or spaces)"
            )
        return value

    @field_validator("production_alias", "canary_alias")
    @classmethod
    def _alias_name(cls, value: str, info: Any) -> str:
        if not _ALIAS.match(value) or value.lower() == "latest" or re.match(r"^v\d+$", value.lower()):
            raise ValueError(
                f"{info.field_name} {value!r} must be letters, digits, '-' or '_' and not 'latest' or v<number>"
            )
        return value

    @model_validator(mode="after")
    def _aliases_differ(self) -> DeploymentSpec:
        if self.production_alias == self.canary_alias:
            raise ValueError(
                f"production_alias and canary_alias are both {self.canary_alias!r}; give them different names"
            )
        return self

    @field_validator("placement", "autoscaling", "resources", mode="before")
    @classmethod
    def _groups_from_text(cls, value: Any, info: Any) -> Any:
        return _parse_json_string(value, info.field_name) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _default_route_is_free(self) -> DeploymentSpec:
        if self.route_prefix is None and self.app in RESERVED_ROUTES:
            raise ValueError(
                f"app {self.app!r}: its default route '/{self.app}' is taken: {RESERVED_ROUTES[self.app]}; "
                "set route_prefix (e.g. route_prefix='/my-model') or choose another app name"
            )
        return self

    @model_validator(mode="after")
    def _replicas_fit(self) -> DeploymentSpec:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError(
                f"num_replicas={self.num_replicas} and autoscaling both set the replica count; "
                "drop num_replicas (autoscaling has min_replicas/max_replicas/initial_replicas)"
            )
        if self.placement is None:
            return self
        if self.max_replicas_per_node is not None:
            raise ValueError(
                "max_replicas_per_node and placement cannot be combined (Serve places each replica's bundles itself)"
            )
        bundle = self.placement.bundles[0]
        needs = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        if self.memory:
            needs["memory"] = float(self.memory)
        short = [
            f"{name} {amount:g} > {bundle.get(name, 0):g}"
            for name, amount in needs.items()
            if amount > bundle.get(name, 0)
        ]
        if short:
            raise ValueError(
                f"placement.bundles[0] must hold the replica itself ({', '.join(short)}); "
                f"raise bundle 0 or lower num_cpus/num_gpus/memory/resources"
            )
        return self

    @field_validator("rollout", mode="before")
    @classmethod
    def _rollout_from_text(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str) and value in ROLLOUT_STRATEGIES:
            return {"strategy": value}
        return _parse_json_string(value, "rollout")

    @field_validator("capture", mode="before")
    @classmethod
    def _capture_from_text(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            return None
        return _parse_json_string(value, "capture")

    @model_validator(mode="after")
    def _quality_gate_has_labels(self) -> DeploymentSpec:
        if self.rollout.min_quality_delta is not None and self.capture is None:
            raise ValueError(
                "rollout.min_quality_delta needs labels: deploy with capture={'sample': ...} and post labels "
                "to the app's /feedback route"
            )
        return self

    @field_validator("variants", mode="before")
    @classmethod
    def _variants_from_text(cls, value: Any) -> Any:
        value = _parse_json_string(value, "variants")
        if isinstance(value, dict):
            # {"xgb": {...}, "onnx": {...}}: the key is the variant name.
            return [dict(options, name=name) for name, options in value.items()]
        return value

    @model_validator(mode="after")
    def _variant_names_unique(self) -> DeploymentSpec:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variants: names must be unique, {', '.join(duplicates)} appear more than once")
        return self

    @model_validator(mode="after")
    def _derived_from_names_a_variant(self) -> DeploymentSpec:
        names = {v.name for v in self.variants}
        for variant in self.variants:
            if variant.derived_from is not None and (
                variant.derived_from not in names or variant.derived_from == variant.name
            ):
                raise ValueError(
                    f"variants.{variant.name}.derived_from: {variant.derived_from!r} is not another variant "
                    f"of this app (variants: {', '.join(sorted(names))})"
                )
        return self

    @field_validator("parity_rows")
    @classmethod
    def _parity_rows_path(cls, value: str | None) -> str | None:
        if value is not None and not all(_IDENTIFIER.match(part) for part in value.split(".")):
            raise ValueError(
                f"parity_rows {value!r} must name an artifact, optionally with keys: 'X_test' or 'dataset.X_test'"
            )
        return value

    @model_validator(mode="after")
    def _weights_sum_to_100(self) -> DeploymentSpec:
        served = [v for v in self.variants if not v.shadow]
        if not served:
            raise ValueError("variants: every variant is a shadow; at least one must answer requests")
        total = sum(v.weight for v in served)
        if abs(total - 100.0) > 1e-6:
            shares = ", ".join(f"{v.name}={v.weight:g}" for v in served)
            raise ValueError(f"variants: weights sum to {total:g} ({shares}); make them add up to 100")
        return self

    @property
    def route(self) -> str:
        """The HTTP route this app answers on."""
        return self.route_prefix or f"/{self.app}"

    @property
    def model_name(self) -> str:
        """The MLflow registered model the deployed versions belong to."""
        return self.registered_model or self.app

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> DeploymentSpec:
        """Build a spec from flat options (the decorator's attributes or CLI flags).

        ``model``, ``predictor`` and ``predictor_config`` describe a single variant and are
        shorthand for ``variants=[{"name": "default", ...}]``.

        Raises:
            SpecError: naming each invalid option, what came in and what is allowed.

        Example:
            >>> DeploymentSpec.from_options({"app": "cancer", "model": "clf", "num_replicas": "2"}).num_replicas
            2
        """
        options = {k: v for k, v in options.items() if v is not None}
        single = {k: options.pop(k) for k in ("model", "predictor", "predictor_config") if k in options}
        shorthand = "variants" not in options
        if shorthand:
            options["variants"] = [single]
        elif single:
            raise SpecError(
                f"{', '.join(sorted(single))}: set these inside each entry of 'variants', not beside it "
                f"(got both variants and {', '.join(sorted(single))})"
            )
        # Errors inside the shorthand variant are reported under the option the user wrote.
        rename = {("variants", 0): ()} if shorthand else {}
        return build_spec(cls, options, rename)


def build_spec(model: type[BaseModel], options: dict[str, Any], rename: dict[tuple, tuple] | None = None) -> Any:
    """Validate ``options`` into ``model``, turning pydantic's errors into one ``SpecError``."""
    try:
        return model.model_validate(options)
    except ValidationError as exc:
        raise SpecError(describe_validation_error(exc, rename)) from None


def describe_validation_error(exc: ValidationError, rename: dict[tuple, tuple] | None = None) -> str:
    """One line per problem: the option's dotted name, what was wrong and the value given."""
    lines = []
    errors = exc.errors()
    locations = [tuple(e["loc"]) for e in errors]
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "too_short" and any(other[: len(loc)] == loc and other != loc for other in locations):
            continue  # the items themselves were invalid; their errors say why
        for prefix, replacement in (rename or {}).items():
            if loc[: len(prefix)] == prefix:
                loc = replacement + loc[len(prefix) :]
        location = ".".join(str(part) for part in loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(f"{location}: unknown option (got {error['input']!r})")
            continue
        given = error.get("input")
        shown = "" if isinstance(given, dict) or location == "" else f" (got {given!r})"
        lines.append(f"{location + ': ' if location else ''}{message}{shown}")
    return "\n".join(lines)


def option_defaults() -> dict[str, Any]:
    """The decorator's option list with defaults, derived from the spec's fields."""
    defaults: dict[str, Any] = {}
    for name, field in DeploymentSpec.model_fields.items():
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = None  # a nested option group: unset means the group's own defaults
        defaults[name] = list(default) if isinstance(default, tuple) else default
        if name == "app":
            # The single-variant shorthand reads best right after the app name.
            for short in ("model", "predictor", "predictor_config"):
                default = VariantSpec.model_fields[short].get_default(call_default_factory=True)
                defaults[short] = default if default != {} else None
    return defaults
