"""The Serve application we build, checked against Ray Serve's own config schema, and routing math."""

from collections import Counter

import pytest
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from ray_deploy import ArtifactError, DeploymentSpec, ModelRef
from ray_deploy.models.artifacts import verify_sha256
from ray_deploy.serving.config import serving_config, to_serve_config
from ray_deploy.serving.server import choose_variant, to_jsonable
from ray_deploy.serving.variant import LoadedVariant

REF = ModelRef(
    kind="metaflow",
    uri="metaflow://F/1/deploy/2/model",
    sha256="ab" * 32,
    blob_key="cd" * 20,
    datastore_type="local",
    datastore_root="/tmp/.metaflow",
    python_type="xgboost.sklearn.XGBClassifier",
)


def test_serve_config_is_valid_for_ray_serve():
    spec = DeploymentSpec.from_options({"app": "cancer", "num_replicas": 2, "num_cpus": 0.5, "num_gpus": 0.25})
    config = serving_config(spec, {"default": REF}, {"default": "xgboost"}, {"task": "F/1/deploy/2"})
    exported = to_serve_config(spec, config)
    app = ServeApplicationSchema.model_validate(exported)
    ServeDeploySchema.model_validate({"applications": [exported]})
    (deployment,) = app.deployments
    assert app.route_prefix == "/cancer"
    assert deployment.num_replicas == 2
    assert deployment.ray_actor_options.num_gpus == 0.25
    assert deployment.user_config["variants"][0]["model"]["uri"] == REF.uri
    assert deployment.user_config["variants"][0]["predictor"] == "xgboost"


def test_hash_mismatch_is_refused():
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        verify_sha256(REF, b"tampered bytes")


def _variants(*weights):
    spec = DeploymentSpec.from_options(
        {"app": "ab", "variants": {f"v{i}": {"weight": w} for i, w in enumerate(weights)}}
    )
    config = serving_config(spec, {f"v{i}": REF for i in range(len(weights))}, {})
    return [LoadedVariant(config=v, predictor=None) for v in config.variants]


def test_weights_are_honoured():
    variants = _variants(70, 30, 0)
    counts = Counter(choose_variant(variants).config.name for _ in range(20_000))
    assert abs(counts["v0"] / 20_000 - 0.7) < 0.02
    assert counts["v2"] == 0


def test_request_key_pins_a_variant():
    variants = _variants(50, 50)
    first = {key: choose_variant(variants, key).config.name for key in map(str, range(200))}
    again = {key: choose_variant(variants, key).config.name for key in map(str, range(200))}
    assert first == again
    assert set(first.values()) == {"v0", "v1"}


def test_predictions_become_json():
    import numpy as np
    import pandas as pd

    assert to_jsonable(np.array([1.5, np.nan])) == [1.5, None]
    assert to_jsonable(pd.Series([1, 2], name="score")) == [{"score": 1}, {"score": 2}]  # as MLflow answers
    assert to_jsonable(pd.DataFrame({"a": [1]})) == [{"a": 1}]
    # Arrays of every size and kind: a non-finite value anywhere becomes null, ints stay ints.
    big = np.arange(200, dtype=np.float32).reshape(100, 2) / 4
    assert to_jsonable(big) == big.tolist()
    big[99, 1] = np.inf
    assert to_jsonable(big)[99] == [49.5, None] and to_jsonable(big)[:99] == big[:99].tolist()
    assert to_jsonable(np.array([[0.25, -np.inf]], dtype=np.float32)) == [[0.25, None]]
    labels = to_jsonable(np.array([0, 1, 1], dtype=np.int64))
    assert labels == [0, 1, 1] and all(type(label) is int for label in labels)
    assert to_jsonable(np.array([True, False])) == [True, False]


