"""Exporting a running app for another cluster: Ray's Serve config file, or a KubeRay RayService.

The exported app is the same app: the router's (and each isolated variant's) deployment options
and ``user_config`` (model references, weights, provenance), with ``import_path`` entry points in
this package. What does not travel is left out and said so: the deploying process's
``runtime_env`` (a package on this cluster's GCS) and any credentials in URIs.

The target cluster needs this package (and any user predictor code) in its image, and models it
can reach: a local Metaflow datastore is readable only on this machine, so ``export`` warns unless
the models live in S3 (or another shared datastore).
"""

from __future__ import annotations

import copy
from typing import Any

from ray_deploy.cluster import FRONT_PROXY_PORT, connect
from ray_deploy.control.apply import variant_apps
from ray_deploy.control.live import LiveApp, plain
from ray_deploy.models.artifacts import without_credentials
from ray_deploy.progress import report
from ray_deploy.serving.config import (
    APP_BUILDER_IMPORT_PATH,
    VARIANT_APP_BUILDER_IMPORT_PATH,
    ServingConfig,
    variant_app_name,
    variant_app_options,
)
from ray_deploy.serving.front import head_environment

RAY_VERSION = "2.60.0"
FRONT_PORT = 8000
"""The port clients call on the head: the ray-deploy front (KubeRay's ``serve`` port)."""
FRONT_CHECK_S = 10
"""How often the head's front sidecar checks the front (and repairs it when it is down)."""
RAY_TMP = "/tmp/ray"
"""Ray's session directory on the head, shared with the front's sidecar (a driver on the head's node
reaches the raylet through sockets there)."""
DEFAULT_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"
DEFAULT_GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"


def _portable(options: dict[str, Any]) -> dict[str, Any]:
    options = copy.deepcopy(plain(options))
    actor = options.get("ray_actor_options") or {}
    actor.pop("runtime_env", None)  # this cluster's working_dir package; not reachable elsewhere
    options["ray_actor_options"] = actor
    config = options.get("user_config")
    if isinstance(config, dict) and "app" in config and "variants" in config:
        config["registry_uri"] = without_credentials(config["registry_uri"]) if config.get("registry_uri") else None
    return options


def serve_config(app: str, address: str | None = None) -> dict[str, Any]:
    """The running app as a Serve config file (``serve deploy``; KubeRay's serveConfigV2).

    Raises:
        DeployError: no such app deployed by ray-deploy.
    """
    with connect(address, start_local=False):
        live = LiveApp.require(app, address)
        present = set(variant_apps(app))
    config = live.config
    local = sorted({v.label for v in config.variants if v.model.datastore_type == "local"})
    if local:
        report(
            f"warning: {', '.join(local)} load from a local Metaflow datastore, which another cluster cannot read; "
            "run the flow with the S3 datastore (METAFLOW_DEFAULT_DATASTORE=s3) before deploying elsewhere"
        )
    applications = [
        {
            "name": app,
            "route_prefix": live.route_prefix,
            "import_path": APP_BUILDER_IMPORT_PATH,
            "args": {},
            "deployments": [_portable(live.serve_options())],
        }
    ]
    for variant in _isolated(config):
        name = variant_app_name(app, variant)
        if name not in present:
            continue
        options = variant_app_options(app, variant)
        applications.append(
            {
                "name": name,
                "route_prefix": None,
                "import_path": VARIANT_APP_BUILDER_IMPORT_PATH,
                "args": {"name": options["name"]},
                "deployments": [_portable(options)],
            }
        )
    return {"applications": plain(applications)}


def _isolated(config: ServingConfig) -> list[Any]:
    return [v for v in config.variants if v.isolated is not None]


def kuberay_manifest(
    app: str,
    address: str | None = None,
    image: str | None = None,
    gpu_image: str | None = None,
    max_gpu_workers: int = 4,
    max_cpu_workers: int = 4,
) -> dict[str, Any]:
    """A KubeRay ``RayService`` serving the app: serveConfigV2 from the running app, an autoscaling
    cluster with a CPU worker group and a GPU worker group (both scaling from zero), on the fast
    data path (``serving.front``):

    - every node runs with the direct data path's settings: ingress replicas answer HTTP on their
      node's address, and refuse requests without their app's secret (``serving.access``);
    - Serve's proxy listens on ``FRONT_PROXY_PORT`` (serveConfigV2's ``http_options``), behind the front;
    - the head pod runs ``ray-deploy cluster front`` as a sidecar: the front (HAProxy, on the
      ``serve`` port clients call) sends each request to a replica on any node, with the secret,
      and the sidecar repairs it when it is down. The manifest holds no secret: the cluster makes
      its key when the front first starts.
    """
    import yaml

    config = {**serve_config(app, address), "http_options": {"host": "0.0.0.0", "port": FRONT_PROXY_PORT}}
    image = image or DEFAULT_IMAGE
    gpu_image = gpu_image or DEFAULT_GPU_IMAGE
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": FRONT_PORT, "name": "serve"},
    ]
    environment = [{"name": k, "value": v} for k, v in sorted(head_environment("direct", "0.0.0.0").items())]
    shared_tmp = {"name": "ray-tmp", "mountPath": RAY_TMP}

    def container(name: str, image_name: str, cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
        limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
        if gpus:
            limits["nvidia.com/gpu"] = gpus
        return {
            "name": name,
            "image": image_name,
            "env": environment,
            "resources": {"limits": limits, "requests": {"cpu": cpu, "memory": memory}},
            **({"ports": ports, "volumeMounts": [shared_tmp]} if name == "ray-head" else {}),
        }

    front = {
        "name": "ray-deploy-front",
        "image": image,
        "command": front_command(),
        "env": environment,
        "resources": {"limits": {"cpu": "500m", "memory": "1Gi"}, "requests": {"cpu": "100m", "memory": "512Mi"}},
        "volumeMounts": [shared_tmp],
    }

    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": app, "labels": {"app.kubernetes.io/managed-by": "ray-deploy"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 60},
                "headGroupSpec": {
                    # The head schedules no replicas: workers come and go with the load.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {
                        "spec": {
                            "containers": [container("ray-head", image, "2", "8Gi"), front],
                            "volumes": [{"name": "ray-tmp", "emptyDir": {}}],
                        }
                    },
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "cpu-workers",
                        "replicas": 1,
                        "minReplicas": 0,
                        "maxReplicas": max_cpu_workers,
                        "rayStartParams": {},
                        "template": {"spec": {"containers": [container("ray-worker", image, "4", "16Gi")]}},
                    },
                    {
                        "groupName": "gpu-workers",
                        "replicas": 0,
                        "minReplicas": 0,
                        "maxReplicas": max_gpu_workers,
                        "rayStartParams": {},
                        "template": {
                            "spec": {
                                "containers": [container("ray-worker", gpu_image, "8", "32Gi", gpus=1)],
                                "tolerations": [
                                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                                ],
                            }
                        },
                    },
                ],
            },
        },
    }


def front_command(gcs_port: int = 6379) -> list[str]:
    """The head pod's front sidecar: waits for nothing (Kubernetes restarts it until the head
    answers), then runs and repairs the front (``ray_deploy.cluster.serve_front``)."""
    return [
        "ray-deploy",
        "cluster",
        "front",
        "--address",
        f"127.0.0.1:{gcs_port}",
        "--host",
        "0.0.0.0",
        "--port",
        str(FRONT_PORT),
        "--proxy-port",
        str(FRONT_PROXY_PORT),
        "--watch",
        str(FRONT_CHECK_S),
    ]
