"""The MLflow deployments target ``ray-serve``: any MLflow model on the ray-deploy engine.

    mlflow deployments create -t ray-serve --name cancer -m models:/cancer@production -C num_replicas=2
    mlflow deployments update -t ray-serve --name cancer -m models:/cancer/4 -C rollout='{"strategy": "canary"}'
    mlflow deployments predict -t ray-serve --name cancer --input-path rows.json

or from Python, ``mlflow.deployments.get_deploy_client("ray-serve")``. A deployment is a ray-deploy
app: the model is loaded by reference on the replicas and checked by hash, served on the fast data
path with the MLflow scoring protocol, and every ``-C`` option of ``@ray_serve`` applies (A/B
``variants``, canary ``rollout``, resources, autoscaling). Each deployed model is recorded as a
version of the registered model named after the app (``registered_model=`` to change it), whose
MLflow run is the source version's run and whose tags lead back to the source version, and on to
the Metaflow run when that version was deployed by ``@ray_serve``.

MLflow loads this module through the ``mlflow.deployments`` entry point of the package.
"""

from __future__ import annotations

import json
from typing import Any

from mlflow.deployments import BaseDeploymentClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST

from ray_deploy.errors import ClusterUnreachable, DeployError, RayDeployError

TARGET = "ray-serve"

FLAVOR_PREDICTORS = {
    None: "mlflow",
    "python_function": "mlflow",
    "pyfunc": "mlflow",
    "xgboost": "xgboost",
    "onnx": "onnx",
}
"""``--flavor`` -> the built-in predictor that serves it (pyfunc unless told otherwise)."""
PREDICTOR_FLAVORS = {"mlflow": "python_function", "xgboost": "xgboost", "onnx": "onnx"}


def target_help() -> str:
    return f"""Target {TARGET!r}: MLflow models served as ray-deploy apps on a Ray cluster (Ray Serve).

Target URI: '{TARGET}' (RAY_ADDRESS, else a persistent local Ray head started on first use) or
'{TARGET}:/<address>' (e.g. '{TARGET}:/10.0.0.5:6379', '{TARGET}:/ray://head:10001').

Deployment name: the app's name (its URL is http://<serve host>:<port>/<name>).
Model URI: models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH.
Flavor: python_function (default; the pyfunc), xgboost or onnx (served by the built-in predictors).
Config (-C key=value), the options of @ray_serve, e.g.:
  num_replicas=2  num_cpus=0.5  num_gpus=1  autoscaling='{{"min_replicas": 1, "max_replicas": 4}}'
  variants='{{"a": {{"model": "models:/m/1", "weight": 90}}, "b": {{"model": "models:/m/2", "weight": 10}}}}'
  rollout='{{"strategy": "canary", "steps": [10, 50, 100], "interval_s": 30}}'  (on update)
  registered_model=NAME  production_alias=NAME  canary_alias=NAME  lineage=false
Predict: JSON in the MLflow scoring formats (dataframe_split, dataframe_records, instances,
inputs) or a DataFrame; answers {{"predictions": ...}}. Explain is not supported.
"""


def run_local(name: str, model_uri: str, flavor: str | None = None, config: dict | None = None) -> None:
    """Deploy on this machine's local Ray head (started if needed) and print where it answers.
    (MLflow calls it without the target, whatever its base module documents.)"""
    client = RayServeDeploymentClient(TARGET)
    found = client.get_deployment(name) if client._exists(name) else None
    deployed = (client.update_deployment if found else client.create_deployment)(name, model_uri, flavor, config)
    print(f"{name} serves {model_uri} at {deployed['url']} (POST {deployed['url']}/invocations)")


