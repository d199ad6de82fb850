"""The MLflow deployments target, as MLflow's plugin manager finds and checks it (no cluster)."""

import json

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException


def test_mlflow_finds_the_target_through_the_entry_point():
    from mlflow.deployments import get_deploy_client
    from mlflow.deployments.plugin_manager import DeploymentPlugins

    from ray_deploy.deployments import RayServeDeploymentClient

    plugin = DeploymentPlugins()["ray-serve"]  # checks run_local, target_help and one client class
    assert "models:/NAME@ALIAS" in plugin.target_help()
    client = get_deploy_client("ray-serve")
    assert isinstance(client, RayServeDeploymentClient) and client.address is None
    assert get_deploy_client("ray-serve:/10.0.0.5:6379").address == "10.0.0.5:6379"


def test_what_the_target_refuses_names_why():
    from ray_deploy.deployments import RayServeDeploymentClient

    with pytest.raises(MlflowException, match="expected 'ray-serve'"):
        RayServeDeploymentClient("sagemaker")
    client = RayServeDeploymentClient("ray-serve")
    with pytest.raises(MlflowException, match="explain is not supported"):
        client.explain("cancer", pd.DataFrame({"a": [1]}))
    for call in (lambda: client.create_endpoint("e"), lambda: client.delete_endpoint("e")):
        with pytest.raises(MlflowException, match="no separate endpoints"):
            call()
    with pytest.raises(MlflowException, match="flavor 'sklearn'"):
        client._deploy("cancer", "models:/cancer/1", "sklearn", {})
    with pytest.raises(MlflowException, match="deploys MLflow models"):
        client._deploy("cancer", "model", None, {})  # a Metaflow artifact name is not an MLflow URI
    with pytest.raises(MlflowException, match="num_replicas"):
        client._deploy("cancer", "models:/cancer/1", None, {"num_replicas": "many"})


def test_predict_sends_what_mlflow_clients_send():
    from ray_deploy.deployments import _scoring_body

    frame = pd.DataFrame({"a": [1.0], "b": [2.0]})
    assert json.loads(_scoring_body(frame))["dataframe_split"]["data"] == [[1.0, 2.0]]
    body = {"instances": [[1.0, 2.0]]}
    assert json.loads(_scoring_body(body)) == body
    assert _scoring_body('{"inputs": [[1]]}') == '{"inputs": [[1]]}'
