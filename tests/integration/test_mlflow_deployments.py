"""The MLflow deployments target `ray-serve`, through MLflow's own CLI and Python client.

An XGBoost classifier (a bundled dataset) is logged twice in MLflow's xgboost flavor and registered
as versions 1 and 2 of a new model in the suite's registry. `mlflow deployments create` serves
version 1 with the built-in XGBoost predictor on two replicas; `predict` (CLI and client) answers
as the model does; `update` rolls version 2 out as a canary, then splits traffic between both
(`-C variants=...`); `ray-deploy lineage` walks from the app to the versions' MLflow runs;
`explain` and separate endpoints are refused naming why; `run-local`, `help` and `delete` work.
"""

import json
import os
import subprocess
import sys
import traceback
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

APP = "mlflow-target"


def mlflow_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    """``mlflow deployments ARGS``: MLflow's own command, run in this process (it finds the target
    through its entry point as the ``mlflow`` executable does; a process each would cost seconds)."""
    from click.testing import CliRunner
    from mlflow.cli import cli

    done = CliRunner().invoke(cli, ["deployments", *args], env=env, catch_exceptions=True)
    stderr = done.stderr + ("".join(traceback.format_exception(done.exception)) if done.exception else "")
    return subprocess.CompletedProcess(["mlflow", "deployments", *args], done.exit_code, done.stdout, stderr)


@pytest.fixture()
def xgboost_versions(tmp_path):
    """(registered model name, rows, {version: the logged model}) in the suite's registry."""
    import mlflow
    import xgboost
    from sklearn.datasets import load_breast_cancer

    from ray_deploy import Registry

    registry = Registry()
    name = f"xgb-{uuid.uuid4().hex[:8]}"
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    experiment = registry.client.create_experiment(name, artifact_location=(tmp_path / "mlartifacts").as_uri())
    models = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
        env.setenv("MLFLOW_REGISTRY_URI", registry.registry_uri)
        for version, trees in ((1, 3), (2, 12)):
            model = xgboost.XGBClassifier(n_estimators=trees, max_depth=2, n_jobs=1).fit(X, y)
            with mlflow.start_run(experiment_id=experiment):
                mlflow.xgboost.log_model(model, name="model", registered_model_name=name)
            models[version] = model
    return name, X.iloc[:40], models, registry


