"""Captures on S3 through Metaflow's own S3 storage: an S3-compatible server on loopback (moto in
server mode), reached with METAFLOW_S3_ENDPOINT_URL as a flow reaches it. Needs no Ray."""

import re
from datetime import UTC, datetime

import pytest

from ray_deploy.serving.capture import CAPTURE_DIR, Captured, CaptureWriter, Labelled, read_captures, read_labels
from ray_deploy.serving.payload import ModelInput

pytestmark = pytest.mark.integration

BUCKET = "ray-deploy-captures-test"
LATE = datetime(2024, 5, 1, 13, 59, 59, 500000, tzinfo=UTC).timestamp()
EARLY = LATE + 1.0


@pytest.fixture(autouse=True, scope="module")
def _module_apps_deleted():
    """This module deploys no app and talks to no Ray head: it leaves every head's apps alone."""
    yield


@pytest.fixture
def metaflow_s3(s3_endpoint, monkeypatch, tmp_path):
    """Metaflow's S3 settings pointing at the test server, as a flow on the S3 datastore has them."""
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("METAFLOW_DEFAULT_DATASTORE", "s3")
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_S3", f"s3://{BUCKET}/metaflow")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.chdir(tmp_path)  # Metaflow's S3 downloads into a temporary directory under the working one
    # Metaflow reads its configuration once, when first imported: in this process it may have been
    # imported already (other tests), so its client parameters get the endpoint too. The s3op
    # processes Metaflow starts to list and fetch read it from the environment above.
    from metaflow import metaflow_config

    monkeypatch.setitem(metaflow_config.DATATOOLS_CLIENT_PARAMS, "endpoint_url", s3_endpoint)
    return s3_endpoint


def test_captures_and_labels_on_s3(metaflow_s3):
    import boto3

    root = f"s3://{BUCKET}/metaflow/{CAPTURE_DIR}"
    writer = CaptureWriter(root, "iris", "SERVE_REPLICA::iris#ModelServer#abc", sample=1.0, flush_s=0.2)
    writer.start()
    rows = ModelInput(rows=[[5.1, 3.5], [6.2, 2.9]], columns=["a", "b"], body=None)
    writer.add(Captured(LATE, "r1", "k1", "lr", "lr@v1", "v1", "iris/1", 1.5, rows, [0, 1]))
    writer.add(Captured(EARLY, "r2", None, "lr", "lr@v1", "v1", "iris/1", 2.5, rows, [[0.3, 0.7], [0.9, 0.1]]))
    writer.add(Captured(EARLY, "r2", None, "xgb", "xgb@v2", "v2", None, 3.5, rows, [1, 0], True))
    writer.add_label(Labelled(EARLY + 60, "r1", "lr", "lr@v1", "v1", "iris/1", 1, 0, 0.0))
    writer.close()
    assert writer.written == {"lr@v1": 2, "xgb@v2": 1} and writer.labels_written == 1
    assert writer.dropped == {} and writer.labels_dropped == 0

    listed = boto3.client("s3", endpoint_url=metaflow_s3).list_objects_v2(Bucket=BUCKET, Prefix="metaflow/")
    keys = sorted(item["Key"] for item in listed["Contents"])
    prefix = f"metaflow/{CAPTURE_DIR}/app=iris"
    name = r"SERVE_REPLICA_iris_ModelServer_abc-\d{13}-\d+\.parquet"
    expected = [
        rf"{prefix}/labels/hour=2024-05-01T14/{name}",
        rf"{prefix}/predictions/release=v1/hour=2024-05-01T13/{name}",
        rf"{prefix}/predictions/release=v1/hour=2024-05-01T14/{name}",
        rf"{prefix}/predictions/release=v2/hour=2024-05-01T14/{name}",
    ]
    assert len(keys) == len(expected) and all(re.fullmatch(p, k) for p, k in zip(expected, keys)), keys

    frame = read_captures(root, "iris")
    assert frame["request_id"].tolist() == ["r1", "r1", "r2", "r2", "r2", "r2"]
    assert frame["input"].tolist()[:2] == [{"a": 5.1, "b": 3.5}, {"a": 6.2, "b": 2.9}]
    assert frame[frame.request_id == "r2"]["prediction"].tolist() == [[0.3, 0.7], [0.9, 0.1], 1, 0]
    assert frame["shadow"].sum() == 2 and set(frame["label"]) == {"lr@v1", "xgb@v2"}
    assert read_captures(root, "iris", since=EARLY, variant="lr")["request_id"].tolist() == ["r2", "r2"]
    assert read_captures(root, "iris", release="v2")["label"].tolist() == ["xgb@v2", "xgb@v2"]

    labels = read_labels(root, "iris")
    assert labels["request_id"].tolist() == ["r1"] and labels["truth"].tolist() == [1]
    assert labels["prediction"].tolist() == [0] and labels["score"].tolist() == [0.0]
    assert read_labels(root, "iris", until=EARLY).empty
    assert read_captures(root, "other-app").empty
