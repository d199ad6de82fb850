import numpy as np
import pytest
import xgboost as xgb
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

from ray_deploy import PredictorError, choose_predictor, load_predictor_class
from ray_deploy.models.predictors import build_predictor


@pytest.fixture(scope="module")
def data():
    X, y = load_breast_cancer(return_X_y=True)
    return X[:400], y[:400], X[400:]


@pytest.fixture(scope="module")
def classifier(data):
    X, y, _ = data
    return xgb.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1).fit(X, y)


def test_xgboost_predictor_answers_like_the_model(classifier, data):
    rows = data[2]
    labels = build_predictor("xgboost", classifier, {})
    probabilities = build_predictor("xgboost", classifier, {"output": "probability"})
    assert labels.n_features == 30
    np.testing.assert_array_equal(labels.predict(rows), classifier.predict(rows))
    np.testing.assert_allclose(probabilities.predict(rows), classifier.predict_proba(rows))


def test_xgboost_booster_is_served_raw(classifier, data):
    booster = classifier.get_booster()
    predictor = build_predictor("xgboost", booster, {})
    np.testing.assert_allclose(predictor.predict(data[2]), classifier.predict_proba(data[2])[:, 1], rtol=1e-6)


def test_onnx_predictor_matches_xgboost(classifier, data):
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    onnx_model = convert_xgboost(classifier, initial_types=[("input", FloatTensorType([None, 30]))])
    rows = data[2]
    as_bytes = build_predictor("onnx", onnx_model.SerializeToString(), {})
    as_proto = build_predictor("onnx", onnx_model, {"output": "probability"})
    assert as_bytes.n_features == 30
    np.testing.assert_array_equal(as_bytes.predict(rows), classifier.predict(rows))
    np.testing.assert_allclose(as_proto.predict(rows), classifier.predict_proba(rows), rtol=1e-5, atol=1e-6)


def test_python_predictor_uses_predict_and_predict_proba(data):
    X, y, rows = data
    model = LogisticRegression(max_iter=5000).fit(X, y)
    np.testing.assert_array_equal(build_predictor("python", model, {}).predict(rows), model.predict(rows))
    np.testing.assert_allclose(
        build_predictor("python", model, {"output": "probability"}).predict(rows), model.predict_proba(rows)
    )


def test_auto_picks_by_type(classifier):
    assert choose_predictor(classifier) == "xgboost"
    assert choose_predictor(classifier.get_booster()) == "xgboost"
    assert choose_predictor(b"\x08\x07") == "onnx"
    assert choose_predictor(LogisticRegression()) == "python"
    with pytest.raises(PredictorError, match=r"predictor='auto' cannot serve a builtins.dict"):
        choose_predictor({"weights": [1, 2]})


