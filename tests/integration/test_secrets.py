"""Planted fake secrets never land in what we write: registry tags and runs, artifacts, cards,
our logs, the Serve config, captures and labels, or exported manifests. The Ray token and the
feedback bearer token (used for a label on the way) are checked the same way."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

STEPS = """
@step
def start(self):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    X, y = load_iris(return_X_y=True)
    self.model = LogisticRegression(C=0.73, max_iter=3000).fit(X, y)
    self.next(self.deploy)
"""


def test_planted_secrets_appear_nowhere(tmp_path, write_flow, run_flow, ray_head, embedded_registry):
    from ray_deploy.cluster import auth_token_path, read_auth_token

    planted = {
        "MLFLOW_TRACKING_PASSWORD": f"planted-mlflow-{uuid.uuid4().hex}",
        "MLFLOW_TRACKING_TOKEN": f"planted-mlflow-token-{uuid.uuid4().hex}",
        "AWS_SESSION_TOKEN": f"planted-aws-{uuid.uuid4().hex}",
        "METAFLOW_SERVICE_AUTH_KEY": f"planted-metaflow-{uuid.uuid4().hex}",
    }
    token_env = "RAY_DEPLOY_TEST_FEEDBACK_TOKEN"  # in the test head's environment (tests/conftest.py)
    secrets = [*planted.values(), read_auth_token(), os.environ[token_env]]
    assert all(secrets)
    flow_dir = tmp_path / "flow"
    flow_dir.mkdir()
    flow = write_flow(
        flow_dir / "secret_flow.py",
        "SecretFlow",
        STEPS,
        'app="secrets", predictor="python", num_cpus=0.25, '
        f'capture={{"sample": 1.0, "flush_s": 0.5, "feedback_token_env": "{token_env}"}}',
    )
    done = run_flow(flow, env=planted)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # A captured request and its label, sent with the bearer token.
    url = f"{ray_head.http_url}/secrets"
    answer = httpx.post(url, json={"instances": [[5.1, 3.5, 1.4, 0.2]]}, timeout=30)
    assert answer.status_code == 200, answer.text
    labelled = httpx.post(
        f"{url}/feedback",
        json={"request_id": answer.json()["request_id"], "label": answer.json()["predictions"][0]},
        headers={"Authorization": f"Bearer {os.environ[token_env]}"},
        timeout=30,
    )
    assert labelled.status_code == 200, labelled.text
    from ray_deploy import Endpoint

    captures = Path(Endpoint("secrets").config().capture.root) / "app=secrets"
    deadline = time.monotonic() + 20
    while len(list(captures.rglob("*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)

    exe = Path(sys.executable).with_name("ray-deploy")
    outputs = {"flow output": done.stdout + done.stderr}
    for args in (
        ["status", "secrets", "--json"],
        ["export", "secrets", "--kuberay"],
        ["export", "secrets", "--serve-config"],
    ):
        shown = subprocess.run(
            [str(exe), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **planted}
        )
        assert shown.returncode == 0, shown.stderr
        outputs[" ".join(args)] = shown.stdout + shown.stderr

    client = embedded_registry.client
    for version in client.search_model_versions("name = 'secrets'"):
        outputs[f"version {version.version} tags"] = json.dumps(version.tags)
        run = client.get_run(version.run_id)
        outputs[f"run {version.run_id}"] = json.dumps([run.data.params, run.data.tags, run.data.metrics])
    outputs["registered model tags"] = json.dumps(client.get_registered_model("secrets").tags)

    # Everything the flow stored (artifacts, metadata, the ray_serve card) and the head's logs.
    datastore = Path(os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"])
    files = [p for p in datastore.rglob("*") if p.is_file() and "SecretFlow" in str(p)]
    files += [p for p in (flow_dir / ".metaflow").rglob("*") if p.is_file()]  # cards live beside the flow
    parquet = list(captures.rglob("*.parquet"))
    assert len(parquet) >= 2, "the capture and the label must be among the files checked"
    files += parquet
    assert any(p.name.endswith(".html") for p in files), "the ray_serve card must be among the files checked"
    logs = Path(f"/tmp/ray-deploy-{os.environ['RAY_DEPLOY_GCS_PORT']}/session_latest/logs")
    files += [p for p in logs.rglob("*") if p.is_file() and ("serve" in p.name or "worker" in p.name)]
    files = [p for p in files if p != auth_token_path()]

    leaks = [(where, secret[:16]) for where, text in outputs.items() for secret in secrets if secret in text]
    for path in files:
        data = path.read_bytes()
        leaks += [(str(path), secret[:16]) for secret in secrets if secret.encode() in data]
    assert not leaks, f"secrets leaked: {leaks[:5]}"
    assert len(files) > 10 and len(outputs) >= 6, "the check must actually look at things"