def _mlflow_outputs():
    import numpy as np
    import pandas as pd

    return {
        "int array": np.array([0, 1, 1]),
        "float matrix": np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32),
        "string array": np.array(["setosa", "virginica"]),
        "list": [0.5, 1.5],
        "frame": pd.DataFrame({"label": [0, 1], "score": [0.9, 0.2]}),
        "named series": pd.Series([0.1, 0.2], name="score"),
        "unnamed series": pd.Series([3, 4]),
        "dict of arrays": {"label": np.array([0, 1]), "proba": np.array([[0.1, 0.9], [0.8, 0.2]])},
        "dict of lists": {"label": [0, 1], "text": ["a", "b"]},
        "records with numpy values": [{"label": np.int64(1), "score": np.float32(0.5)}],
        "bytes": [b"\x00\x01"],
    }


@pytest.mark.parametrize("name", list(_mlflow_outputs()))
def test_answers_are_shaped_as_mlflow_models_serve_shapes_them(name):
    """The same predictions, answered by `mlflow models serve` (its own encoder) and by a replica."""
    import io
    import json

    from mlflow.pyfunc.scoring_server import predictions_to_json

    output = _mlflow_outputs()[name]
    written = io.StringIO()
    predictions_to_json(output, written)
    assert to_jsonable(output) == json.loads(written.getvalue())["predictions"]


def test_replica_gc_threshold_is_raised_unless_told_otherwise(monkeypatch):
    import gc

    from ray_deploy.errors import RayDeployError
    from ray_deploy.serving.config import GC_THRESHOLD, GC_THRESHOLD_ENV
    from ray_deploy.serving.server import tune_gc

    before = gc.get_threshold()
    try:
        assert tune_gc({}) == GC_THRESHOLD and gc.get_threshold() == (GC_THRESHOLD, *before[1:])
        assert tune_gc({GC_THRESHOLD_ENV: "5000"}) == 5000
        gc.set_threshold(*before)
        assert tune_gc({GC_THRESHOLD_ENV: "0"}) == before[0]  # 0: Python's own threshold stays
        with pytest.raises(RayDeployError, match=f"{GC_THRESHOLD_ENV}='lots': expected a whole number"):
            tune_gc({GC_THRESHOLD_ENV: "lots"})
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)
    # Set where the deploy runs, it reaches the replicas; a bad value fails the deploy up front.
    from ray_deploy.cluster import deployment_runtime_env

    monkeypatch.setenv(GC_THRESHOLD_ENV, "5000")
    assert deployment_runtime_env(None)["env_vars"][GC_THRESHOLD_ENV] == "5000"
    monkeypatch.setenv(GC_THRESHOLD_ENV, "-1")
    with pytest.raises(RayDeployError, match=f"{GC_THRESHOLD_ENV}='-1': expected a whole number"):
        deployment_runtime_env(None)


