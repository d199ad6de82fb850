import re

import pytest
from metaflow.plugins import STEP_DECORATORS

from ray_deploy import DeploymentSpec, SpecError, option_defaults

# Looked up the way Metaflow finds it: through the extension's plugin registration.
RayServeDecorator = next(deco for deco in STEP_DECORATORS if deco.name == "ray_serve")


def spec(**options):
    return DeploymentSpec.from_options({"app": "cancer", **options})


def test_defaults_serve_one_variant_at_app_route():
    built = spec()
    assert built.route == "/cancer"
    assert [(v.name, v.model, v.predictor, v.weight) for v in built.variants] == [("default", "model", "auto", 100.0)]
    assert (built.num_replicas, built.num_cpus, built.num_gpus, built.max_batch_size) == (1, 1.0, 0.0, 1)


def test_command_line_strings_are_coerced_once():
    # `--with ray_serve:num_replicas=2,...` can deliver text for every option.
    built = spec(num_replicas="2", num_cpus="0.5", predictor_config='{"output": "probability"}', route_prefix="/c")
    assert built.num_replicas == 2
    assert built.num_cpus == 0.5
    assert built.variants[0].predictor_config == {"output": "probability"}
    assert built.route == "/c"


def test_variants_by_name_with_weights():
    built = spec(
        variants={
            "xgb": {"model": "model", "weight": 70},
            "onnx": {"model": "model_onnx", "predictor": "onnx", "weight": 30},
        }
    )
    assert [(v.name, v.weight, v.predictor) for v in built.variants] == [("xgb", 70, "auto"), ("onnx", 30, "onnx")]


def test_mlflow_uri_is_a_model():
    built = spec(model="models:/cancer/3")
    assert built.variants[0].is_mlflow_uri


BAD_OPTIONS = [
    ({"num_replicas": -1}, "num_replicas", "greater than or equal to 1"),
    ({"num_replicas": "many"}, "num_replicas", "valid integer"),
    ({"num_cpus": -0.5}, "num_cpus", "greater than or equal to 0"),
    ({"num_gpus": "x"}, "num_gpus", "valid number"),
    ({"predictor": "sklearn"}, "predictor", "module:Class"),
    ({"model": "my-model"}, "model", "step artifact"),
    ({"route_prefix": "cancer"}, "route_prefix", "starts with '/'"),
    ({"route_prefix": "/cancer/"}, "route_prefix", "no trailing"),
    ({"route_prefix": "/-/routes"}, "route_prefix", "Serve's own namespace"),
    ({"route_prefix": "/-/healthz"}, "route_prefix", "Serve's own namespace"),
    ({"route_prefix": "/v2"}, "route_prefix", "reserved for the Open Inference Protocol"),
    ({"route_prefix": "/v2/models/cancer"}, "route_prefix", "reserved for the Open Inference Protocol"),
    ({"route_prefix": "/a/../b"}, "route_prefix", "'.' and '..' segments"),
    ({"route_prefix": "/a/./b"}, "route_prefix", "'.' and '..' segments"),
    ({"route_prefix": "//x"}, "route_prefix", "empty path segment"),
    ({"route_prefix": "/a//b"}, "route_prefix", "empty path segment"),
    ({"app": "v2"}, "app 'v2'", "default route '/v2' is taken"),
    ({"max_batch_size": 0}, "max_batch_size", "greater than or equal to 1"),
    ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s", "greater than or equal to 0"),
    ({"deploy_timeout_s": 0}, "deploy_timeout_s", "greater than 0"),
    ({"predictor_config": "{not json"}, "predictor_config", "not JSON"),
    ({"predictor_config": [1, 2]}, "predictor_config", "dictionary"),
    ({"bogus": 1}, "bogus", "unknown option"),
    ({"variants": {"a": {"weight": 60}, "b": {"weight": 30}}}, "variants", "weights sum to 90 (a=60, b=30)"),
    ({"variants": {"a": {"weight": 100}}, "model": "m"}, "model", "inside each entry of 'variants'"),
    ({"variants": {"a": {"weight": 100, "colour": "red"}}}, "variants.0.colour", "unknown option"),
    (
        {"variants": {"a": {"weight": 100}, "b": {"weight": 0, "derived_from": "c"}}},
        "variants.b.derived_from",
        "not another variant",
    ),
    ({"variants": {"a": {"weight": 100, "derived_from": "a"}}}, "variants.a.derived_from", "not another variant"),
    ({"variants": {"a": {"weight": 100, "shadow": "sometimes"}}}, "variants.0.shadow", "valid boolean"),
    ({"parity_rows": "dataset/X_test"}, "parity_rows", "must name an artifact"),
    ({"parity_rtol": -1}, "parity_rtol", "greater than or equal to 0"),
    ({"parity_atol": "tiny"}, "parity_atol", "valid number"),
]


