"""Models reachable from any node: a flow on Metaflow's S3 datastore (an S3-compatible server on
loopback, moto in server mode) deploys, and the replicas load the model from S3."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BUCKET = "ray-deploy-test"


STEPS = """
@step
def start(self):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    X, y = load_iris(return_X_y=True)
    self.model = LogisticRegression(C=0.37, max_iter=3000).fit(X, y)  # bytes no other test stores
    self.next(self.deploy)
"""


def test_replicas_load_the_model_from_s3(tmp_path, write_flow, run_flow, ray_head, http, s3_endpoint):
    import boto3

    env = {
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{BUCKET}/metaflow",
        "METAFLOW_S3_ENDPOINT_URL": s3_endpoint,
    }
    options = 'app="from-s3", predictor="python", num_cpus=0.25, capture={"sample": 1.0, "flush_s": 0.5}'
    flow = write_flow(tmp_path / "s3_flow.py", "S3Flow", STEPS, options)
    done = run_flow(flow, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    status = subprocess.run(
        [str(Path(sys.executable).with_name("ray-deploy")), "status", "from-s3", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    import json

    (row,) = json.loads(status.stdout)
    model = row["config"]["variants"][0]["model"]
    assert model["datastore_type"] == "s3" and model["datastore_root"] == f"s3://{BUCKET}/metaflow"
    # The bytes the replica loaded (and hash-checked) are in the bucket, and nowhere on local disk.
    key = f"metaflow/S3Flow/data/{model['blob_key'][:2]}/{model['blob_key']}"
    boto3.client("s3", endpoint_url=s3_endpoint).head_object(Bucket=BUCKET, Key=key)
    local_root = Path(os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"])
    assert not list(local_root.rglob(model["blob_key"])), "the model must not come from the local datastore"
    assert not list(local_root.rglob("S3Flow/data")), "the flow wrote no artifact to the local datastore"
    answer = http.post(f"{ray_head.http_url}/from-s3", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
    assert answer.status_code == 200 and answer.json()["predictions"] == [0]

    # The replica captured the request beside the flow's artifacts, in the bucket, as Parquet.
    import io

    import pyarrow.parquet as pq

    assert row["capture"]["root"] == f"s3://{BUCKET}/metaflow/ray_deploy_captures"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    prefix = "metaflow/ray_deploy_captures/app=from-s3/predictions/"
    deadline = time.monotonic() + 30
    keys: list[str] = []
    while not keys and time.monotonic() < deadline:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
        time.sleep(0.5)
    assert keys, "no capture reached the bucket"
    assert all("/release=" in key and "/hour=" in key and key.endswith(".parquet") for key in keys)
    tables = [pq.read_table(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())) for key in keys]
    captured_ids = {rid for table in tables for rid in table.column("request_id").to_pylist()}
    assert answer.json()["request_id"] in captured_ids
