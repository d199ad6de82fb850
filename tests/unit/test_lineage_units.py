import pytest

from ray_deploy import DeploymentSpec, LineageError, ModelRef, Registry, SpecError, flatten_metrics
from ray_deploy.registry.lineage import artifact_uri, producer_tags, registry_uri, tracking_uri


def test_metrics_flatten_to_dotted_names():
    assert flatten_metrics("best", {"auc": 0.99, "by": {"x": 1}}) == {"best.auc": 0.99, "best.by.x": 1.0}
    assert flatten_metrics("accuracy", 0.5) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="scores is a str"):
        flatten_metrics("scores", "high")
    with pytest.raises(ValueError, match="boolean"):
        flatten_metrics("ok", True)


def test_artifact_uri_is_where_the_blob_lives():
    local = ModelRef(
        kind="metaflow",
        uri="metaflow://F/1/s/2/model",
        blob_key="ab" + "c" * 38,
        datastore_type="local",
        datastore_root="/data/.metaflow",
    )
    assert artifact_uri(local) == f"file:///data/.metaflow/F/data/ab/ab{'c' * 38}"
    s3 = local.model_copy(update={"datastore_type": "s3", "datastore_root": "s3://bucket/metaflow"})
    assert artifact_uri(s3) == f"s3://bucket/metaflow/F/data/ab/ab{'c' * 38}"


def test_default_registry_is_sqlite_under_ray_deploy_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("RAY_DEPLOY_HOME", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert registry_uri() == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///r.db")
    assert registry_uri() == "sqlite:///r.db"


def test_model_reference_forms(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path}/m.db")
    assert str(registry.resolve("cancer/3")) == "cancer/3"
    assert registry.resolve("models:/cancer/3").uri == "models:/cancer/3"
    with pytest.raises(LineageError, match="expected NAME/VERSION or NAME@ALIAS"):
        registry.resolve("cancer")


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"data": ["a b"]}, "data"),
        ({"data": "Flow/1/step"}, "data"),
        ({"metrics": ["best-metrics"]}, "metrics"),
        ({"registered_model": "a/b"}, "registered_model"),
        ({"production_alias": "latest"}, "production_alias"),
        ({"canary_alias": "v3"}, "canary_alias"),
        ({"production_alias": "live", "canary_alias": "live"}, "production_alias and canary_alias"),
        ({"lineage": "maybe"}, "lineage"),
    ],
)
def test_lineage_options_name_themselves(options, option):
    with pytest.raises(SpecError, match=rf"^{option}"):
        DeploymentSpec.from_options({"app": "cancer", **options})


def test_registry_defaults_to_app_name():
    assert DeploymentSpec.from_options({"app": "cancer"}).model_name == "cancer"
    assert DeploymentSpec.from_options({"app": "cancer", "registered_model": "bc"}).model_name == "bc"


def test_producer_tags_name_the_training_task_and_its_artifact():
    import doctest

    import ray_deploy.registry.lineage

    assert producer_tags("TrainFlow/12/train/4/model") == {
        "metaflow.producer_task": "TrainFlow/12/train/4",
        "metaflow.producer_artifact": "model",
    }
    assert producer_tags(None) == {}
    for bad in ("TrainFlow/12/train/4", "TrainFlow/12/train//model", "TrainFlow/12/train/4/model/x"):
        with pytest.raises(LineageError, match=r"expected an artifact pathspec Flow/run/step/task/artifact"):
            producer_tags(bad)
    assert doctest.testmod(ray_deploy.registry.lineage).failed == 0
