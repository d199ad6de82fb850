"""Models reachable from any node: a flow on Metaflow's S3 datastore (an S3-compatible server on
loopback, moto in server mode) deploys, and the replicas load the model from S3."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

BUCKET = "ray-deploy-test"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A real S3 API over HTTP on 127.0.0.1 (moto's server mode), with one bucket; stopped at the end."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        server.kill()
        pytest.fail("moto server did not answer within 60s")
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    yield url
    server.terminate()
    server.wait(timeout=20)
    log.close()


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
    flow = write_flow(tmp_path / "s3_flow.py", "S3Flow", STEPS, 'app="from-s3", predictor="python", num_cpus=0.25')
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