@pytest.mark.parametrize(("options", "option", "expected"), BAD_OPTIONS, ids=[o[1] for o in BAD_OPTIONS])
def test_bad_option_names_itself(options, option, expected):
    with pytest.raises(SpecError) as raised:
        spec(**options)
    message = str(raised.value)
    assert re.search(rf"(^|\n){re.escape(option)}[:,]", message), message
    assert expected in message, message
    assert raised.value.headline == "Invalid @ray_serve option"


def test_bad_app_name():
    with pytest.raises(SpecError, match=r"^app: app 'My App' must be"):
        DeploymentSpec.from_options({"app": "My App"})


def test_decorator_options_come_from_the_spec():
    assert RayServeDecorator.defaults == option_defaults()
    assert list(RayServeDecorator.defaults)[0] == "app"


def test_decorator_docstring_documents_every_option():
    # Metaflow's stub generator reads "name : type, default ..." lines: each option needs one.
    documented = re.findall(r"^    (\w+) : ", RayServeDecorator.__doc__, flags=re.M)
    assert documented == list(RayServeDecorator.defaults)


def test_spec_example_in_docstring_runs():
    import doctest

    import ray_deploy.spec

    assert doctest.testmod(ray_deploy.spec).failed == 0


def test_shadow_variant_takes_no_share():
    built = spec(variants={"main": {"weight": 100}, "mirror": {"model": "other", "shadow": True}})
    mirror = built.variants[1]
    assert mirror.shadow and mirror.weight == 0
    with pytest.raises(SpecError, match="a shadow variant takes no share of traffic"):
        spec(variants={"main": {"weight": 100}, "mirror": {"shadow": True, "weight": 10}})
    with pytest.raises(SpecError, match="every variant is a shadow"):
        spec(variants={"mirror": {"shadow": True}})


@pytest.mark.parametrize("raw", ["0", "-5", "soon"])
def test_a_bad_schedule_stall_is_refused_naming_the_variable(monkeypatch, raw):
    from ray_deploy.control.apply import SchedulingWatch
    from ray_deploy.errors import DeployError

    monkeypatch.setenv("RAY_DEPLOY_SCHEDULE_STALL_S", raw)
    with pytest.raises(
        DeployError, match=rf"RAY_DEPLOY_SCHEDULE_STALL_S: expected a number of seconds above 0, got '{raw}'"
    ):
        SchedulingWatch()
    monkeypatch.setenv("RAY_DEPLOY_SCHEDULE_STALL_S", "12.5")
    assert SchedulingWatch().stall_s == 12.5
    monkeypatch.delenv("RAY_DEPLOY_SCHEDULE_STALL_S")
    assert SchedulingWatch().stall_s == 30.0


@pytest.mark.parametrize(
    ("one", "other", "overlap"),
    [
        ("/seed", "/seed/feedback", True),
        ("/seed/feedback", "/seed", True),
        ("/seed", "/seed", True),
        ("/", "/seed", True),
        ("/seed", "/seedling", False),
        ("/seed/a", "/seed/b", False),
        ("/cancer", "/iris", False),
    ],
)
def test_routes_overlap_when_one_holds_the_other(one, other, overlap):
    from ray_deploy.spec import routes_overlap

    assert routes_overlap(one, other) is overlap