@pytest.mark.parametrize(
    ("name", "model", "config", "expected"),
    [
        ("xgboost", "not a model", {}, "needs an xgboost.XGBModel"),
        ("onnx", b"not onnx", {}, "onnxruntime cannot load"),
        ("onnx", 42, {}, "needs ONNX bytes"),
        ("python", object(), {}, "predict() method"),
        ("xgboost", None, {"output": "logits"}, "predictor_config.output: got 'logits'"),
    ],
)
def test_predictor_refuses_what_it_cannot_serve(name, model, config, expected, classifier):
    with pytest.raises(PredictorError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        build_predictor(name, classifier if model is None else model, config)


def test_user_predictor_from_a_code_dir(tmp_path):
    (tmp_path / "mine.py").write_text(
        "class Doubler:\n"
        "    payload_format = 'json'\n"
        "    def __init__(self, model, config):\n"
        "        self.factor = config.get('factor', 2)\n"
        "    def predict(self, payload):\n"
        "        return [x * self.factor for x in payload['instances']]\n"
    )
    predictor = build_predictor("mine:Doubler", None, {"factor": 3}, code_dir=str(tmp_path))
    assert predictor.predict({"instances": [1, 2]}) == [3, 6]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("nowhere_module_xyz:Thing", "cannot import module 'nowhere_module_xyz'"),
        ("json:Missing", "has no class 'Missing'"),
        ("json:JSONDecodeError", "has no predict(self, payload) method"),
    ],
)
def test_user_predictor_errors_name_the_problem(name, expected):
    with pytest.raises(PredictorError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_predictor_class(name)


def machine_gpus() -> list[str]:
    """The NVIDIA GPUs this process may use, counted as Ray counts them for a head it starts:
    CUDA_VISIBLE_DEVICES when set, else every device NVML finds (none without a GPU or driver)."""
    from ray._private.accelerators import NvidiaGPUAcceleratorManager as nvidia

    visible = nvidia.get_current_process_visible_accelerator_ids()
    if visible is not None:
        return [str(gpu) for gpu in visible]
    return [str(index) for index in range(nvidia.get_current_node_num_accelerators())]


GPUS = machine_gpus()
# What Ray would set for a replica holding one GPU: the machine's first, or "0" where there is none.
GPU = GPUS[0] if GPUS else "0"


def onnx_cuda_provider() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_gpu_replicas_try_the_gpu_path_and_say_which_path_ran(classifier, data, monkeypatch):
    """With CUDA_VISIBLE_DEVICES set (as Ray sets it for a replica holding a GPU) the built-ins try
    their GPU path; where it cannot run (no GPU, no CUDA build) they fall back to the CPU, answer
    the same, and say why. Which path a predictor took is what it reports; a GPU path is only
    accepted where this machine has a GPU."""
    import copy

    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    onnx_model = convert_xgboost(classifier, initial_types=[("input", FloatTensorType([None, 30]))])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert build_predictor("xgboost", copy.deepcopy(classifier), {}).device == "cpu"
    assert build_predictor("onnx", onnx_model, {}).device == "cpu"

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU)
    on_gpu_node = build_predictor("xgboost", copy.deepcopy(classifier), {})
    if on_gpu_node.device.startswith("cuda"):
        assert GPUS and on_gpu_node.device == f"cuda (GPU {GPU})", on_gpu_node.device
    else:
        assert on_gpu_node.device.startswith(f"cpu (GPU {GPU} assigned;"), on_gpu_node.device
    np.testing.assert_array_equal(on_gpu_node.predict(data[2]), classifier.predict(data[2]))

    onnx_on_gpu_node = build_predictor("onnx", onnx_model, {})
    if onnx_on_gpu_node.device.startswith("cuda"):
        assert GPUS and onnx_cuda_provider() and onnx_on_gpu_node.device == f"cuda (GPU {GPU})"
    else:
        assert onnx_on_gpu_node.device.startswith(f"cpu (GPU {GPU} assigned;"), onnx_on_gpu_node.device
        if not onnx_cuda_provider():
            assert "install onnxruntime-gpu" in onnx_on_gpu_node.device
    np.testing.assert_array_equal(onnx_on_gpu_node.predict(data[2]), classifier.predict(data[2]))


@pytest.mark.skipif(not GPUS, reason="needs a GPU: no NVIDIA GPU visible to this process")
def test_cuda_paths_run_on_the_gpu_and_answer_like_the_cpu(classifier, data, monkeypatch):
    """On a replica holding a GPU: XGBoost predicts on CUDA (its wheels are built with CUDA); ONNX
    runs on onnxruntime's CUDA provider when onnxruntime-gpu is installed, and otherwise says that
    it needs it. Both answer like the model on the CPU."""
    import copy
    import json

    import xgboost
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    rows = data[2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU)

    labels = build_predictor("xgboost", copy.deepcopy(classifier), {})
    probabilities = build_predictor("xgboost", copy.deepcopy(classifier), {"output": "probability"})
    if xgboost.build_info().get("USE_CUDA"):
        assert labels.device == f"cuda (GPU {GPU})", labels.device
        config = json.loads(labels.booster.save_config())
        assert config["learner"]["generic_param"]["device"].startswith("cuda")
    else:
        assert labels.device.startswith(f"cpu (GPU {GPU} assigned;"), labels.device
    np.testing.assert_array_equal(labels.predict(rows), classifier.predict(rows))
    np.testing.assert_allclose(probabilities.predict(rows), classifier.predict_proba(rows), rtol=1e-5, atol=1e-6)

    onnx_model = convert_xgboost(classifier, initial_types=[("input", FloatTensorType([None, 30]))])
    on_gpu = build_predictor("onnx", onnx_model, {"output": "probability"})
    if onnx_cuda_provider():
        assert on_gpu.device == f"cuda (GPU {GPU})", on_gpu.device
        assert on_gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    else:
        assert on_gpu.device.startswith(f"cpu (GPU {GPU} assigned;") and "install onnxruntime-gpu" in on_gpu.device
    np.testing.assert_allclose(on_gpu.predict(rows), classifier.predict_proba(rows), rtol=1e-4, atol=1e-5)
