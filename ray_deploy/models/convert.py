"""Exporting models to ONNX, refusing conversions that cannot be faithful.

onnxmltools converts some XGBoost objectives silently wrong (``survival:cox`` comes out as a
binary classifier), so only objectives known to convert faithfully are accepted.
"""

from __future__ import annotations

import re
from typing import Any

from ray_deploy.errors import PredictorError

ONNX_CONVERTIBLE_OBJECTIVES = frozenset(
    {
        "binary:logistic",
        "binary:logitraw",
        "multi:softprob",
        "multi:softmax",
        "reg:squarederror",
        "reg:linear",
    }
)
"""XGBoost objectives onnxmltools converts with matching outputs (checked by the parity gate)."""

_DEFAULT_FEATURE_NAME = re.compile(r"^f\d+$")


def xgboost_to_onnx(model: Any, n_features: int | None = None) -> bytes:
    """Serialized ONNX for an XGBoost scikit-learn model, with a float input named ``input``.

    Args:
        model: an ``xgboost.XGBClassifier`` or ``XGBRegressor`` (fitted).
        n_features: input width; read from the model when omitted.

    Raises:
        PredictorError: the objective is not on the allowlist, or feature names would not survive.
    """
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    booster = model.get_booster()
    objective = model.get_params().get("objective") or booster.attr("objective") or "unknown"
    if not isinstance(objective, str) or objective not in ONNX_CONVERTIBLE_OBJECTIVES:
        raise PredictorError(
            f"XGBoost objective {objective!r} does not convert faithfully to ONNX; "
            f"supported: {', '.join(sorted(ONNX_CONVERTIBLE_OBJECTIVES))}. Serve the native model instead."
        )
    names = booster.feature_names
    if names and not all(_DEFAULT_FEATURE_NAME.match(name) for name in names):
        raise PredictorError(
            "the ONNX converter needs feature names f0..fN or none; this model was trained with named columns "
            f"({', '.join(names[:3])}, ...): train on a numpy array, or rename the columns"
        )
    width = n_features or int(booster.num_features())
    converted = convert_xgboost(model, initial_types=[("input", FloatTensorType([None, width]))])
    return converted.SerializeToString()
