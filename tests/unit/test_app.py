"""The Serve application we build, checked against Ray Serve's own config schema, and routing math."""

from collections import Counter

import pytest
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from ray_deploy import ArtifactError, DeploymentSpec, ModelRef
from ray_deploy.artifacts import verify_sha256
from ray_deploy.serving.app import serving_config, to_serve_config
from ray_deploy.serving.server import LoadedVariant, choose_variant, to_jsonable

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
    assert to_jsonable(pd.Series([1, 2])) == [1, 2]
    assert to_jsonable(pd.DataFrame({"a": [1]})) == [{"a": 1}]
