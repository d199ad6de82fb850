"""ray_deploy: serve models as versioned Ray Serve applications, with or without Metaflow.

The public names live here; everything else is internal and may change.
"""

from ray_deploy.cli import app_lines, parse_weights, print_lineage
from ray_deploy.cluster import ClusterInfo, cluster_status, connect, start_local_cluster, stop_local_cluster
from ray_deploy.control.deploy import DeployResult, deploy
from ray_deploy.control.export import kuberay_manifest, serve_config
from ray_deploy.control.operate import promote, rollback, set_traffic
from ray_deploy.control.restore import restore
from ray_deploy.control.status import app_serving_config, app_status, delete_app, delete_apps, trace_app, trace_model
from ray_deploy.errors import (
    ArtifactError,
    ClusterError,
    ClusterUnreachable,
    DeployError,
    LineageError,
    ParityError,
    PredictorError,
    RayDeployError,
    RegistryUnreachable,
    RolloutFailed,
    RolloutStateError,
    SpecError,
)
from ray_deploy.models.artifacts import ModelRef, load_model, metaflow_model_ref
from ray_deploy.models.convert import ONNX_CONVERTIBLE_OBJECTIVES, xgboost_to_onnx
from ray_deploy.models.parity import ParityReport, check_parity
from ray_deploy.models.predictors import Predictor, RequestError, choose_predictor, load_predictor_class
from ray_deploy.progress import report
from ray_deploy.registry.lineage import (
    DataRef,
    LineageSource,
    Registry,
    VersionRef,
    code_version,
    data_ref_from_pathspec,
    flatten_metrics,
    origin_of,
)
from ray_deploy.spec import DeploymentSpec, VariantSpec, option_defaults

__all__ = [
    "ArtifactError",
    "ClusterError",
    "ClusterInfo",
    "ClusterUnreachable",
    "DataRef",
    "DeployError",
    "DeployResult",
    "DeploymentSpec",
    "LineageError",
    "LineageSource",
    "ModelRef",
    "ONNX_CONVERTIBLE_OBJECTIVES",
    "ParityError",
    "ParityReport",
    "Predictor",
    "PredictorError",
    "RayDeployError",
    "Registry",
    "RegistryUnreachable",
    "RolloutFailed",
    "RolloutStateError",
    "RequestError",
    "SpecError",
    "VariantSpec",
    "VersionRef",
    "app_lines",
    "app_serving_config",
    "app_status",
    "check_parity",
    "choose_predictor",
    "cluster_status",
    "code_version",
    "connect",
    "data_ref_from_pathspec",
    "delete_app",
    "delete_apps",
    "deploy",
    "flatten_metrics",
    "kuberay_manifest",
    "load_model",
    "load_predictor_class",
    "metaflow_model_ref",
    "option_defaults",
    "origin_of",
    "parse_weights",
    "print_lineage",
    "promote",
    "report",
    "restore",
    "rollback",
    "serve_config",
    "set_traffic",
    "start_local_cluster",
    "stop_local_cluster",
    "trace_app",
    "trace_model",
    "xgboost_to_onnx",
]

__version__ = "0.1.0"
