"""Predictors: the Predictor protocol, the built-ins, and how a name becomes an instance."""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

from ray_deploy.errors import PredictorError
from ray_deploy.models.predictors.base import Predictor, RequestError

BUILTIN_PREDICTOR_PATHS = {
    "xgboost": "ray_deploy.models.predictors.xgboost_predictor:XGBoostPredictor",
    "onnx": "ray_deploy.models.predictors.onnx_predictor:ONNXPredictor",
    "python": "ray_deploy.models.predictors.python_predictor:PythonPredictor",
    "mlflow": "ray_deploy.models.predictors.mlflow_predictor:MLflowPredictor",
}
PAYLOAD_FORMATS = ("array", "dataframe", "json")

__all__ = [
    "BUILTIN_PREDICTOR_PATHS",
    "Predictor",
    "RequestError",
    "build_predictor",
    "choose_predictor",
    "load_predictor_class",
]


def choose_predictor(model: Any) -> str:
    """The built-in predictor that ``predictor="auto"`` picks for a model object.

    Raises:
        PredictorError: no built-in fits; the message says which predictor to set instead.

    Example:
        >>> choose_predictor(b"...onnx bytes...")
        'onnx'
    """
    module = type(model).__module__ or ""
    if module.split(".")[0] == "xgboost" and (hasattr(model, "get_booster") or type(model).__name__ == "Booster"):
        return "xgboost"
    if isinstance(model, (bytes, bytearray)) or module.startswith("onnx"):
        return "onnx"
    if module.startswith("mlflow") and callable(getattr(model, "predict", None)):
        return "mlflow"
    if callable(getattr(model, "predict", None)):
        return "python"
    raise PredictorError(
        f"predictor='auto' cannot serve a {type(model).__module__}.{type(model).__qualname__}: it is not an "
        "XGBoost model, ONNX bytes or an object with predict(); set predictor='module:Class' to a class of yours"
    )


def import_user_module(module_name: str, code_dir: str | None = None) -> Any:
    """Import a user's module from ``code_dir`` (put first on ``sys.path``) or the installed packages.

    Raises:
        ImportError: saying which module and where it was looked for.
    """
    if code_dir and code_dir not in sys.path:
        sys.path.insert(0, code_dir)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        where = f" (looked in {code_dir} and the installed packages)" if code_dir else ""
        raise ImportError(f"cannot import module {module_name!r}{where}: {exc}") from exc


def load_predictor_class(name: str, code_dir: str | None = None) -> type:
    """Import a predictor class from a built-in name or a ``module:Class`` path.

    Args:
        name: ``xgboost``, ``onnx``, ``python``, ``mlflow`` or ``module:Class``.
        code_dir: a directory to import user modules from (put first on ``sys.path``).

    Raises:
        PredictorError: the module or class is missing, or the class lacks ``predict``.
    """
    path = BUILTIN_PREDICTOR_PATHS.get(name, name)
    if ":" not in path:
        raise PredictorError(
            f"predictor {name!r} is not a built-in ({', '.join(BUILTIN_PREDICTOR_PATHS)}) nor 'module:Class'"
        )
    module_name, class_name = path.split(":", 1)
    try:
        module = import_user_module(module_name, code_dir)
    except ImportError as exc:
        raise PredictorError(f"predictor {name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise PredictorError(f"predictor {name!r}: module {module_name!r} has no class {class_name!r}")
    if not callable(getattr(cls, "predict", None)):
        raise PredictorError(f"predictor {name!r}: class {class_name} has no predict(self, payload) method")
    payload_format = getattr(cls, "payload_format", "array")
    if payload_format not in PAYLOAD_FORMATS:
        raise PredictorError(
            f"predictor {name!r}: payload_format is {payload_format!r}; expected one of {', '.join(PAYLOAD_FORMATS)}"
        )
    return cls


def build_predictor(name: str, model: Any, config: dict[str, Any], code_dir: str | None = None) -> Any:
    """Instantiate a predictor around a loaded model.

    Raises:
        PredictorError: the class cannot be loaded or its ``__init__`` refused the model.
    """
    cls = load_predictor_class(name, code_dir)
    try:
        return cls(model, dict(config))
    except PredictorError:
        raise
    except Exception as exc:
        raise PredictorError(f"predictor {name!r} failed to initialise: {type(exc).__name__}: {exc}") from exc
