"""Building the Ray Serve application for a deployment spec.

The application is one deployment, ``ModelServer``, whose ``user_config`` is the whole
``ServingConfig``: model references (never the models), predictors, weights and where the
models came from. Keeping it in ``user_config`` means the Ray dashboard shows what each app
serves, and Serve's own config file format (``to_serve_config``) rebuilds the same app.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ray_deploy.artifacts import ModelRef
from ray_deploy.spec import DeploymentSpec

SERVER_DEPLOYMENT = "ModelServer"
APP_BUILDER_IMPORT_PATH = "ray_deploy.serving.app:app_builder"


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

    def with_versions(self, versions: dict[str, str], registry_uri: str) -> ServingConfig:
        """The same config with each variant's registered model version filled in."""
        variants = tuple(v.model_copy(update={"model_version": versions.get(v.name)}) for v in self.variants)
        return self.model_copy(update={"variants": variants, "registry_uri": registry_uri})


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
    )


def deployment_options(spec: DeploymentSpec, config: ServingConfig) -> dict[str, Any]:
    """Options of the ModelServer deployment, in the names ``Deployment.options`` takes."""
    actor_options: dict[str, Any] = {"num_cpus": spec.num_cpus}
    if spec.num_gpus:
        actor_options["num_gpus"] = spec.num_gpus
    return {
        "name": SERVER_DEPLOYMENT,
        "num_replicas": spec.num_replicas,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "ray_actor_options": actor_options,
        "user_config": config.model_dump(mode="json"),
    }


def build_application(spec: DeploymentSpec, config: ServingConfig) -> Any:
    """The bound Serve application (``serve.run`` takes it)."""
    from ray_deploy.serving.server import ModelServer

    return ModelServer.options(**deployment_options(spec, config)).bind()


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry point (``import_path``): the deployment options arrive from the config file."""
    from ray_deploy.serving.server import ModelServer

    return ModelServer.bind()


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
