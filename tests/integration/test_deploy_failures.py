"""A failed deploy changes nothing that serves; an unreachable cluster fails fast naming its address.

Each test that tries to break a serving app deploys the example flow's model to an app of its own
first (deleted at the end): `cancer` belongs to the session, and other modules read it.
"""

import json
import time

import httpx
import pytest

from ray_deploy import (
    ArtifactError,
    ClusterUnreachable,
    DeployError,
    DeploymentSpec,
    ModelRef,
    SpecError,
    app_status,
    cluster_status,
    delete_app,
    deploy,
)

pytestmark = pytest.mark.integration

APP = "keeps-serving"


def served_model(http, url):
    described = http.get(url).json()
    return [(v["model"], v["sha256"]) for v in described["variants"]]


@pytest.fixture(scope="module")
def model_ref(train_run):
    (variant,) = train_run["deploy"].task.data.ray_serve["variants"]
    return ModelRef(**variant["model_ref"])


@pytest.fixture(scope="module")
def serving(model_ref, ray_head):
    """The example flow's model serving on app ``APP``: (url, what it serves); deleted at the end.
    Deployed once for the module: each test's failed deploy must leave it serving just that."""
    spec = DeploymentSpec.from_options({"app": APP, "num_cpus": 0.25, "deploy_timeout_s": 120})
    try:
        url = deploy(spec, {"default": model_ref}, {"default": "xgboost"}).url
        with httpx.Client(timeout=30) as http:
            before = served_model(http, url)
        assert before == [(model_ref.uri, model_ref.sha256)]
        yield url, before
    finally:
        delete_app(APP)


def test_tampered_model_is_refused_and_previous_keeps_serving(model_ref, serving, http, counted_load):
    url, before = serving
    tampered = model_ref.model_copy(update={"sha256": "0" * 64})
    spec = DeploymentSpec.from_options({"app": APP, "num_cpus": 0.5, "deploy_timeout_s": 60})
    with counted_load(url, json.dumps({"instances": [[1.0] * 30]})) as load:
        time.sleep(1)
        with pytest.raises(ArtifactError, match="sha256 mismatch"):
            deploy(spec, {"default": tampered}, {"default": "xgboost"})
        time.sleep(1)
    load.assert_nothing_lost()
    assert served_model(http, url) == before
    assert http.post(url, json={"instances": [[1.0] * 30]}).status_code == 200


def test_a_route_inside_another_apps_is_refused_before_anything_changes(model_ref, serving, http):
    """An app whose route would sit inside a serving app's (and take its sub-routes' requests), or hold
    it, is refused naming the other app; the serving app is untouched and no app is created."""
    url, before = serving
    for app, route, inside in ((f"{APP}-fb", f"/{APP}/feedback", APP), ("holds-all", "/", None)):
        spec = DeploymentSpec.from_options({"app": app, "route_prefix": route, "num_cpus": 0.25})
        with pytest.raises(SpecError, match=f"'{route}' overlaps app ") as raised:
            deploy(spec, {"default": model_ref}, {"default": "xgboost"})
        if inside:  # "/" holds every app's route: whichever the cluster lists first is named
            assert f"overlaps app '{inside}' at '/{inside}'" in str(raised.value)
        assert app not in {row["app"] for row in app_status()}
    assert served_model(http, url) == before


def test_unschedulable_replicas_time_out_and_previous_comes_back(model_ref, serving, http):
    url, before = serving
    spec = DeploymentSpec.from_options({"app": APP, "num_cpus": 64, "deploy_timeout_s": 8})
    with pytest.raises(DeployError, match="did not become healthy within 8s") as raised:
        deploy(spec, {"default": model_ref}, {"default": "xgboost"})
    assert "num_cpus" in str(raised.value)
    assert served_model(http, url) == before
    assert http.post(url, json={"instances": [[1.0] * 30]}).status_code == 200


def test_gpu_app_fails_in_bounded_time_without_a_gpu_and_deploys_with_one(model_ref, serving, http, capfd, monkeypatch):
    """A GPU app on a cluster that does not autoscale: with no GPU in the cluster the deploy says what
    is missing long before deploy_timeout_s (after RAY_DEPLOY_SCHEDULE_STALL_S with no node on its
    way), and the previous version keeps serving throughout. On a cluster that has a GPU (the
    suite's head takes the machine's), the app deploys instead and its replica reports the GPU it
    holds."""
    url, before = serving
    monkeypatch.setenv("RAY_DEPLOY_SCHEDULE_STALL_S", "5")
    spec = DeploymentSpec.from_options({"app": APP, "num_cpus": 0.5, "num_gpus": 1, "deploy_timeout_s": 600})
    gpus = cluster_status()["resources"].get("GPU", 0)
    if gpus < 1:
        started = time.monotonic()
        with pytest.raises(
            DeployError, match=r"cannot be scheduled and no node is being added for them \(for 5s\)"
        ) as raised:
            deploy(spec, {"default": model_ref}, {"default": "xgboost"})
        assert time.monotonic() - started < 300, "the deploy waited as if the replicas could still start"
        assert "GPU" in str(raised.value)
        assert "replicas wait for resources, no node is starting" in capfd.readouterr().err
        assert served_model(http, url) == before
    else:
        deploy(spec, {"default": model_ref}, {"default": "xgboost"})
        described = http.get(url).json()  # what the replica itself reports
        gpu = described["replica"]["cuda_visible_devices"]
        (variant,) = described["variants"]
        assert gpu, f"the replica holds no GPU: {described['replica']}"
        # The GPU path, or the CPU with the reason the GPU it holds could not be used.
        device = variant["device"]
        assert device == f"cuda (GPU {gpu})" or device.startswith(f"cpu (GPU {gpu} assigned;"), device
        assert (variant["model"], variant["sha256"]) == (model_ref.uri, model_ref.sha256)
    assert http.post(url, json={"instances": [[1.0] * 30]}).status_code == 200


def test_first_deploy_that_fails_leaves_no_app(model_ref, ray_head, http):
    spec = DeploymentSpec.from_options({"app": "never-up", "num_cpus": 64, "deploy_timeout_s": 5})
    with pytest.raises(DeployError):
        deploy(spec, {"default": model_ref}, {"default": "xgboost"})
    assert http.get(f"{ray_head.http_url}/never-up").status_code == 404


def test_unreachable_cluster_fails_fast_with_the_address(model_ref):
    spec = DeploymentSpec.from_options({"app": "unreachable", "address": "127.0.0.1:1"})
    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match="127.0.0.1:1"):
        deploy(spec, {"default": model_ref}, {"default": "xgboost"})
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
