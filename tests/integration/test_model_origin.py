"""The served model leads back to the task that trained it (the foreach branch whose model won the
join), not to the deploy step that copied it; the registry records it and `ray-deploy lineage` checks it."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_deploy import LineageSource, ModelRef, Registry, origin_of, trace_model
from ray_deploy.models.artifacts import METAFLOW_SCHEME, read_model_bytes

pytestmark = pytest.mark.integration


def _served(train_run, registry):
    """The variant the run deployed and its model version's tags."""
    (variant,) = train_run["deploy"].task.data.ray_serve["variants"]
    name, number = variant["model_version"].rsplit("/", 1)
    return variant, registry.client.get_model_version(name, number).tags


def _best_train_task(train_run):
    """The branch the join keeps, by the run's own scores (its rule: auc, then accuracy)."""
    return max(train_run["train"], key=lambda task: (task.data.metrics["auc"], task.data.metrics["accuracy"]))


def test_version_names_the_task_that_trained_the_model(train_run, embedded_registry):
    variant, tags = _served(train_run, embedded_registry)
    producer = tags["metaflow.producer_task"]
    flow, run_id, step, task_id = producer.split("/")
    assert (flow, run_id, step) == ("TrainFlow", train_run.id, "train")
    # The deploying task stays recorded beside it.
    assert tags["metaflow.task"] == train_run["deploy"].task.pathspec
    assert tags["metaflow.step"] == "deploy"

    trained = train_run["train"][task_id]
    assert trained.successful
    artifact = trained[tags["metaflow.producer_artifact"]]
    assert tags["metaflow.producer_artifact"] == "model"
    # Same content address as the deployed copy, and its stored bytes hash to the recorded sha256.
    assert artifact.sha == tags["metaflow.artifact_blob_key"] == variant["model_ref"]["blob_key"]
    at_producer = ModelRef(**variant["model_ref"]).model_copy(
        update={"uri": METAFLOW_SCHEME + artifact.pathspec, "sha256": None}
    )
    assert hashlib.sha256(read_model_bytes(at_producer)).hexdigest() == tags["metaflow.artifact_sha256"]

    # It is the branch with the best score, the one the join kept; no other branch holds this model.
    assert producer == _best_train_task(train_run).pathspec
    assert trained.data.strategy == train_run["join"].task.data.best_strategy
    others = [task for task in train_run["train"] if task.pathspec != producer]
    assert len(others) == 2 and all(task["model"].sha != artifact.sha for task in others)

    # The step's record says the same.
    record = train_run["deploy"].task.data.ray_serve
    assert record["lineage"]["model_origins"] == {variant["name"]: f"{producer}/model"}
    assert record["lineage"]["task"] == train_run["deploy"].task.pathspec


def test_origin_of_finds_the_earliest_holder_under_any_name(train_run):
    blob_key = train_run["deploy"].task["model"].sha
    best = _best_train_task(train_run)
    assert origin_of("TrainFlow", train_run.id, None, blob_key) == f"{best.pathspec}/model"
    # Limited to a name, the search finds the join's copy: the earliest task holding `best_model`.
    assert (
        origin_of("TrainFlow", train_run.id, "best_model", blob_key) == f"{train_run['join'].task.pathspec}/best_model"
    )
    assert origin_of("TrainFlow", train_run.id, None, "0" * 40) is None


def _chain_from_cli(*args):
    ray_deploy = Path(sys.executable).with_name("ray-deploy")
    shown = subprocess.run([str(ray_deploy), "lineage", *args, "--json"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    (chain,) = json.loads(shown.stdout).values()
    return chain


def test_lineage_command_shows_and_checks_the_training_task(train_run, embedded_registry):
    variant, tags = _served(train_run, embedded_registry)
    best = _best_train_task(train_run)
    for args in (["cancer"], ["--model", variant["model_version"]]):
        chain = _chain_from_cli(*args)
        kinds = [hop["kind"] for hop in chain if hop["kind"] != "traffic"]
        assert kinds[-4:] == ["metaflow_task", "model_artifact", "training_task", "data"], kinds
        deploying, training = [hop for hop in chain if hop["kind"] in ("metaflow_task", "training_task")]
        assert deploying["name"] == train_run["deploy"].task.pathspec and deploying["ok"]
        assert training["name"] == best.pathspec and training["ok"], training
        assert tags["metaflow.artifact_sha256"] in training["detail"]
        assert all(hop["ok"] for hop in chain), chain


def test_training_hop_refuses_a_task_whose_model_differs(train_run, embedded_registry, tmp_path):
    """A version whose producer tags name a losing branch: the hop names the content addresses."""
    variant, _ = _served(train_run, embedded_registry)
    ref = ModelRef(**variant["model_ref"])
    loser = next(task for task in train_run["train"] if task.pathspec != _best_train_task(train_run).pathspec)
    registry = Registry(f"sqlite:///{tmp_path}/mlflow.db")
    source = LineageSource(
        flow="TrainFlow",
        run_id=train_run.id,
        step="deploy",
        task=train_run["deploy"].task.pathspec,
        user="tester",
        model_origins={ref.blob_key: f"{loser.pathspec}/model"},
    )
    run_id = registry.mirror_run(source)
    version = registry.register_version("origin-check", "default", ref, source, run_id, "xgboost")
    tags = registry.version_tags(version)
    assert tags["metaflow.producer_task"] == loser.pathspec and tags["metaflow.task"] == source.task

    chain = trace_model(str(version), registry=registry)
    (training,) = [hop for hop in chain if hop.kind == "training_task"]
    assert not training.ok and training.name == loser.pathspec
    assert loser["model"].sha in training.detail and ref.blob_key in training.detail
    # Everything else about the version still checks out.
    assert [hop.kind for hop in chain if not hop.ok] == ["training_task"]
