"""MLflow models are pinned and hash checked like Metaflow artifacts: the deploy pins an alias to
its version and records the sha256 of the model's files; a replica that fetches different files
refuses them. A real MLflow store (SQLite and a local artifact root) in the test's directory."""

import tempfile

import pandas as pd
import pytest

PYFUNC = """
import mlflow


class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input.sum(axis=1) * 2


mlflow.models.set_model(Doubler())
"""


@pytest.fixture()
def registered(tmp_path, monkeypatch):
    import mlflow

    from ray_deploy.models.artifacts import ModelRef

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    (tmp_path / "doubler.py").write_text(PYFUNC)
    experiment = mlflow.MlflowClient().create_experiment("doubler", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(tmp_path / "doubler.py"), registered_model_name="doubler"
        )
    mlflow.MlflowClient().set_registered_model_alias("doubler", "production", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "deployer-tmp"))  # this machine's model cache
    (tmp_path / "deployer-tmp").mkdir()
    return ModelRef(kind="mlflow", uri="models:/doubler@production"), info, tmp_path


def test_the_deploy_pins_the_version_and_the_files_and_a_replica_refuses_other_files(registered, monkeypatch):
    from ray_deploy.control.deploy import _resolvable
    from ray_deploy.errors import ArtifactError
    from ray_deploy.models.artifacts import load_model

    ref, info, root = registered
    pinned = _resolvable(ref)
    assert pinned.uri == "models:/doubler/1" and len(pinned.sha256) == 64
    model = load_model(pinned)
    assert model.predict(pd.DataFrame({"a": [1.0], "b": [2.0]})).tolist() == [6.0]

    # A replica on another machine (an empty model cache) after the stored files changed.
    stored = next(p for p in (root / "art").rglob("MLmodel"))
    stored.write_text(stored.read_text() + "\n# changed after the deploy\n")
    monkeypatch.setattr(tempfile, "tempdir", str(root / "replica-tmp"))
    (root / "replica-tmp").mkdir()
    with pytest.raises(ArtifactError, match="sha256 mismatch, recorded .* at deploy"):
        load_model(pinned)
    # On the deploying machine the verified copy is still there, and still loads.
    monkeypatch.setattr(tempfile, "tempdir", str(root / "deployer-tmp"))
    assert load_model(pinned).predict(pd.DataFrame({"a": [1.0], "b": [1.0]})).tolist() == [4.0]


def test_a_load_leaves_mlflow_following_the_environment(tmp_path, monkeypatch):
    """A load sets MLflow's process-wide URIs for its duration only: afterwards MLflow follows the
    environment again (a process that changes it later, like a test or a CLI run in-process, is
    not held to the URIs it had during the load)."""
    import mlflow

    from ray_deploy.models.artifacts import mlflow_uris

    first, loaded, later = (f"sqlite:///{tmp_path / name}.db" for name in ("first", "loaded", "later"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", first)
    with mlflow_uris(loaded, loaded):
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (loaded, loaded)
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (first, first)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", later)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", later)
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (later, later)
