"""ray_deploy: serve models as versioned Ray Serve applications, with or without Metaflow.

The public names live here; everything else is internal and may change.

Each name is imported from its module on first use (PEP 562): `import metaflow` loads this package
as a Metaflow extension in every flow and task process, and should not pay for the engine there.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC: dict[str, tuple[str, ...]] = {
    "ray_deploy.cli": ("app_lines", "parse_weights", "print_lineage"),
    "ray_deploy.cluster": ("ClusterInfo", "cluster_status", "connect", "start_local_cluster", "stop_local_cluster"),
    "ray_deploy.control.deploy": ("DeployResult", "deploy"),
    "ray_deploy.control.endpoint": ("Endpoint",),
    "ray_deploy.control.export": ("kuberay_manifest", "serve_config"),
    "ray_deploy.control.operate": ("promote", "rollback", "set_traffic"),
    "ray_deploy.control.restore": ("restore",),
    "ray_deploy.control.status": (
        "app_serving_config",
        "app_status",
        "delete_app",
        "delete_apps",
        "trace_app",
        "trace_model",
    ),
    "ray_deploy.errors": (
        "ArtifactError",
        "ClusterError",
        "ClusterUnreachable",
        "DeployError",
        "LineageError",
        "ParityError",
        "PredictorError",
        "RayDeployError",
        "RegistryUnreachable",
        "RolloutFailed",
        "RolloutStateError",
        "SpecError",
    ),
    "ray_deploy.models.artifacts": ("ModelRef", "load_model", "metaflow_model_ref"),
    "ray_deploy.models.convert": ("ONNX_CONVERTIBLE_OBJECTIVES", "xgboost_to_onnx"),
    "ray_deploy.models.parity": ("ParityReport", "check_parity"),
    "ray_deploy.models.predictors": ("Predictor", "RequestError", "choose_predictor", "load_predictor_class"),
    "ray_deploy.progress": ("report",),
    "ray_deploy.registry.lineage": (
        "DataRef",
        "LineageSource",
        "Registry",
        "VersionRef",
        "code_version",
        "data_ref_from_pathspec",
        "flatten_metrics",
        "origin_of",
    ),
    "ray_deploy.serving.capture": ("read_captures", "read_labels"),
    "ray_deploy.spec": ("CaptureSpec", "DeploymentSpec", "VariantSpec", "option_defaults"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_deploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
