"""ray_deploy: serve models as versioned Ray Serve applications, with or without Metaflow.

The public names live here; everything else is internal and may change.
"""

from ray_deploy.artifacts import ModelRef, load_model, metaflow_model_ref
from ray_deploy.cluster import ClusterInfo, cluster_status, connect, start_local_cluster, stop_local_cluster
from ray_deploy.deploy import DeployResult, app_status, delete_app, deploy
from ray_deploy.errors import (
    ArtifactError,
    ClusterError,
    ClusterUnreachable,
    DeployError,
    PredictorError,
    RayDeployError,
    SpecError,
)
from ray_deploy.predictors import Predictor, RequestError, choose_predictor, load_predictor_class
from ray_deploy.spec import DeploymentSpec, VariantSpec, option_defaults

__all__ = [
    "ArtifactError",
    "ClusterError",
    "ClusterInfo",
    "ClusterUnreachable",
    "DeployError",
    "DeployResult",
    "DeploymentSpec",
    "ModelRef",
    "Predictor",
    "PredictorError",
    "RayDeployError",
    "RequestError",
    "SpecError",
    "VariantSpec",
    "app_status",
    "choose_predictor",
    "cluster_status",
    "connect",
    "delete_app",
    "deploy",
    "load_model",
    "load_predictor_class",
    "metaflow_model_ref",
    "option_defaults",
    "start_local_cluster",
    "stop_local_cluster",
]

__version__ = "0.1.0"
