"""Built-in predictor for MLflow pyfunc models (``models:/...`` or ``runs:/...`` references)."""

from __future__ import annotations

from typing import Any

from ray_deploy.errors import PredictorError
from ray_deploy.models.predictors.base import Predictor, RequestError


class MLflowPredictor(Predictor):
    """Calls ``PyFuncModel.predict`` with a DataFrame (column names kept when the request has them)."""

    payload_format = "dataframe"
    accepts_params = True

    def __init__(self, model: Any, config: dict[str, Any]):
        super().__init__(model, config)
        if not callable(getattr(model, "predict", None)):
            raise PredictorError(f"predictor 'mlflow' needs an MLflow pyfunc model, got {type(model).__name__}")

    def predict(self, payload: Any, params: dict[str, Any] | None = None) -> Any:
        try:
            return self.model.predict(payload) if params is None else self.model.predict(payload, params=params)
        except Exception as exc:
            from mlflow.exceptions import MlflowException

            # The model's signature refused the input (missing or extra columns, wrong types): the
            # caller's mistake, answered with MLflow's own status (400) as `mlflow models serve` does.
            if isinstance(exc, MlflowException) and exc.get_http_status_code() == 400:
                detail = exc.message.rsplit("Error: ", 1)[-1]  # the schema message quotes the whole input first
                raise RequestError(f"the model's input schema refused the request: {detail}") from exc
            raise
