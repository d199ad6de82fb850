"""A failed deploy changes nothing that serves; an unreachable cluster fails fast naming its address."""

import json
import time

import pytest

from ray_deploy import ArtifactError, ClusterUnreachable, DeployError, DeploymentSpec, ModelRef, deploy

pytestmark = pytest.mark.integration


def served_model(http, url):
    described = http.get(url).json()
    return [(v["model"], v["sha256"]) for v in described["variants"]]


@pytest.fixture()
def current(train_run, cancer_url, http):
    (variant,) = train_run["deploy"].task.data.ray_serve["variants"]
    ref = ModelRef(**variant["model_ref"])
    before = served_model(http, cancer_url)
    assert before == [(ref.uri, ref.sha256)]
    return ref, before


def test_tampered_model_is_refused_and_previous_keeps_serving(current, cancer_url, http, counted_load):
    ref, before = current
    tampered = ref.model_copy(update={"sha256": "0" * 64})
    spec = DeploymentSpec.from_options({"app": "cancer", "num_cpus": 0.5, "deploy_timeout_s": 60})
    with counted_load(cancer_url, json.dumps({"instances": [[1.0] * 30]})) as load:
        time.sleep(1)
        with pytest.raises(ArtifactError, match="sha256 mismatch"):
            deploy(spec, {"default": tampered}, {"default": "xgboost"})
        time.sleep(1)
    load.assert_nothing_lost()
    assert served_model(http, cancer_url) == before
    assert http.post(cancer_url, json={"instances": [[1.0] * 30]}).status_code == 200


def test_unschedulable_replicas_time_out_and_previous_comes_back(current, cancer_url, http):
    ref, before = current
    spec = DeploymentSpec.from_options({"app": "cancer", "num_cpus": 64, "deploy_timeout_s": 15})
    with pytest.raises(DeployError, match="did not become healthy within 15s") as raised:
        deploy(spec, {"default": ref}, {"default": "xgboost"})
    assert "num_cpus" in str(raised.value)
    assert served_model(http, cancer_url) == before
    assert http.post(cancer_url, json={"instances": [[1.0] * 30]}).status_code == 200


def test_replicas_no_node_can_hold_fail_without_waiting_out_the_timeout(current, cancer_url, http, capfd):
    """A GPU app on a CPU-only cluster that does not autoscale: the deploy says what is missing long
    before deploy_timeout_s, and the previous version keeps serving throughout."""
    ref, before = current
    spec = DeploymentSpec.from_options({"app": "cancer", "num_cpus": 0.5, "num_gpus": 1, "deploy_timeout_s": 600})
    started = time.monotonic()
    with pytest.raises(DeployError, match="cannot be scheduled and no node is being added") as raised:
        deploy(spec, {"default": ref}, {"default": "xgboost"})
    assert time.monotonic() - started < 300, "the deploy waited as if the replicas could still start"
    assert "GPU" in str(raised.value)
    assert "replicas wait for resources, no node is starting" in capfd.readouterr().err
    assert served_model(http, cancer_url) == before
    assert http.post(cancer_url, json={"instances": [[1.0] * 30]}).status_code == 200


def test_first_deploy_that_fails_leaves_no_app(current, ray_head, http):
    ref, _ = current
    spec = DeploymentSpec.from_options({"app": "never-up", "num_cpus": 64, "deploy_timeout_s": 5})
    with pytest.raises(DeployError):
        deploy(spec, {"default": ref}, {"default": "xgboost"})
    assert http.get(f"{ray_head.http_url}/never-up").status_code == 404


def test_unreachable_cluster_fails_fast_with_the_address(current):
    ref, _ = current
    spec = DeploymentSpec.from_options({"app": "cancer", "address": "127.0.0.1:1"})
    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match="127.0.0.1:1"):
        deploy(spec, {"default": ref}, {"default": "xgboost"})
    # ray.init alone would retry for about a minute; we check the socket first.
    assert time.monotonic() - started < 20


def test_server_side_batching_answers_each_request(train_run, ray_head, http):
    """With batching on, concurrent requests are merged into one predict call and split back."""
    from concurrent.futures import ThreadPoolExecutor

    data = train_run["deploy"].task.data
    (variant,) = data.ray_serve["variants"]
    spec = DeploymentSpec.from_options(
        {"app": "batched", "num_cpus": 0.25, "max_batch_size": 16, "batch_wait_timeout_s": 0.05}
    )
    result = deploy(spec, {"default": ModelRef(**variant["model_ref"])}, {"default": "xgboost"})
    rows = data.dataset["X_test"][:40]
    expected = data.model.predict(rows).tolist()

    def ask(index):
        body = {"instances": [rows[index].tolist(), rows[(index + 1) % len(rows)].tolist()]}
        return http.post(result.url, json=body).json()["predictions"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(len(rows))))
    assert answers == [[expected[i], expected[(i + 1) % len(rows)]] for i in range(len(rows))]
