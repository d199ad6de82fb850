"""Built-in predictor for XGBoost models (scikit-learn API estimators and raw Boosters)."""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np

from ray_deploy.errors import PredictorError
from ray_deploy.models.predictors.base import Predictor, config_choice, visible_gpus


class XGBoostPredictor(Predictor):
    """Serves ``xgboost.XGBModel`` subclasses and ``xgboost.Booster``.

    predictor_config:
        output: "label" (default; class labels for classifiers, values for regressors),
            "probability" (``predict_proba`` rows), or "raw" (the booster's output as is).

    On a replica that holds a GPU (``CUDA_VISIBLE_DEVICES``), the booster runs with
    ``device="cuda"`` when XGBoost finds the GPU usable, and on the CPU otherwise; ``device``
    says which, and why.
    """

    def __init__(self, model: Any, config: dict[str, Any]):
        super().__init__(model, config)
        import xgboost

        self.output = config_choice(self.config, "output", ("label", "probability", "raw"), "label")
        if isinstance(model, xgboost.XGBModel):
            self.booster = model.get_booster()
            self.estimator = model
        elif isinstance(model, xgboost.Booster):
            self.booster = model
            self.estimator = None
        else:
            raise PredictorError(
                f"predictor 'xgboost' needs an xgboost.XGBModel or xgboost.Booster, got {type(model).__name__}"
            )
        self.n_features = int(self.booster.num_features())
        if self.output == "probability" and not hasattr(self.estimator, "predict_proba"):
            raise PredictorError("predictor_config.output='probability' needs an XGBoost classifier")
        self.device = self._choose_device()

    def _choose_device(self) -> str:
        gpus = visible_gpus()
        if not gpus:
            return "cpu"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.booster.set_param({"device": "cuda"})
                self.booster.inplace_predict(np.zeros((1, max(self.n_features, 1))))
            # XGBoost quietly moves to the CPU when it cannot use the GPU; its config says so.
            device = json.loads(self.booster.save_config())["learner"]["generic_param"]["device"]
        except Exception as exc:
            device, reason = "cpu", f"{type(exc).__name__}: {exc}"
        else:
            reason = "XGBoost found no usable GPU"
        if device.startswith("cuda"):
            return f"cuda (GPU {','.join(gpus)})"
        self.booster.set_param({"device": "cpu"})
        return f"cpu (GPU {','.join(gpus)} assigned; {reason[:200]})"

    def predict(self, payload: np.ndarray) -> Any:
        if self.estimator is None or self.output == "raw":
            return self.booster.inplace_predict(payload)
        if self.output == "probability":
            return self.estimator.predict_proba(payload)
        return self.estimator.predict(payload)