class RayServeDeploymentClient(BaseDeploymentClient):
    """``mlflow.deployments.get_deploy_client("ray-serve")``: deployments are ray-deploy apps."""

    def __init__(self, target_uri: str):
        super().__init__(target_uri)
        scheme, _, rest = target_uri.partition(":")
        if scheme != TARGET:
            raise MlflowException(f"target {target_uri!r}: expected '{TARGET}' or '{TARGET}:/<ray address>'")
        self.address = rest.lstrip("/") or None

    # Deployments: one per app.

    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        _no_endpoint(endpoint)
        if self._exists(name):
            raise MlflowException(
                f"deployment {name!r} already exists on {self._where()}; use update_deployment",
                RESOURCE_ALREADY_EXISTS,
            )
        return self._deploy(name, model_uri, flavor, config or {})

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        _no_endpoint(endpoint)
        current = self.get_deployment(name)
        config = dict(config or {})
        if "variants" not in config:
            if model_uri is None:
                served = [v for v in current["variants"] if not v.get("shadow")]
                model_uri = max(served, key=lambda v: v["weight"])["model_uri"]
            if flavor is None and "predictor" not in config:
                flavor = current["flavor"]  # an update keeps the flavor it is served in
        return self._deploy(name, model_uri, flavor, config)

    def delete_deployment(self, name, config=None, endpoint=None):
        from ray_deploy.control.status import delete_app

        _no_endpoint(endpoint)
        try:
            delete_app(name, address=self.address)
        except RayDeployError as exc:
            raise MlflowException(f"deleting deployment {name!r}: {exc}") from None

    def list_deployments(self, endpoint=None):
        _no_endpoint(endpoint)
        try:
            return [_deployment(row) for row in self._status()]
        except ClusterUnreachable:
            return []  # no cluster answers: nothing is deployed

    def get_deployment(self, name, endpoint=None):
        _no_endpoint(endpoint)
        try:
            (row,) = self._status(name)
        except (DeployError, ClusterUnreachable):
            raise MlflowException(f"no deployment {name!r} on {self._where()}", RESOURCE_DOES_NOT_EXIST) from None
        except RayDeployError as exc:
            raise MlflowException(f"{TARGET}: {exc}") from None
        return _deployment(row)

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        import httpx
        from mlflow.deployments import PredictionsResponse

        name = deployment_name or endpoint
        if not name:
            raise MlflowException("predict: name the deployment", INVALID_PARAMETER_VALUE)
        url = self.get_deployment(name)["url"]
        body = _scoring_body(inputs)
        try:
            answer = httpx.post(
                f"{url}/invocations", content=body, headers={"Content-Type": "application/json"}, timeout=60
            )
        except httpx.HTTPError as exc:
            raise MlflowException(f"deployment {name!r} did not answer at {url}: {exc}") from None
        if answer.status_code != 200:
            try:
                message = answer.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = answer.text[:2000]
            code = INVALID_PARAMETER_VALUE if 400 <= answer.status_code < 500 else None
            raise MlflowException(f"deployment {name!r} answered {answer.status_code}: {message}", *[code] * bool(code))
        return PredictionsResponse.from_json(answer.text)

    def explain(self, deployment_name=None, df=None, endpoint=None):
        raise MlflowException(
            f"explain is not supported by the {TARGET!r} target: a deployment answers predictions only "
            "(POST <url>/invocations); compute explanations beside the model, e.g. in a pyfunc's predict",
            INVALID_PARAMETER_VALUE,
        )

    # Endpoints: every app is its own endpoint (its URL); they come and go with deployments.

    def list_endpoints(self):
        return self.list_deployments()

    def get_endpoint(self, endpoint):
        return self.get_deployment(endpoint)

    def create_endpoint(self, name, config=None):
        raise MlflowException(_ENDPOINTS_ARE_DEPLOYMENTS, INVALID_PARAMETER_VALUE)

    def update_endpoint(self, endpoint, config=None):
        raise MlflowException(_ENDPOINTS_ARE_DEPLOYMENTS, INVALID_PARAMETER_VALUE)

    def delete_endpoint(self, endpoint):
        raise MlflowException(_ENDPOINTS_ARE_DEPLOYMENTS, INVALID_PARAMETER_VALUE)

    # Helpers.

    def _deploy(self, name: str, model_uri: str | None, flavor: str | None, config: dict[str, Any]) -> dict:
        from ray_deploy.control.deploy import deploy
        from ray_deploy.models.artifacts import ModelRef
        from ray_deploy.spec import DeploymentSpec

        if flavor not in FLAVOR_PREDICTORS:
            raise MlflowException(
                f"flavor {flavor!r}: the {TARGET!r} target serves {', '.join(f for f in FLAVOR_PREDICTORS if f)}",
                INVALID_PARAMETER_VALUE,
            )
        options: dict[str, Any] = {"app": name, **config}
        if "variants" not in config:
            options["model"] = model_uri
            options.setdefault("predictor", FLAVOR_PREDICTORS[flavor])
        options.setdefault("address", self.address)
        try:
            spec = DeploymentSpec.from_options({k: v for k, v in options.items() if v is not None})
            for variant in spec.variants:
                if not variant.is_mlflow_uri:
                    raise RayDeployError(
                        f"model {variant.model!r}: the {TARGET!r} target deploys MLflow models "
                        "(models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH)"
                    )
            models = {v.name: ModelRef(kind="mlflow", uri=v.model) for v in spec.variants}
            predictors = {v.name: "mlflow" if v.predictor == "auto" else v.predictor for v in spec.variants}
            result = deploy(spec, models, predictors, source={"client": "mlflow deployments"}, record=spec.lineage)
        except RayDeployError as exc:
            raise MlflowException(f"{getattr(exc, 'headline', 'ray-deploy')}: {exc}", INVALID_PARAMETER_VALUE) from None
        return {**self.get_deployment(name), "rollout": result.rollout}

    def _status(self, name: str | None = None) -> list[dict[str, Any]]:
        """Rows of ``ray-deploy status``; DeployError if ``name`` is not deployed, ClusterUnreachable
        if no cluster answers (no local head yet: nothing is deployed)."""
        from ray_deploy.control.status import app_status

        return app_status(name, address=self.address)

    def _exists(self, name: str) -> bool:
        try:
            self._status(name)
        except (DeployError, ClusterUnreachable):
            return False
        return True

    def _where(self) -> str:
        return self.address or "the local Ray head"