def test_resources_placement_and_autoscaling_reach_serve_as_serve_takes_them():
    """Our options become Serve's own: its config schema and Deployment.options accept them as given."""
    from ray_deploy.serving.server import server_deployment

    spec = DeploymentSpec.from_options(
        {
            "app": "gpu",
            "num_cpus": 0.5,
            "num_gpus": 0.5,
            "memory": 2**30,
            "accelerator_type": "T4",
            "resources": {"inference_node": 1},
            "placement": {"bundles": [{"CPU": 1, "GPU": 1, "inference_node": 1, "memory": 2**31}, {"CPU": 2}]},
            "autoscaling": {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 2},
        }
    )
    config = serving_config(spec, {"default": REF}, {"default": "xgboost"})
    (deployment,) = ServeApplicationSchema.model_validate(to_serve_config(spec, config)).deployments
    assert deployment.placement_group_bundles[0]["GPU"] == 1 and deployment.placement_group_strategy == "PACK"
    assert deployment.autoscaling_config["max_replicas"] == 3
    assert deployment.ray_actor_options.accelerator_type == "T4"
    built = server_deployment(to_serve_config(spec, config)["deployments"][0])
    replica = built._replica_config
    assert replica.placement_group_bundles[1] == {"CPU": 2}
    assert replica.ray_actor_options["resources"] == {"inference_node": 1}
    assert built._deployment_config.autoscaling_config.upscale_delay_s == 2


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"placement": {"bundles": [{"CPU": 1}], "strategy": "PAK"}},
            "placement.strategy: strategy 'PAK' is not one of",
        ),
        (
            {"num_gpus": 1, "placement": {"bundles": [{"CPU": 1}]}},
            "placement.bundles[0] must hold the replica itself (GPU 1 > 0)",
        ),
        ({"placement": {"bundles": [{"CPU": 0}]}}, "bundle 0 must name at least one positive resource"),
        ({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, "num_replicas=2 and autoscaling both set"),
        ({"autoscaling": {"min_replicas": 5, "max_replicas": 3}}, "min_replicas 5 is above max_replicas 3"),
        ({"autoscaling": {"max_replicas": 3, "initial_replicas": 9}}, "initial_replicas 9 must be between"),
        ({"autoscaling": {"max_replica": 3}}, "autoscaling.max_replica: unknown option"),
        ({"max_replicas_per_node": 1, "placement": {"bundles": [{"CPU": 1}]}}, "cannot be combined"),
        ({"memory": -5}, "memory: Input should be greater than or equal to 1"),
        ({"resources": "not json"}, "resources must be a JSON object"),
    ],
)
def test_invalid_resource_combinations_name_the_reason(options, expected):
    from ray_deploy import SpecError

    with pytest.raises(SpecError) as raised:
        DeploymentSpec.from_options({"app": "gpu", **options})
    assert expected in str(raised.value)


def _overlap_probe(thread_safe):
    """A predictor that records how many of its predictions run at once; each waits (bounded) for
    a second one to arrive, so two run together wherever they may."""
    import threading

    class Probe:
        payload_format = "array"

        def __init__(self):
            self.running = self.most = 0
            self.lock = threading.Lock()
            self.second = threading.Event()

        def predict(self, payload):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
                if self.running > 1:
                    self.second.set()
            self.second.wait(1.0)
            with self.lock:
                self.running -= 1
            return [0] * len(payload)

    Probe.thread_safe = thread_safe
    return Probe()


@pytest.mark.parametrize("thread_safe", [True, False])
def test_only_thread_safe_predictors_predict_several_at_once(thread_safe):
    import asyncio

    import numpy as np

    (config,) = [v.config for v in _variants(100)]
    probe = _overlap_probe(thread_safe)
    variant = LoadedVariant(config=config, predictor=probe)

    async def two():
        return await asyncio.gather(*(variant.predict(np.zeros((2, 3))) for _ in range(2)))

    assert asyncio.run(two()) == [[0, 0], [0, 0]]
    assert probe.most == (2 if thread_safe else 1)


def test_the_onnx_predictor_is_thread_safe_and_the_thread_count_is_checked(monkeypatch):
    from ray_deploy.cluster import deployment_runtime_env
    from ray_deploy.errors import RayDeployError
    from ray_deploy.models.predictors.onnx_predictor import ONNXPredictor
    from ray_deploy.serving.config import PREDICT_THREADS, PREDICT_THREADS_ENV, predict_threads_setting

    assert ONNXPredictor.thread_safe is True
    assert predict_threads_setting({}) == PREDICT_THREADS
    assert predict_threads_setting({PREDICT_THREADS_ENV: "4"}) == 4
    monkeypatch.setenv(PREDICT_THREADS_ENV, "3")
    assert deployment_runtime_env(None)["env_vars"][PREDICT_THREADS_ENV] == "3"
    for bad in ("0", "two"):
        monkeypatch.setenv(PREDICT_THREADS_ENV, bad)
        with pytest.raises(RayDeployError, match=f"{PREDICT_THREADS_ENV}='{bad}': expected a whole number of threads"):
            deployment_runtime_env(None)
