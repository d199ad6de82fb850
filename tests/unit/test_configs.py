"""Cluster configs in configs/cluster are complete and valid for Ray's own cluster launcher schema."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cluster"


def test_local_autoscaling_config_is_complete_on_its_own():
    """The fake multi-node provider reads the file as is (the 2.60 wheel has no defaults for it)."""
    config = yaml.safe_load((CONFIGS / "local-autoscaling.yaml").read_text())
    validate_config(config)  # no defaults filled in: every field must be there
    assert config["provider"]["type"] == "fake_multinode"
    types = config["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and types["gpu_worker"]["min_workers"] == 0
    assert types["cpu_worker"]["min_workers"] == 0
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0


@pytest.mark.parametrize("name", ["aws-gpu.yaml"])
def test_cloud_configs_pass_ray_up_validation(name):
    config = prepare_config(yaml.safe_load((CONFIGS / name).read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and types["gpu_worker"]["min_workers"] == 0
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0, "replicas belong on workers"
    assert any("RAY_AUTH_MODE=token" in command for command in config["head_start_ray_commands"])


def test_the_cloud_config_runs_the_fast_path_on_every_node_and_the_front_on_the_head():
    """Replicas on every node answer on the node's address (with the direct data path's settings,
    the same the package starts its own heads with), and the head runs the front."""
    from ray_deploy.serving.front import head_environment

    config = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())
    wanted = [f"{name}={value}" for name, value in head_environment("direct", "0.0.0.0").items()]
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        (start,) = [command for command in commands if " ray start " in command]
        assert all(setting in start.split() for setting in wanted), start
    (front,) = [command for command in config["head_start_ray_commands"] if "ray-deploy cluster front" in command]
    assert "--address 127.0.0.1:6379" in front and "--watch" in front
