import numpy as np
import pytest
import xgboost as xgb
from sklearn.datasets import load_breast_cancer, load_iris

from ray_deploy import PredictorError, check_parity, xgboost_to_onnx


@pytest.fixture(scope="module")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    return X, y


def test_onnx_export_of_xgboost_passes_parity(cancer):
    X, y = cancer
    model = xgb.XGBClassifier(n_estimators=30, max_depth=3, n_jobs=1).fit(X, y)
    exported = xgboost_to_onnx(model)
    held_out = check_parity(("xgb", "xgboost", model, {}), ("onnx", "onnx", exported, {}), X[:200])
    assert held_out.ok, held_out.summary()
    assert held_out.compared == "probabilities" and held_out.rows == 200
    generated = check_parity(("xgb", "xgboost", model, {}), ("onnx", "onnx", exported, {}))
    assert generated.ok and "generated rows" in generated.summary()


def test_multiclass_export_passes_parity():
    X, y = load_iris(return_X_y=True)
    model = xgb.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1).fit(X, y)
    report = check_parity(("xgb", "xgboost", model, {}), ("onnx", "onnx", xgboost_to_onnx(model), {}), X)
    assert report.ok, report.summary()


def test_a_different_model_fails_with_its_worst_rows(cancer):
    X, y = cancer
    model = xgb.XGBClassifier(n_estimators=30, max_depth=3, n_jobs=1).fit(X, y)
    other = xgb.XGBClassifier(n_estimators=5, max_depth=1, n_jobs=1).fit(X, y)
    report = check_parity(("xgb", "xgboost", model, {}), ("onnx", "onnx", xgboost_to_onnx(other), {}), X[:200])
    assert not report.ok
    assert report.worst and report.worst[0]["diff"] >= report.worst[-1]["diff"]
    assert "FAILS" in report.summary() and "worst rows: row" in report.summary()


def test_unfaithful_objective_is_refused(cancer):
    X, y = cancer
    survival = xgb.XGBRegressor(objective="survival:cox", n_estimators=5, n_jobs=1).fit(X, np.where(y == 1, 5.0, -3.0))
    with pytest.raises(PredictorError, match="'survival:cox' does not convert faithfully"):
        xgboost_to_onnx(survival)


def test_named_columns_are_refused(cancer):
    import pandas as pd

    X, y = cancer
    frame = pd.DataFrame(X, columns=[f"col{i}" for i in range(X.shape[1])])
    model = xgb.XGBClassifier(n_estimators=5, n_jobs=1).fit(frame, y)
    with pytest.raises(PredictorError, match="feature names f0..fN"):
        xgboost_to_onnx(model)
