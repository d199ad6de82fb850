"""Lineage from data to deployment, both ways, with real MLflow (SQLite and a server over HTTP)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ray_deploy import DeploymentSpec, LineageError, LineageSource, ModelRef, RegistryUnreachable, delete_app, deploy

pytestmark = pytest.mark.integration

IRIS_STEPS = """
c = Parameter("c", default=1.0)

@step
def start(self):
    from sklearn.datasets import load_iris
    X, y = load_iris(return_X_y=True)
    self.table = {"X": X, "y": y}
    self.next(self.train)

@step
def train(self):
    from sklearn.linear_model import LogisticRegression
    self.model = LogisticRegression(C=self.c, max_iter=1000).fit(self.table["X"], self.table["y"])
    self.accuracy = float(self.model.score(self.table["X"], self.table["y"]))
    self.next(self.deploy)
"""


def iris_flow(write_flow, directory: Path, app: str, extra_data: str = "") -> Path:
    options = (
        f'app={app!r}, num_cpus=0.25, data=["table"{extra_data}], metrics=["accuracy"], registered_model="iris-model"'
    )
    return write_flow(directory / "iris_flow.py", "IrisFlow", IRIS_STEPS, options)


def production_version(registry, name="cancer"):
    return registry.client.get_model_version_by_alias(name, "production")


def test_served_version_records_where_it_came_from(train_run, embedded_registry, ray_head):
    deploy_task = train_run["deploy"].task
    record = deploy_task.data.ray_serve
    (variant,) = record["variants"]
    version = production_version(embedded_registry)
    assert f"cancer/{version.version}" == variant["model_version"]
    tags = version.tags
    assert tags["metaflow.flow"] == "TrainFlow"
    assert tags["metaflow.run_id"] == train_run.id
    assert tags["metaflow.step"] == "deploy"
    assert tags["metaflow.task"] == deploy_task.pathspec
    assert tags["metaflow.artifact"] == "model"
    assert tags["metaflow.artifact_sha256"] == variant["sha256"]
    assert f"user:{tags['metaflow.user']}" in train_run.system_tags
    assert len(tags["metaflow.code_version"].removesuffix("-dirty")) == 40
    data = json.loads(tags["metaflow.data.dataset"])
    assert data["pathspec"] == f"TrainFlow/{train_run.id}/start/{train_run['start'].task.id}/dataset"
    assert tags["ray.app"] == "cancer"
    assert tags["ray.url"] == record["url"]
    assert tags["ray.address"] == ray_head.address
    assert tags["ray.dashboard_url"] == ray_head.dashboard_url
    assert tags["ray.traffic_weight"] == "100"
    assert tags["ray.deployed_at"].startswith("20")
    assert tags["ray_deploy.status"] == "serving"
    # The source is where the bytes live in the Metaflow datastore.
    assert version.source == tags["metaflow.artifact_uri"]
    assert version.source.startswith("file://") and version.source.endswith(variant["model_ref"]["blob_key"])
    # The MLflow run mirrors the Metaflow run: its parameters and the metrics the flow produced.
    run = embedded_registry.client.get_run(version.run_id)
    assert run.data.params == {"seed": "7", "test_size": "0.25"}
    assert run.data.metrics["best_metrics.auc"] == pytest.approx(deploy_task.data.best_metrics["auc"])
    assert run.data.tags["metaflow.run"] == f"TrainFlow/{train_run.id}"


PROOF_FROM_REGISTRY = textwrap.dedent(
    """
    import gzip, hashlib, json, sys
    from mlflow import MlflowClient
    from metaflow import DataArtifact, Task, namespace

    client = MlflowClient(sys.argv[1], sys.argv[1])
    if sys.argv[2].startswith("models:/"):
        name, alias = sys.argv[2][len("models:/"):].split("@")
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, number = sys.argv[2].split("/")
        version = client.get_model_version(name, number)
    tags = version.tags
    namespace(None)
    task = Task(tags["metaflow.task"])
    assert task.successful
    artifact = DataArtifact(tags["metaflow.artifact_pathspec"])
    assert artifact.sha == tags["metaflow.artifact_blob_key"]
    # The bytes Metaflow stores for the artifact, read straight from the datastore the tags name.
    path = tags["metaflow.artifact_uri"][len("file://"):]
    with open(path, "rb") as handle:
        stored = gzip.decompress(handle.read())
    assert hashlib.sha256(stored).hexdigest() == tags["metaflow.artifact_sha256"]
    model = artifact.data
    data = json.loads(tags["metaflow.data.dataset"])
    dataset = DataArtifact(data["pathspec"]).data
    predictions = model.predict(dataset["X_test"])
    print(json.dumps({"task": task.pathspec, "rows": len(predictions), "accuracy": float((predictions == dataset["y_test"]).mean())}))
    """
)


def _prove(registry_uri, reference, workdir):
    # Run from a neutral directory: `python -c` puts its working directory on sys.path.
    finished = subprocess.run(
        [sys.executable, "-c", PROOF_FROM_REGISTRY, registry_uri, reference],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ),
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def test_proof_from_the_registry_alias_in_a_fresh_process(train_run, embedded_registry, tmp_path):
    proved = _prove(embedded_registry.registry_uri, "models:/cancer@production", tmp_path)
    assert proved["task"] == train_run["deploy"].task.pathspec
    assert proved["rows"] == len(train_run["deploy"].task.data.dataset["X_test"])
    assert proved["accuracy"] > 0.9


def test_proof_from_the_serve_app_in_the_dashboard(train_run, embedded_registry, ray_head, http, tmp_path):
    from ray_deploy.cluster import auth_headers

    applications = http.get(f"{ray_head.dashboard_url}/api/serve/applications/", headers=auth_headers()).json()
    user_config = applications["applications"]["cancer"]["deployments"]["ModelServer"]["deployment_config"][
        "user_config"
    ]
    (variant,) = user_config["variants"]
    assert user_config["registry_uri"] == embedded_registry.registry_uri
    proved = _prove(user_config["registry_uri"], variant["model_version"], tmp_path)
    assert proved["task"] == train_run["deploy"].task.pathspec == user_config["source"]["task"]


def test_lineage_command_checks_every_hop(train_run, repo):
    flow_cli = subprocess.run(
        [sys.executable, str(repo / "flows" / "train_flow.py"), "--no-pylint", "ray-serve", "lineage"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=repo,
    )
    assert flow_cli.returncode == 0, flow_cli.stdout + flow_cli.stderr
    assert "cancer/default" in flow_cli.stdout and "BAD" not in flow_cli.stdout
    assert f"data: {train_run['start'].task.pathspec}/dataset" in flow_cli.stdout
    ray_deploy = Path(sys.executable).with_name("ray-deploy")
    for args in (["lineage", "cancer"], ["lineage", "--model", "cancer@production"]):
        shown = subprocess.run([str(ray_deploy), *args, "--json"], capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        (chain,) = json.loads(shown.stdout).values()
        kinds = [hop["kind"] for hop in chain if hop["kind"] != "traffic"]
        assert [hop["name"] for hop in chain if hop["kind"] == "traffic"][:1] == ["deployed"]
        assert kinds[0] == "app"
        assert kinds[-4:] == ["metaflow_task", "model_artifact", "training_task", "data"]
        assert all(hop["ok"] for hop in chain), chain


def test_card_shows_endpoint_versions_and_lineage(train_run, repo):
    # Metaflow 2.19 writes local cards under the datastore root when METAFLOW_DATASTORE_SYSROOT_LOCAL
    # is set, but its card client then looks under <root>/mf.cards; find the file where it was written.
    task = train_run["deploy"].task
    where = f"TrainFlow/runs/{train_run.id}/steps/deploy/tasks/{task.id}/cards"
    roots = [Path(os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"]), repo / ".metaflow"]
    (card,) = [path for root in roots for path in root.rglob("ray_serve-ray_serve-*.html") if where in str(path)]
    html = card.read_text()
    record = task.data.ray_serve
    assert record["url"] in html
    assert record["variants"][0]["model_version"] in html
    assert task.pathspec in html
    assert f"{train_run['start'].task.pathspec}/dataset" in html


def test_mlflow_server_over_http(tmp_path, run_flow, write_flow, mlflow_server, ray_head, http, train_run):
    from ray_deploy import Registry

    cancer_data = f"{train_run['start'].task.pathspec}/dataset"
    flow = iris_flow(write_flow, tmp_path, "iris-http", extra_data=f", {cancer_data!r}")
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    finished = run_flow(flow, env=env)
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-4000:]
    registry = Registry(mlflow_server, mlflow_server)
    version = registry.client.get_model_version_by_alias("iris-model", "production")
    tags = version.tags
    assert tags["ray.app"] == "iris-http"
    # The server refuses local paths as sources; the artifact's metaflow:// URI stands in.
    assert version.source == "metaflow://" + tags["metaflow.artifact_pathspec"]
    run = registry.client.get_run(version.run_id)
    assert run.data.params == {"c": "1.0"} and run.data.metrics["accuracy"] > 0.9
    assert json.loads(tags["metaflow.data.table"])["pathspec"].split("/")[2] == "start"
    # Data produced by another flow, named by pathspec, is recorded with its content address and hash.
    other = json.loads(tags["metaflow.data.dataset"])
    assert other["pathspec"] == cancer_data
    from metaflow import DataArtifact

    assert other["blob_key"] == DataArtifact(cancer_data).sha and len(other["sha256"]) == 64

    # A second run: a new version takes production; the lineage command checks it end to end.
    again = run_flow(flow, "--c", "0.5", env=env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    newer = registry.client.get_model_version_by_alias("iris-model", "production")
    assert int(newer.version) == int(version.version) + 1
    ray_deploy = Path(sys.executable).with_name("ray-deploy")
    traced = subprocess.run(
        [str(ray_deploy), "lineage", "--model", "iris-model@production", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert traced.returncode == 0, traced.stdout + traced.stderr

    # The older version's artifact is changed on disk: the lineage check reports it.
    blob = Path(registry.client.get_model_version("iris-model", version.version).tags["metaflow.artifact_uri"][7:])
    import gzip

    original = blob.read_bytes()
    blob.write_bytes(gzip.compress(b"not the model that was recorded"))
    try:
        traced = subprocess.run(
            [str(ray_deploy), "lineage", "--model", f"iris-model/{version.version}", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
    finally:
        # The datastore is content-addressed: other runs that train the same model share this blob.
        blob.write_bytes(original)
    assert traced.returncode == 1
    (chain,) = json.loads(traced.stdout).values()
    (bad,) = [hop for hop in chain if not hop["ok"] and hop["kind"] == "model_artifact"]
    assert "hash no longer matches" in bad["detail"] or "differs" in bad["detail"]


def test_unreachable_registry_fails_before_serve_is_touched(tmp_path, run_flow, write_flow, ray_head, http):
    flow = iris_flow(write_flow, tmp_path, "iris-unrecorded")
    finished = run_flow(flow, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"})
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert "MLflow registry unreachable" in output and "http://127.0.0.1:1" in output, output[-3000:]
    assert http.get(f"{ray_head.http_url}/iris-unrecorded").status_code == 404


def _current(train_run, user):
    deploy_task = train_run["deploy"].task
    (variant,) = deploy_task.data.ray_serve["variants"]
    source = LineageSource(flow="TrainFlow", run_id=train_run.id, step="deploy", task=deploy_task.pathspec, user=user)
    return ModelRef(**variant["model_ref"]), variant, source


# The tests below deploy the example flow's model to apps (and registered models) of their own:
# `cancer` belongs to the session, other modules read it. Three of them try a second deploy
# against one serving app (`engine-app`), and each leaves it serving what it served before.


@pytest.fixture(scope="module")
def engine_app(train_run, run_user):
    """The example flow's model deployed by the engine to an app of this module's, and the
    deployment's inputs: (result, spec, model reference, lineage source)."""
    ref, _, source = _current(train_run, run_user(train_run))
    spec = DeploymentSpec.from_options({"app": "engine-app", "num_cpus": 0.25, "deploy_timeout_s": 120})
    first = deploy(spec, {"default": ref}, {"default": "xgboost"}, lineage=source)
    yield first, spec, ref, source
    delete_app("engine-app")


