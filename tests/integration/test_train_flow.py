"""The example flow end to end: a real Metaflow run deploys to a real Ray head; the endpoint
answers over HTTP after the run has ended, and the run records where its model lives."""

import hashlib

import numpy as np
import pytest
from metaflow import DataArtifact, namespace

pytestmark = pytest.mark.integration


def test_run_records_where_the_model_lives(train_run, ray_head):
    deploy_task = train_run["deploy"].task
    record = deploy_task.data.ray_serve
    assert record["app"] == "cancer"
    assert record["url"] == f"{ray_head.http_url}/cancer"
    assert record["address"] == ray_head.address
    (variant,) = record["variants"]
    assert variant["name"] == "default"
    assert variant["weight"] == 100
    assert variant["predictor"] == "xgboost"
    assert variant["model_uri"] == f"metaflow://{deploy_task.pathspec}/model"


def test_recorded_hash_is_the_stored_artifact(train_run):
    """The reference names the artifact as Metaflow stored it, and the hash covers those bytes."""
    namespace(None)
    deploy_task = train_run["deploy"].task
    (variant,) = deploy_task.data.ray_serve["variants"]
    ref = variant["model_ref"]
    artifact = DataArtifact(f"{deploy_task.pathspec}/model")
    assert artifact.sha == ref["blob_key"]
    from ray_deploy import ModelRef
    from ray_deploy.models.artifacts import read_model_bytes

    blob = read_model_bytes(ModelRef(**ref))
    assert hashlib.sha256(blob).hexdigest() == variant["sha256"]


def test_task_metadata_names_app_and_url(train_run):
    metadata = {m.name: m.value for m in train_run["deploy"].task.metadata}
    assert metadata["ray_serve_app"] == "cancer"
    assert metadata["ray_serve_url"] == train_run["deploy"].task.data.ray_serve["url"]


def test_endpoint_answers_after_the_run_like_the_model(train_run, cancer_url, http):
    data = train_run["deploy"].task.data
    X_test = data.dataset["X_test"]
    expected = data.model.predict(X_test).tolist()
    answer = http.post(cancer_url, json={"instances": X_test.tolist()})
    assert answer.status_code == 200, answer.text
    record = train_run["deploy"].task.data.ray_serve
    (variant,) = record["variants"]
    assert answer.json() == {
        "predictions": expected,
        "request_id": answer.headers["x-request-id"],
        "variant": "default",
        "model_version": variant["model_version"],
    }
    assert answer.headers["x-ray-deploy-variant"] == "default"
    assert answer.headers["x-model-version"] == variant["model_version"]
    # A majority of held-out rows is right: the deployed model is the trained one, not noise.
    assert np.mean(np.array(expected) == data.dataset["y_test"]) > 0.9


def test_every_mlflow_scoring_format(train_run, cancer_url, http):
    data = train_run["deploy"].task.data
    rows = data.dataset["X_test"][:4].tolist()
    names = [f"f{i}" for i in range(len(rows[0]))]
    expected = data.model.predict(np.array(rows)).tolist()
    bodies = [
        {"instances": rows},
        {"inputs": rows},
        {"dataframe_split": {"columns": names, "data": rows}},
        {"dataframe_records": [dict(zip(names, row)) for row in rows]},
    ]
    for body in bodies:
        answer = http.post(f"{cancer_url}/invocations", json=body)
        assert answer.status_code == 200, (body.keys(), answer.text)
        assert answer.json()["predictions"] == expected


def test_get_describes_what_is_served(train_run, run_user, cancer_url, http):
    described = http.get(cancer_url).json()
    (variant,) = described["variants"]
    assert variant["model"] == f"metaflow://{train_run['deploy'].task.pathspec}/model"
    assert variant["n_features"] == 30
    assert described["source"]["task"] == train_run["deploy"].task.pathspec
    assert described["source"]["user"] == run_user(train_run)
    assert variant["device"] == "cpu"


def test_status_says_which_device_path_each_replica_took(train_run):
    """`ray-deploy status` counts live replicas per device path (GPU or CPU, and why)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("ray-deploy")
    shown = subprocess.run([str(exe), "status", "cancer", "--json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    (row,) = json.loads(shown.stdout)
    (label,) = [v["label"] for v in row["variants"]]
    assert row["devices"] == {label: {"cpu": 1}}
    text = subprocess.run([str(exe), "status", "cancer"], capture_output=True, text=True, timeout=60).stdout
    assert "runs on: cpu x1 replica(s)" in text
