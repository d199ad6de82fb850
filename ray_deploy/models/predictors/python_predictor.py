"""Built-in predictor for any picklable object with ``predict`` (scikit-learn and alike)."""

from __future__ import annotations

from typing import Any

from ray_deploy.errors import PredictorError
from ray_deploy.models.predictors.base import Predictor, config_choice


class PythonPredictor(Predictor):
    """Calls the model's ``predict`` (or ``predict_proba`` with ``output="probability"``).

    predictor_config:
        output: "label" (default) or "probability".
    """

    def __init__(self, model: Any, config: dict[str, Any]):
        super().__init__(model, config)
        self.output = config_choice(self.config, "output", ("label", "probability"), "label")
        method = "predict_proba" if self.output == "probability" else "predict"
        self._predict = getattr(model, method, None)
        if not callable(self._predict):
            raise PredictorError(
                f"predictor 'python' needs a model with a {method}() method, got {type(model).__name__}"
            )
        width = getattr(model, "n_features_in_", None)
        self.n_features = int(width) if width is not None else None

    def predict(self, payload: Any) -> Any:
        return self._predict(payload)