def test_redeploying_the_same_task_reuses_its_version(engine_app, embedded_registry, http):
    """What a Metaflow retry of the deploy step does: same task, same model, one registry entry."""
    first, spec, ref, source = engine_app
    served_by = http.get(first.url).json()["replica"]["pid"]
    again = deploy(spec, {"default": ref}, {"default": "xgboost"}, lineage=source)
    assert str(again.versions["default"]) == str(first.versions["default"])
    versions = embedded_registry.client.search_model_versions(
        f"name = 'engine-app' and tags.`metaflow.task` = '{source.task}'"
    )
    assert [f"engine-app/{v.version}" for v in versions] == [str(first.versions["default"])]
    described = http.get(again.url).json()
    assert described["variants"][0]["model"] == ref.uri
    assert described["replica"]["pid"] == served_by, "the same release was deployed again instead of kept"


def test_registry_write_failing_after_serve_changed_puts_the_app_back(engine_app, http, monkeypatch):
    """Forced fault: the registry accepts the version, then fails the deployment write. Stopping a
    real server between those two calls cannot be timed from a test, so the recorder's writes are
    made to raise (the recorder's own error handling still runs)."""
    from ray_deploy.registry.history import TrafficRecorder

    first, spec, ref, source = engine_app
    before = http.get(first.url).json()["variants"]
    other_task = dataclasses.replace(source, task=source.task + "-b")

    def registry_down(*args, **kwargs):
        raise ConnectionError("registry went away")

    monkeypatch.setattr(TrafficRecorder, "_record", registry_down)
    with pytest.raises(LineageError, match="registry went away.*was put back to its previous version"):
        deploy(spec, {"default": ref}, {"default": "xgboost"}, lineage=other_task)
    assert http.get(first.url).json()["variants"] == before


