"""ray_deploy: serve models as versioned Ray Serve applications, with or without Metaflow.

The public names live here; everything else is internal and may change.
"""

from ray_deploy.artifacts import ModelRef, load_model, metaflow_model_ref
from ray_deploy.cluster import ClusterInfo, cluster_status, connect, start_local_cluster, stop_local_cluster
from ray_deploy.convert import ONNX_CONVERTIBLE_OBJECTIVES, xgboost_to_onnx
from ray_deploy.deploy import DeployResult, app_status, delete_app, deploy
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
    SpecError,
)
from ray_deploy.lineage import (
    DataRef,
    LineageSource,
    Registry,
    VersionRef,
    code_version,
    data_ref_from_pathspec,
    flatten_metrics,
    origin_of,
)
from ray_deploy.parity import ParityReport, check_parity
from ray_deploy.predictors import Predictor, RequestError, choose_predictor, load_predictor_class
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
    "RequestError",
    "SpecError",
    "VariantSpec",
    "VersionRef",
    "app_status",
    "check_parity",
    "choose_predictor",
    "cluster_status",
    "code_version",
    "connect",
    "data_ref_from_pathspec",
    "delete_app",
    "deploy",
    "flatten_metrics",
    "load_model",
    "load_predictor_class",
    "metaflow_model_ref",
    "option_defaults",
    "origin_of",
    "start_local_cluster",
    "stop_local_cluster",
    "xgboost_to_onnx",
]

__version__ = "0.1.0"
