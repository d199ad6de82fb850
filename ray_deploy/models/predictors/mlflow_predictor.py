"""Built-in predictor for MLflow pyfunc models (``models:/...`` or ``runs:/...`` references)."""

from __future__ import annotations

from typing import Any

from ray_deploy.errors import PredictorError
from ray_deploy.models.predictors.base import Predictor


class MLflowPredictor(Predictor):
    """Calls ``PyFuncModel.predict`` with a DataFrame (column names kept when the request has them)."""

    payload_format = "dataframe"

    def __init__(self, model: Any, config: dict[str, Any]):
        super().__init__(model, config)
        if not callable(getattr(model, "predict", None)):
            raise PredictorError(f"predictor 'mlflow' needs an MLflow pyfunc model, got {type(model).__name__}")

    def predict(self, payload: Any) -> Any:
        return self.model.predict(payload)
