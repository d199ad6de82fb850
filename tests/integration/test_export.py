"""`ray-deploy export`: the running app as Ray's Serve config file and as a KubeRay RayService."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

pytestmark = pytest.mark.integration


def ray_deploy(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ray-deploy")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_serve_config_export_is_rays_own_format_and_builds(train_run, ray_head, tmp_path):
    out = tmp_path / "serve.yaml"
    done = ray_deploy("export", "cancer", "--serve-config", "-o", str(out))
    assert done.returncode == 0, done.stderr
    # The example flow uses the local datastore: another cluster could not read the model.
    assert "local Metaflow datastore" in done.stderr
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text())).applications
    assert app.name == "cancer" and app.route_prefix == "/cancer"
    (deployment,) = app.deployments
    assert deployment.name == "ModelServer"
    assert deployment.user_config["variants"][0]["model"]["uri"].startswith("metaflow://TrainFlow/")
    assert "runtime_env" not in deployment.ray_actor_options.model_dump(exclude_unset=True)
    # The import path is a real entry point: Serve can build the app from it.
    from ray._common.utils import import_attr

    assert type(import_attr(app.import_path)(app.args)).__name__ == "Application"


def test_kuberay_manifest_targets_an_autoscaling_cluster_with_gpu_workers(train_run, ray_head, tmp_path):
    import ray

    from ray_deploy.cluster import read_auth_token

    out = tmp_path / "rayservice.yaml"
    done = ray_deploy("export", "cancer", "--kuberay", "--image", "registry.local/ray-deploy:0.1", "-o", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    manifest = yaml.safe_load(text)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert manifest["metadata"]["name"] == "cancer"
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"])).applications
    assert app.name == "cancer"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/ray-deploy:0.1"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert groups["cpu-workers"]["minReplicas"] == 0
    token = read_auth_token()
    assert token and token not in text, "the Ray auth token must never land in a manifest"
