"""The autoscaling policy of apps with ``autoscaling``: Serve's own count or the front's, the larger.

Built on Serve's own ``AutoscalingContext`` and compared with Serve's default policy, which it
must equal wherever the front reports nothing (Serve's proxy, its HAProxy mode).
"""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from ray_deploy.serving.autoscale import FRONT_LOAD_METRIC, POLICY_FUNCTION, front_load_policy
from ray_deploy.spec import AutoscalingSpec

DEPLOYMENT = DeploymentID(name="ModelServer", app_name="brisk")


def context(replicas: int, serve_count: float, front: list[float] | None, target: float = 2.0) -> AutoscalingContext:
    running = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(replicas)]
    metrics = {} if front is None else {FRONT_LOAD_METRIC: dict(zip(running, front, strict=True))}
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name="ModelServer",
        app_name="brisk",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=running,
        total_num_requests=serve_count,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=target),
    )


def test_the_front_count_brings_replicas_serve_alone_would_not():
    # One replica of a quick model: Serve counts ~1 ongoing, the front holds 32 waiting requests.
    serve_only = context(1, 0.9, None)
    assert replica_queue_length_autoscaling_policy(serve_only)[0] < 1
    assert front_load_policy(serve_only)[0] == pytest.approx(replica_queue_length_autoscaling_policy(serve_only)[0])
    assert front_load_policy(context(1, 0.9, [32.0]))[0] == pytest.approx(16.0)


def test_every_replica_reports_the_whole_route_so_the_largest_report_counts():
    assert front_load_policy(context(2, 1.5, [10.0, 12.0]))[0] == pytest.approx(6.0)


def test_a_slow_model_is_scaled_on_serves_count_when_it_is_the_larger():
    assert front_load_policy(context(2, 9.0, [4.0, 4.0], target=3.0))[0] == pytest.approx(3.0)


def test_no_replica_yet_asks_for_the_target():
    assert front_load_policy(context(0, 0.0, None))[0] == 0


def test_the_apps_autoscaling_config_names_the_policy_and_reports_often_enough():
    from ray_deploy.serving.config import autoscaling_config

    config = AutoscalingConfig(**autoscaling_config(AutoscalingSpec(look_back_period_s=2.0)))
    assert config.policy.policy_function == POLICY_FUNCTION
    assert config.metrics_interval_s == 1.0
    assert AutoscalingConfig(**autoscaling_config(AutoscalingSpec(look_back_period_s=60))).metrics_interval_s == 10.0