def test_mlflow_deployments_create_predict_update_and_delete(xgboost_versions, tmp_path, ray_head, http):
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    name, rows, models, registry = xgboost_versions
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.tracking_uri, "MLFLOW_REGISTRY_URI": registry.registry_uri}
    client = get_deploy_client("ray-serve")
    expected = {version: model.predict(rows).tolist() for version, model in models.items()}
    assert expected[1] != expected[2], "the two versions must answer differently to tell them apart"

    # The `mlflow` executable finds the target through its entry point; the other commands run
    # the same CLI in this process.
    exe = Path(sys.executable).with_name("mlflow")
    shown = subprocess.run(
        [str(exe), "deployments", "help", "-t", "ray-serve"], capture_output=True, text=True, timeout=120, env=env
    )
    assert shown.returncode == 0 and "models:/NAME@ALIAS" in shown.stdout, shown.stdout + shown.stderr

    created = mlflow_cli(
        "create", "-t", "ray-serve", "--name", APP, "-m", f"models:/{name}/1", "--flavor", "xgboost",
        "-C", "num_replicas=2", "-C", "num_cpus=0.25", env=env,
    )  # fmt: skip
    assert created.returncode == 0, (created.stdout + created.stderr)[-4000:]
    with pytest.raises(MlflowException, match="already exists"):
        client.create_deployment(APP, f"models:/{name}/1")

    deployment = client.get_deployment(APP)
    (variant,) = deployment["variants"]
    assert (variant["predictor"], variant["model_uri"]) == ("xgboost", f"models:/{name}/1")
    assert APP in {d["name"] for d in client.list_deployments()}
    assert client.get_endpoint(APP)["url"] == deployment["url"] == f"{ray_head.http_url}/{APP}"
    described = http.get(deployment["url"]).json()
    assert described["replica"] and len(client.list_endpoints()) >= 1
    replicas = subprocess.run(
        [str(Path(sys.executable).with_name("ray-deploy")), "status", APP, "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sum(json.loads(replicas.stdout)[0]["replicas"]["ModelServer"].values()) == 2

    # predict: the Python client with a DataFrame, the CLI with a JSON file.
    assert client.predict(APP, rows)["predictions"] == expected[1]
    (tmp_path / "in.json").write_text(rows.to_json())  # the CLI reads it with pandas.read_json
    predicted = mlflow_cli(
        "predict", "-t", "ray-serve", "--name", APP, "--input-path", str(tmp_path / "in.json"),
        "--output-path", str(tmp_path / "out.json"), env=env,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert json.loads((tmp_path / "out.json").read_text())["predictions"] == expected[1]
    with pytest.raises(MlflowException, match="answered 400"):
        client.predict(APP, {"instances": [[1.0, 2.0]]})  # too few features: the caller's mistake
    with pytest.raises(MlflowException, match="explain is not supported"):
        client.explain(APP, rows)
    with pytest.raises(MlflowException, match="no separate endpoints"):
        client.create_endpoint("other")

    # update: version 2 as a canary, promoted by its gates; then an A/B split of both versions.
    rollout = json.dumps({"strategy": "canary", "steps": [50, 100], "interval_s": 1})
    updated = client.update_deployment(APP, model_uri=f"models:/{name}/2", config={"rollout": rollout})
    assert updated["rollout"]["state"] == "promoted", updated["rollout"]
    (variant,) = client.get_deployment(APP)["variants"]
    assert (variant["model_uri"], variant["predictor"]) == (f"models:/{name}/2", "xgboost")  # the flavor kept
    assert client.predict(APP, rows)["predictions"] == expected[2]
    split = {
        "v1": {"model": f"models:/{name}/1", "predictor": "xgboost", "weight": 50},
        "v2": {"model": f"models:/{name}/2", "predictor": "xgboost", "weight": 50},
    }
    updated = mlflow_cli("update", "-t", "ray-serve", "--name", APP, "-C", f"variants={json.dumps(split)}", env=env)
    assert updated.returncode == 0, updated.stderr[-3000:]
    answers = {}
    for key in range(40):
        answer = httpx.post(
            f"{deployment['url']}/invocations",
            json={"dataframe_split": rows.to_dict(orient="split")},
            headers={"X-Request-Key": f"caller-{key}"},
            timeout=30,
        ).json()
        answers[answer["variant"]] = answer["predictions"]
    assert answers == {"v1": expected[1], "v2": expected[2]}

    # Lineage: the app's registered model records each deployed version, and points back to the
    # source version and its MLflow run.
    versions = {v["name"]: v["model_version"] for v in client.get_deployment(APP)["variants"]}
    for label, source in (("v1", 1), ("v2", 2)):
        tags = registry.version_tags(registry.resolve(versions[label]))
        assert tags["mlflow.source_model_version"] == f"{name}/{source}" and tags["ray.app"] == APP, tags
    traced = subprocess.run(
        [str(Path(sys.executable).with_name("ray-deploy")), "lineage", APP, "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert traced.returncode == 0, traced.stdout + traced.stderr
    for chain in json.loads(traced.stdout).values():
        (run_hop,) = [hop for hop in chain if hop["kind"] == "mlflow_run"]
        assert run_hop["ok"] and f"deployed from {name}/" in run_hop["detail"], chain

    local = mlflow_cli("run-local", "-t", "ray-serve", "--name", f"{APP}-local", "-m", f"models:/{name}/1", env=env)
    assert local.returncode == 0 and f"/{APP}-local" in local.stdout, local.stdout + local.stderr
    deleted = mlflow_cli("delete", "-t", "ray-serve", "--name", APP, env=env)
    assert deleted.returncode == 0, deleted.stderr[-2000:]
    client.delete_deployment(f"{APP}-local")
    assert not {APP, f"{APP}-local"} & {d["name"] for d in client.list_deployments()}
    with pytest.raises(MlflowException, match=f"no deployment '{APP}'"):
        client.get_deployment(APP)
