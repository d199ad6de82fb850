"""The MLflow server goes away in the middle of a deploy: nothing serves unrecorded.

The server process is killed (for real, SIGKILL) the moment the new model version appears in
the registry, i.e. after registration and before the deployment is recorded. The deploy step
fails, the previous release keeps serving, and once the server is back the registry shows the
new version never took traffic and the aliases never moved.
"""

import threading
import time

import pytest

pytestmark = pytest.mark.integration


def test_registry_killed_mid_deploy_leaves_nothing_unrecorded(
    tmp_path, write_flow, run_flow, ray_head, http, start_mlflow_server, counted_load, release_steps
):
    from mlflow import MlflowClient

    server = start_mlflow_server()
    env = {
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    flow = write_flow(
        tmp_path / "outage_flow.py", "OutageFlow", release_steps, 'app="outage", predictor="python", num_cpus=0.25'
    )
    first = run_flow(flow, "--release", "1", env=env)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    url = f"{ray_head.http_url}/outage"
    v1 = http.get(url).json()["variants"][0]["model_version"]

    killed = threading.Event()

    def kill_when_registered() -> None:
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if any(v.version != v1.split("/")[1] for v in client.search_model_versions("name = 'outage'")):
                    server.stop(kill=True)
                    killed.set()
                    return
            except Exception:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_when_registered)
    watcher.start()
    with counted_load(url, '{"instances": [[5.1, 3.5, 1.4, 0.2]]}') as load:
        second = run_flow(flow, "--release", "2", env=env)
        watcher.join(timeout=60)
    load.assert_nothing_lost()
    output = second.stdout + second.stderr
    assert killed.is_set(), "the registry was not killed mid-deploy; the test proved nothing"
    assert second.returncode != 0, output[-3000:]
    assert "MLflow" in output and ("put back to its previous version" in output or "unreachable" in output), output[
        -3000:
    ]
    assert http.get(url).json()["variants"][0]["model_version"] == v1
    assert http.post(url, json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).json()["model_version"] == v1

    restarted = start_mlflow_server(root=server.root, port=server.port)
    client = MlflowClient(tracking_uri=restarted.uri, registry_uri=restarted.uri)
    versions = {str(v.version): v for v in client.search_model_versions("name = 'outage'")}
    assert set(versions) == {v1.split("/")[1], str(int(v1.split("/")[1]) + 1)}
    new = versions[str(int(v1.split("/")[1]) + 1)]
    assert new.tags.get("ray_deploy.status") != "serving" and "ray.deployed_at" not in new.tags
    assert str(client.get_model_version_by_alias("outage", "production").version) == v1.split("/")[1]