def test_unreachable_registry_at_engine_level_changes_nothing(engine_app, http, monkeypatch):
    first, spec, ref, source = engine_app
    before = http.get(first.url).json()["variants"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    other_task = dataclasses.replace(source, task=source.task + "-c")
    with pytest.raises(RegistryUnreachable, match="http://127.0.0.1:1"):
        deploy(spec, {"default": ref}, {"default": "xgboost"}, lineage=other_task)
    assert http.get(first.url).json()["variants"] == before


def test_aliases_follow_the_traffic(train_run, run_user, embedded_registry, ray_head, http):
    """A 90/10 split: the main share holds production, the smaller share canary; all-in moves both."""
    ref, _, current = _current(train_run, run_user(train_run))
    source = dataclasses.replace(current, task="TrainFlow/x/deploy/1")
    split = DeploymentSpec.from_options(
        {
            "app": "aliases",
            "registered_model": "alias-model",
            "num_cpus": 0.25,
            "variants": {"old": {"weight": 90}, "new": {"weight": 10}},
        }
    )
    result = deploy(split, {"old": ref, "new": ref}, {"old": "xgboost", "new": "xgboost"}, lineage=source)
    client = embedded_registry.client
    assert str(client.get_model_version_by_alias("alias-model", "production").version) == result.versions["old"].version
    assert str(client.get_model_version_by_alias("alias-model", "canary").version) == result.versions["new"].version
    assert client.get_model_version("alias-model", result.versions["new"].version).tags["ray.traffic_weight"] == "10"

    promoted = DeploymentSpec.from_options(
        {
            "app": "aliases",
            "registered_model": "alias-model",
            "num_cpus": 0.25,
            "variants": {"old": {"weight": 0}, "new": {"weight": 100}},
        }
    )
    after = deploy(promoted, {"old": ref, "new": ref}, {"old": "xgboost", "new": "xgboost"}, lineage=source)
    assert after.versions == result.versions
    assert str(client.get_model_version_by_alias("alias-model", "production").version) == result.versions["new"].version
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="canary"):
        client.get_model_version_by_alias("alias-model", "canary")
    assert http.post(after.url, json={"instances": [[1.0] * 30]}).headers["x-ray-deploy-variant"] == "new"
