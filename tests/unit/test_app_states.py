"""``app_states`` reads Serve's details the way ``serve.status()`` does, without building its models.

The details are made with Serve's own enums (what the controller sends); ``serve.status()``'s
answer for the same details is the reference.
"""

from __future__ import annotations

from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import ApplicationStatus, ServeInstanceDetails

from ray_deploy.control.apply import app_states, variant_apps


def replica(n: int, state: ReplicaState) -> dict:
    return {"replica_id": f"r{n}", "state": state, "start_time_s": 1.0, "actor_name": f"SERVE_REPLICA::r{n}"}


def deployment(name: str, status: DeploymentStatus, replicas: list[dict], message: str = "") -> dict:
    return {
        "name": name,
        "status": status,
        "status_trigger": DeploymentStatusTrigger.CONFIG_UPDATE_STARTED,
        "message": message,
        "deployment_config": {"name": name},
        "target_num_replicas": len(replicas),
        "required_resources": {"CPU": 0.25},
        "replicas": replicas,
    }


def app(name: str, status: ApplicationStatus, deployments: list[dict], message: str = "") -> dict:
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "docs_path": None,
        "status": status,
        "message": message,
        "last_deployed_time_s": 1.0,
        "source": "imperative",
        "deployments": {d["name"]: d for d in deployments},
        "external_scaler_enabled": False,
    }


DETAILS = {
    "proxies": {},
    "applications": {
        "cancer": app(
            "cancer",
            ApplicationStatus.DEPLOYING,
            [
                deployment(
                    "ModelServer",
                    DeploymentStatus.UPDATING,
                    [
                        replica(1, ReplicaState.RUNNING),
                        replica(2, ReplicaState.STARTING),
                        replica(3, ReplicaState.RUNNING),
                    ],
                    "Deployment 'ModelServer' has 1 replica that has taken more than 30s to be scheduled.",
                )
            ],
        ),
        "cancer--onnx": app(
            "cancer--onnx", ApplicationStatus.RUNNING, [deployment("Variant", DeploymentStatus.HEALTHY, [])]
        ),
        "broken": app("broken", ApplicationStatus.DEPLOY_FAILED, [], "the import failed"),
    },
}


def enum_name(value) -> str:
    return str(getattr(value, "value", value))


def test_app_states_agree_with_serve_status():
    ours = app_states(DETAILS)
    theirs = ServeInstanceDetails(**DETAILS)._get_status().applications
    assert set(ours) == set(theirs) == {"cancer", "cancer--onnx", "broken"}
    for name, reference in theirs.items():
        state = ours[name]
        assert state.status == enum_name(reference.status) and state.message == reference.message
        assert set(state.deployments) == set(reference.deployments)
        for deployment_name, expected in reference.deployments.items():
            got = state.deployments[deployment_name]
            assert got.status == enum_name(expected.status) and got.message == expected.message
            assert got.replica_states == {enum_name(s): n for s, n in expected.replica_states.items() if n}


def test_states_are_plain_names_a_user_reads():
    cancer = app_states(DETAILS)["cancer"]
    assert cancer.status == "DEPLOYING"
    assert cancer.deployments["ModelServer"].replica_states == {"RUNNING": 2, "STARTING": 1}
    assert f"{cancer.status}; {cancer.deployments['ModelServer'].status}" == "DEPLOYING; UPDATING"


def test_variant_apps_are_the_apps_named_after_it():
    assert variant_apps("cancer", DETAILS) == ["cancer--onnx"]
    assert variant_apps("broken", DETAILS) == []
