"""The benchmark's model: the example flow's XGBoost classifier and its ONNX export, built locally.

Like ``flows/train_flow.py``: scikit-learn's bundled breast-cancer data (nothing is downloaded),
split 75/25 with the flow's seed, an ``XGBClassifier`` of the flow's "deep" strategy (100 trees,
depth 6). Unlike the flow, only the first ``N_FEATURES`` = 20 columns are used (the issue's
"100 trees, 20 features"): the ten "mean" and ten "standard error" measurements. The ONNX export
comes from ``ray_deploy.xgboost_to_onnx``, as an A/B flow would make it.

``store_models`` writes both models into a local Metaflow content-addressed store, the way a
flow's step would, and returns the ``ray_deploy.ModelRef`` of each: ``ray_deploy.control.deploy`` only
takes models by reference, and Metaflow artifact references are what the package's replicas load.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

N_FEATURES = 20
MAX_ROWS_PER_REQUEST = 1024
N_TREES = 100
MAX_DEPTH = 6
SEED = 7
TEST_SIZE = 0.25
FLOW_NAME = "BenchmarkModels"
"""The Metaflow flow name the stored models are filed under (no such flow runs)."""
PICKLE_PROTOCOL = 4
"""The protocol Metaflow's own artifact serializer uses."""


@dataclass(frozen=True)
class BenchmarkModels:
    """The trained XGBoost model, its ONNX bytes, and one held-out row to send."""

    xgboost: Any
    onnx_bytes: bytes
    row: list[float]
    rows: list[list[float]]
    """The held-out rows, repeated to ``MAX_ROWS_PER_REQUEST``: what batch requests send."""
    accuracy: float
    onnx_path: Path

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": "sklearn.datasets.load_breast_cancer",
            "features": N_FEATURES,
            "feature_choice": f"first {N_FEATURES} columns (mean and standard-error measurements)",
            "trees": N_TREES,
            "max_depth": MAX_DEPTH,
            "seed": SEED,
            "test_accuracy": round(self.accuracy, 4),
            "onnx_bytes": len(self.onnx_bytes),
            "onnx_sha256": hashlib.sha256(self.onnx_bytes).hexdigest(),
        }


def build_models(directory: Path) -> BenchmarkModels:
    """Train the classifier, export it to ONNX and write ``model.onnx`` into ``directory``."""
    import xgboost as xgb
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    from ray_deploy import xgboost_to_onnx

    data = load_breast_cancer()
    features = np.ascontiguousarray(data.data[:, :N_FEATURES])
    X_train, X_test, y_train, y_test = train_test_split(
        features, data.target, test_size=TEST_SIZE, random_state=SEED, stratify=data.target
    )
    model = xgb.XGBClassifier(n_estimators=N_TREES, max_depth=MAX_DEPTH, learning_rate=0.1, n_jobs=1, random_state=SEED)
    model.fit(X_train, y_train)
    accuracy = float((model.predict(X_test) == y_test).mean())
    onnx_bytes = xgboost_to_onnx(model, n_features=N_FEATURES)
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / "model.onnx"
    onnx_path.write_bytes(onnx_bytes)
    return BenchmarkModels(
        xgboost=model,
        onnx_bytes=onnx_bytes,
        row=[float(x) for x in X_test[0]],
        rows=[[float(x) for x in X_test[i % len(X_test)]] for i in range(MAX_ROWS_PER_REQUEST)],
        accuracy=accuracy,
        onnx_path=onnx_path,
    )


def store_models(models: BenchmarkModels, datastore_root: Path) -> dict[str, Any]:
    """Store both models in a local Metaflow datastore; returns ``{"onnx": ModelRef, "xgboost": ModelRef}``.

    The blobs are pickled as Metaflow pickles artifacts and saved through Metaflow's own
    ``ContentAddressedStore``, so replicas read them exactly as they read a flow's artifacts
    (and check their sha256 first).
    """
    from metaflow.datastore.content_addressed_store import ContentAddressedStore
    from metaflow.plugins.datastores.local_storage import LocalStorage

    from ray_deploy import ModelRef
    from ray_deploy.models.artifacts import METAFLOW_SCHEME, python_type_name

    datastore_root.mkdir(parents=True, exist_ok=True)
    storage = LocalStorage(str(datastore_root))
    store = ContentAddressedStore(storage.path_join(FLOW_NAME, "data"), storage)
    refs = {}
    for name, value in (("onnx", models.onnx_bytes), ("xgboost", models.xgboost)):
        blob = pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        (saved,) = store.save_blobs(iter([blob]), len_hint=1)
        refs[name] = ModelRef(
            kind="metaflow",
            uri=f"{METAFLOW_SCHEME}{FLOW_NAME}/1/build/1/model_{name}",
            sha256=hashlib.sha256(blob).hexdigest(),
            blob_key=saved.key,
            datastore_type=LocalStorage.TYPE,
            datastore_root=str(datastore_root),
            python_type=python_type_name(value),
        )
    return refs
