"""Export works for every kind of option the decorator takes: what Serve runs, read back (with the
enums Serve's details carry), becomes a Serve config and a KubeRay RayService that Ray's own
``ServeDeploySchema`` accepts and YAML can write. The apps stay until the module ends (its
fixture deletes them side by side)."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from ray_deploy import DeploymentSpec, ModelRef, deploy, kuberay_manifest, serve_config

pytestmark = pytest.mark.integration

OPTIONS = {
    "autoscaling": {
        "num_cpus": 0.1,
        "memory": 150 * 1024 * 1024,
        "max_replicas_per_node": 4,
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    },
    "placement": {"num_cpus": 0.1, "placement": {"bundles": [{"CPU": 0.1}, {"CPU": 0.05}], "strategy": "PACK"}},
    # Filled in below with the head's own `node:<address>` resource: a custom resource it can grant.
    "resources": {"num_cpus": 0.1, "resources": {}},
    "isolated": {
        "num_cpus": 0.1,
        "variants": {"solo": {"model": "model", "predictor": "xgboost", "isolate": True, "num_cpus": 0.1}},
    },
}


@pytest.fixture(scope="module")
def model_ref(train_run):
    (variant,) = train_run["deploy"].task.data.ray_serve["variants"]
    return ModelRef(**variant["model_ref"])


@pytest.mark.parametrize("kind", sorted(OPTIONS))
def test_export_of_each_option_kind_is_valid_serve_config_and_kuberay(kind, model_ref, ray_head):
    app = f"export-{kind}"
    options = {"app": app, "deploy_timeout_s": 180, **OPTIONS[kind]}
    if kind == "resources":
        from ray_deploy import cluster_status

        node = next(k for k in cluster_status()["resources"] if k.startswith("node:") and "internal" not in k)
        options["resources"] = {node: 0.01}
    if "variants" not in options:
        options.update(model="model", predictor="xgboost")
    spec = DeploymentSpec.from_options(options)
    deploy(spec, {v.name: model_ref for v in spec.variants}, {v.name: "xgboost" for v in spec.variants})
    exported = serve_config(app)
    text = yaml.safe_dump(exported, sort_keys=False)  # an enum left in would fail here
    applications = {a.name: a for a in ServeDeploySchema.model_validate(yaml.safe_load(text)).applications}
    (server,) = applications[app].deployments
    assert server.name == "ModelServer"
    if kind == "autoscaling":
        scaling = server.autoscaling_config
        scaling = scaling if isinstance(scaling, dict) else scaling.model_dump()
        assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 2)
        assert server.max_replicas_per_node == 4
        assert server.ray_actor_options.memory == 150 * 1024 * 1024
    if kind == "placement":
        assert server.placement_group_bundles == [{"CPU": 0.1}, {"CPU": 0.05}]
        assert server.placement_group_strategy == "PACK"
    if kind == "resources":
        assert server.ray_actor_options.resources == options["resources"]
    if kind == "isolated":
        (isolated,) = [name for name in applications if name != app]
        assert isolated.startswith(f"{app}--solo-")
    manifest = kuberay_manifest(app)
    yaml.safe_dump(manifest)
    inner = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert {a.name for a in inner.applications} == set(applications)
