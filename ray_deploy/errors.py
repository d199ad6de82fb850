"""Errors raised by ray_deploy.

Every error carries a ``headline`` (a short title that the Metaflow glue shows as the
exception's headline) and a message that says what came in, what was expected and the fix.

    RayDeployError
    ├── SpecError                 an option or config value is invalid
    ├── ArtifactError             a model artifact is missing, unreadable or fails its hash check
    ├── PredictorError            a predictor cannot be found, imported or built
    ├── ParityError               a derived variant does not answer like its source
    ├── ClusterError              Ray cannot be reached or started
    │   └── ClusterUnreachable    nothing answers at the address tried
    ├── DeployError               the app did not become healthy; the previous version keeps serving
    │   ├── RolloutFailed         a rollout gate failed; traffic went back to the old release
    │   ├── RolloutStateError     a move the rollout state machine does not allow (e.g. promote, no rollout)
    │   └── AppLocked             another process is changing the same app right now
    └── LineageError              the MLflow registry refused a write or a lineage hop does not check out
        └── RegistryUnreachable   the registry does not answer at the URI tried
"""

from __future__ import annotations


class RayDeployError(Exception):
    """Base class of every error this package raises on purpose."""

    headline = "ray-deploy error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SpecError(RayDeployError):
    headline = "Invalid @ray_serve option"


class ArtifactError(RayDeployError):
    headline = "Model artifact problem"


class PredictorError(RayDeployError):
    headline = "Predictor problem"


class ParityError(RayDeployError):
    headline = "Parity gate failed"


class ClusterError(RayDeployError):
    headline = "Ray cluster problem"


class ClusterUnreachable(ClusterError):
    headline = "Ray cluster unreachable"


class DeployError(RayDeployError):
    headline = "Deployment failed"


class LineageError(RayDeployError):
    headline = "MLflow lineage problem"


class RegistryUnreachable(LineageError):
    headline = "MLflow registry unreachable"


class RolloutFailed(DeployError):
    headline = "Rollout rolled back"

    def __init__(self, message: str, gate: dict | None = None):
        super().__init__(message)
        self.gate = gate or {}


class AppLocked(DeployError):
    headline = "App is being changed by someone else"


class RolloutStateError(DeployError):
    headline = "Not possible in the app's rollout phase"
