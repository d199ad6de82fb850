"""The Open Inference Protocol v2 with the clients people use: NVIDIA's ``tritonclient.http`` (binary
tensors by default) and KServe's REST client, at the server's root through the front, on an app that
A/B tests an XGBoost model against its ONNX export (with a shadow), and on the session's app."""

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

import ray_deploy

pytestmark = pytest.mark.integration

APP = "oip-ab"
ROWS = 40
OIP_STEPS = f"""
@step
def start(self):
    import xgboost as xgb
    from sklearn.datasets import load_breast_cancer
    from ray_deploy import xgboost_to_onnx

    X, y = load_breast_cancer(return_X_y=True)
    self.rows = X[:{ROWS}]
    self.model = xgb.XGBClassifier(n_estimators=30, max_depth=3, n_jobs=1, random_state=0).fit(X, y)
    self.model_onnx = xgboost_to_onnx(self.model)
    self.next(self.deploy)
"""
OIP_OPTIONS = (
    f'app="{APP}", num_cpus=0.25, variants={{"xgb": {{"model": "model", "predictor": "xgboost", "weight": 50}}, '
    '"onnx": {"model": "model_onnx", "predictor": "onnx", "weight": 50}, '
    '"mirror": {"model": "model_onnx", "predictor": "onnx", "shadow": True}}'
)


@pytest.fixture(scope="module")
def ab(ray_head, write_flow, tmp_path_factory):
    """The module's app, deployed once by a flow run: its variants (name -> summary), the rows and
    what each model predicts for them, computed here from the same artifacts."""
    import onnxruntime
    from metaflow import Runner

    flow = write_flow(tmp_path_factory.mktemp("oip") / "oip_flow.py", "OIPFlow", OIP_STEPS, OIP_OPTIONS)
    with Runner(str(flow), show_output=False, cwd=str(flow.parent)).run() as running:
        if running.status != "successful":
            pytest.fail(f"OIPFlow failed:\n{running.stdout[-3000:]}\n{running.stderr[-6000:]}")
        run = running.run
    data = run["start"].task.data
    session = onnxruntime.InferenceSession(data.model_onnx, providers=["CPUExecutionProvider"])
    rows = np.asarray(data.rows)
    return {
        "url": run["deploy"].task.data.ray_serve["url"],
        "variants": {v["name"]: v for v in run["deploy"].task.data.ray_serve["variants"]},
        "rows": rows,
        "expected": {
            "xgb": data.model.predict(rows.astype(np.float32)),
            "onnx": session.run(["label"], {"input": rows.astype(np.float32)})[0],
        },
    }