_ENDPOINTS_ARE_DEPLOYMENTS = (
    f"the {TARGET!r} target has no separate endpoints: every deployment is its own endpoint (its URL); "
    "create, update and delete deployments instead"
)


def _no_endpoint(endpoint: str | None) -> None:
    if endpoint:
        raise MlflowException(
            f"endpoint {endpoint!r}: the {TARGET!r} target has no separate endpoints; every deployment is its own",
            INVALID_PARAMETER_VALUE,
        )


def _deployment(row: dict[str, Any]) -> dict[str, Any]:
    """A deployment as MLflow shows it: name and flavor (of the variant with the largest share),
    then what the app serves and where."""
    served = [v for v in row["variants"] if not v["shadow"]] or row["variants"]
    main = max(served, key=lambda v: v["weight"])
    return {
        "name": row["app"],
        "flavor": PREDICTOR_FLAVORS.get(main["predictor"], main["predictor"]),
        "url": row["url"],
        "status": row["status"],
        "phase": row["phase"],
        "variants": [
            {
                "name": v["name"],
                "label": v["label"],
                "weight": v["weight"],
                "shadow": v["shadow"],
                "model_uri": v["model_uri"],
                "model_version": v["model_version"],
                "predictor": v["predictor"],
            }
            for v in row["variants"]
        ],
    }


def _scoring_body(inputs: Any) -> str:
    """What ``predict`` sends: a DataFrame, array or list in MLflow's own JSON form; a dict (already
    a scoring body, e.g. ``{"dataframe_split": ...}``) or a JSON string as it is."""
    if isinstance(inputs, str):
        return inputs
    if isinstance(inputs, dict) and any(
        key in inputs for key in ("dataframe_split", "dataframe_records", "instances", "inputs")
    ):
        return json.dumps(inputs)
    from mlflow.utils.proto_json_utils import dump_input_data

    return dump_input_data(inputs)