@pytest.fixture(scope="module")
def client(ray_head):
    client = triton.InferenceServerClient(ray_head.http_url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def number(variant: dict) -> str:
    """The version the protocol names a variant by: its registered model version number."""
    return variant["model_version"].rsplit("/", 1)[1]


def rows_input(rows: np.ndarray, datatype: str = "FP32", binary: bool = True) -> triton.InferInput:
    array = rows.astype(np.float32 if datatype == "FP32" else np.float64)
    return triton.InferInput("input", list(array.shape), datatype).set_data_from_numpy(array, binary_data=binary)


def test_server_health_and_metadata_at_the_root(client, ab, cancer_url):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata() == {
        "name": "ray-deploy",
        "version": ray_deploy.__version__,
        "extensions": ["binary_tensor_data"],
    }
    assert client.is_model_ready(APP) and client.is_model_ready("cancer")
    for variant in ab["variants"].values():
        assert client.is_model_ready(APP, number(variant))
    assert not client.is_model_ready(APP, "999") and not client.is_model_ready("nowhere")


def test_model_metadata_comes_from_the_models(client, ab, train_run):
    versions = sorted(number(v) for v in ab["variants"].values())
    xgb, onnx = ab["variants"]["xgb"], ab["variants"]["onnx"]
    rows_of_30 = [{"name": "input", "datatype": "FP64", "shape": [-1, 30]}]
    labels = [{"name": "predictions", "datatype": "INT64", "shape": [-1]}]
    pinned_xgb = client.get_model_metadata(APP, number(xgb))
    assert {**pinned_xgb, "versions": sorted(pinned_xgb["versions"])} == {
        "name": APP,
        "versions": versions,
        "platform": "xgboost",
        "inputs": rows_of_30,
        "outputs": labels,
    }
    # The ONNX release: the graph's input and the served output, typed as the session types them.
    pinned_onnx = client.get_model_metadata(APP, onnx["label"])
    assert pinned_onnx["platform"] == "onnxruntime_onnx"
    assert pinned_onnx["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
    assert pinned_onnx["outputs"] == labels
    # Unpinned: the variant with the largest share (a tie: the first listed).
    assert client.get_model_metadata(APP) == pinned_xgb
    (cancer,) = train_run["deploy"].task.data.ray_serve["variants"]
    session = client.get_model_metadata("cancer")
    assert session["versions"] == [number(cancer)] and session["platform"] == "xgboost"
    assert session["inputs"] == rows_of_30


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize("binary_output", [True, False], ids=["binary-answer", "json-answer"])
def test_tritonclient_infers_what_the_model_predicts(client, ab, datatype, binary_output):
    xgb = ab["variants"]["xgb"]
    outputs = [triton.InferRequestedOutput("predictions", binary_data=binary_output)]
    result = client.infer(
        APP, [rows_input(ab["rows"], datatype)], model_version=number(xgb), outputs=outputs, request_id="t-1"
    )
    answer = result.get_response()
    assert answer["model_name"] == APP and answer["model_version"] == number(xgb) and answer["id"] == "t-1"
    (output,) = answer["outputs"]
    assert ("parameters" in output) == binary_output and ("data" in output) != binary_output
    np.testing.assert_array_equal(result.as_numpy("predictions"), ab["expected"]["xgb"])


def test_every_variant_answers_when_its_version_is_pinned(client, ab):
    for name in ("xgb", "onnx", "mirror"):
        variant = ab["variants"][name]
        for version in (number(variant), variant["label"]):
            result = client.infer(APP, [rows_input(ab["rows"], binary=False)], model_version=version)
            assert result.get_response()["model_version"] == number(variant), (name, version)
            expected = ab["expected"]["xgb" if name == "xgb" else "onnx"]
            np.testing.assert_array_equal(result.as_numpy("predictions"), expected)


def test_unpinned_requests_split_by_weight_and_stick_to_a_request_key(client, ab):
    by_version = {number(v): name for name, v in ab["variants"].items()}
    one_row = [rows_input(ab["rows"][:1])]
    seen = {}
    for key in (f"user-{i}" for i in range(24)):
        answered = {
            client.infer(APP, one_row, headers={"X-Request-Key": key}).get_response()["model_version"] for _ in range(3)
        }
        assert len(answered) == 1, (key, answered)
        seen[key] = by_version[answered.pop()]
    assert set(seen.values()) == {"xgb", "onnx"}  # never the shadow


def test_refusals_reach_the_client_as_errors_naming_the_problem(client, ab):
    wide = triton.InferInput("input", [1, 3], "FP32").set_data_from_numpy(np.ones((1, 3), np.float32))
    with pytest.raises(InferenceServerException, match="each row needs 30 features, got 3"):
        client.infer(APP, [wide])
    with pytest.raises(InferenceServerException, match="no model 'nowhere' on this server; its models: .*oip-ab"):
        client.infer("nowhere", [rows_input(ab["rows"][:1])])
    with pytest.raises(InferenceServerException, match="version '999' of model 'oip-ab' is not loaded; loaded: "):
        client.infer(APP, [rows_input(ab["rows"][:1])], model_version="999")
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata(APP, "999")
    for variant in ab["variants"].values():  # the loaded ones, by number and label
        assert f"{number(variant)} ({variant['label']})" in str(unknown.value)
    assert client.is_server_ready()  # the replica keeps serving


def test_oip_requests_count_per_variant_and_reach_the_shadow(client, ab):
    """Infer requests are counted where rollout gates read (the variant's stats) and copied to the shadow."""
    from ray_deploy import app_status

    def metrics() -> dict:
        row = app_status(APP)[0]
        return {v["name"]: row["metrics"].get(v["label"], {}) for v in row["variants"]}

    before = metrics()
    sent = 25
    for index in range(sent):
        client.infer(APP, [rows_input(ab["rows"][index : index + 1])], model_version=number(ab["variants"]["xgb"]))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = metrics()
        grown = after["xgb"].get("requests", 0) - before["xgb"].get("requests", 0)
        compared = after["mirror"].get("shadow_compared", 0) - before["mirror"].get("shadow_compared", 0)
        if grown >= sent and compared >= sent:
            break
        time.sleep(1)
    assert grown >= sent and compared >= sent, (before, after)
    assert after["xgb"]["errors"] == 0 and after["mirror"]["errors"] == 0


def test_the_protocol_is_also_served_under_the_apps_route(ab, http):
    """What Serve's own proxy (the ``proxy`` data path) reaches: every route under ``<app URL>/v2``."""
    url, onnx = ab["url"], ab["variants"]["onnx"]
    assert http.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert http.get(f"{url}/v2/models/{APP}/ready").json() == {"name": APP, "ready": True}
    body = {"inputs": [{"name": "input", "shape": [2, 30], "datatype": "FP64", "data": ab["rows"][:2].tolist()}]}
    answer = http.post(f"{url}/v2/models/{APP}/versions/{number(onnx)}/infer", json=body)
    assert answer.status_code == 200 and answer.headers["x-ray-deploy-variant"] == "onnx"
    assert answer.json()["outputs"] == [
        {"name": "predictions", "datatype": "INT64", "shape": [2], "data": ab["expected"]["onnx"][:2].tolist()}
    ]
    assert http.get(f"{url}/v2/models/cancer").status_code == 404  # another app's model is not here
    # A client given the app's URL as its base, as on Serve's own data paths.
    routed = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        assert routed.is_server_ready() and routed.get_model_metadata(APP)["name"] == APP
        result = routed.infer(APP, [rows_input(ab["rows"])], model_version=number(onnx))
        np.testing.assert_array_equal(result.as_numpy("predictions"), ab["expected"]["onnx"])
    finally:
        routed.close()


# --- KServe's REST client, in a venv of its own (kserve_venv.py)


@pytest.fixture(scope="module")
def kserve_python() -> Path:
    """A Python with ``kserve`` installed (built by ``make test`` before the suite, or now)."""
    import importlib.util

    script = Path(__file__).with_name("kserve_venv.py")  # tests import by path (--import-mode=importlib)
    spec = importlib.util.spec_from_file_location("kserve_venv", script)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    try:
        return builder.kserve_python()
    except builder.KServeVenvError as exc:
        pytest.fail(str(exc))


def test_kserve_rest_client(kserve_python, ray_head, ab):
    script = Path(__file__).with_name("kserve_client.py")
    rows = ab["rows"][:5]
    done = subprocess.run(
        [kserve_python, str(script), ray_head.http_url, APP, json.dumps(rows.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout)
    assert seen["live"] is True and seen["ready"] is True and seen["model_ready"] is True
    assert seen["unknown_model_ready"] is False
    for form in ("json", "binary"):
        answer = seen[form]
        assert answer["model_name"] == APP and answer["id"] == f"kserve-{form == 'binary'}"
        assert (answer["output"], answer["datatype"]) == ("predictions", "INT64")
        assert answer["predictions"] == ab["expected"][answer["variant"]][:5].tolist()
    assert "each row needs 30 features, got 3" in seen["refused"]
