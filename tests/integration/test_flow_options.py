"""Decorator options are checked before any step runs; user predictors travel with the deployment."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def options_flow(write_flow, directory: Path, options: str) -> tuple[Path, Path]:
    """A flow whose start step trains (and leaves a marker file), then deploys with `options`."""
    marker = directory / "trained.txt"
    steps = f"""
    @step
    def start(self):
        from pathlib import Path
        Path({str(marker)!r}).write_text("trained")
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression
        X, y = load_iris(return_X_y=True)
        self.model = LogisticRegression(max_iter=1000).fit(X, y)
        self.next(self.deploy)
    """
    return write_flow(directory / "options_flow.py", "OptionsFlow", steps, options), marker


# One flow run per kind of refusal reaches step_init: a value out of range, the app missing, a
# rollout policy, a user predictor that cannot be imported. Every option's own message is checked
# without a flow in tests/unit/test_spec.py and test_app.py.
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ('app="iris", num_replicas=-1', "num_replicas: Input should be greater than or equal to 1"),
        ("num_cpus=0.25", "app: required"),
        ('app="iris", rollout={"strategy": "canery"}', "rollout.strategy: strategy 'canery' is not one of"),
        ('app="iris", predictor="missing_module:Thing"', "cannot import module 'missing_module'"),
    ],
)
def test_bad_option_stops_the_run_before_training(tmp_path, write_flow, run_flow, options, expected):
    flow, marker = options_flow(write_flow, tmp_path, options)
    finished = run_flow(flow)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert expected in output, output[-2000:]
    assert not marker.exists(), "the start step ran although an option was invalid"


def test_with_ray_serve_is_refused_before_any_step_runs(tmp_path, write_flow, run_flow):
    """`--with ray_serve:...` puts @ray_serve on every step, and the start step has no model: the run
    is refused before it starts, naming `--with` and showing the way that works (a Config)."""
    from metaflow import Flow
    from metaflow.exception import MetaflowNotFound

    marker = tmp_path / "trained.txt"
    steps = f"""
    @step
    def start(self):
        from pathlib import Path
        Path({str(marker)!r}).write_text("trained")
        self.next(self.deploy)
    """
    flow = write_flow(tmp_path / "with_flow.py", "WithOptionFlow", steps, 'app="with-static", num_cpus=0.25')

    def runs() -> set[str]:
        try:
            return {run.id for run in Flow("WithOptionFlow")}
        except MetaflowNotFound:
            return set()

    before = runs()
    finished = run_flow(flow, "--with", "ray_serve:app=with-refused,num_replicas=2")
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert "Invalid @ray_serve option" in output and "--with ray_serve: refused" in output, output[-3000:]
    assert 'Config("deploy")' in output and 'config_expr("deploy.app")' in output, output[-3000:]
    assert "--config deploy deploy.json run" in output, output[-3000:]
    # No step ran: no task started, the start step's code never ran, and no run was even created.
    assert "Task is starting" not in output, output[-3000:]
    assert not marker.exists(), "the start step ran although --with ray_serve was refused"
    assert runs() == before


TWO_APPS_FLOW = """
from metaflow import FlowSpec, ray_serve, step


class TwoAppsFlow(FlowSpec):
    @step
    def start(self):
        from pathlib import Path
        Path(MARKER).write_text("trained")
        self.model = 1
        self.next(self.seed)

    @ray_serve(app="seed", num_cpus=0.25)
    @step
    def seed(self):
        self.next(self.feedback)

    @ray_serve(app="seed-feedback", route_prefix="/seed/feedback", num_cpus=0.25)
    @step
    def feedback(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TwoAppsFlow()
"""


def test_two_steps_deploying_nested_routes_are_refused_before_any_step_runs(tmp_path, run_flow):
    marker = tmp_path / "trained.txt"
    flow = tmp_path / "two_apps_flow.py"
    flow.write_text(TWO_APPS_FLOW.replace("MARKER", repr(str(marker))))
    finished = run_flow(flow)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert "Invalid @ray_serve option" in output, output[-3000:]
    # Named from whichever of the two steps Metaflow initialises first.
    assert (
        "'/seed' overlaps '/seed/feedback', the route of app 'seed-feedback' deployed by step 'feedback'" in output
        or "'/seed/feedback' overlaps '/seed', the route of app 'seed' deployed by step 'seed'" in output
    ), output[-3000:]
    assert not marker.exists(), "the start step ran although the routes overlap"


CONFIG_FLOW = """
from metaflow import Config, FlowSpec, config_expr, ray_serve, step


class ConfigFlow(FlowSpec):
    deploy_config = Config("deploy")

    @step
    def start(self):
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        X, y = load_iris(return_X_y=True)
        self.best_model = LogisticRegression(max_iter=1000).fit(X, y)
        self.next(self.deploy)

    @ray_serve(app=config_expr("deploy.app"), num_replicas=config_expr("deploy.num_replicas"), num_cpus=0.25)
    @step
    def deploy(self):
        self.model = self.best_model
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ConfigFlow()
"""


def test_options_from_a_config_file_set_app_and_replicas(tmp_path, run_flow, ray_head, http):
    """What README shows instead of `--with`: `config_expr` options read from the JSON file given
    with `--config deploy deploy.json` when the run starts."""
    from ray_deploy import app_status, delete_app

    flow = tmp_path / "config_flow.py"
    flow.write_text(CONFIG_FLOW)
    (tmp_path / "deploy.json").write_text(json.dumps({"app": "from-config", "num_replicas": 2}))
    try:
        finished = run_flow(flow, top_level=("--config", "deploy", "deploy.json"))
        assert finished.returncode == 0, (finished.stdout + finished.stderr)[-4000:]
        (row,) = app_status("from-config")
        assert row["status"] == "RUNNING" and row["replicas"]["ModelServer"] == {"RUNNING": 2}, row
        answer = http.post(row["url"], json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
        assert answer.status_code == 200 and answer.json()["predictions"] == [0], answer.text
    finally:
        delete_app("from-config")


@pytest.mark.parametrize(
    ("assignment", "options", "expected"),
    [
        ("", 'app="no-artifact", num_cpus=0.25', "model: the step did not set an artifact named 'model'"),
        (
            "self.model = 'not a model'",
            'app="wrong-type", predictor="xgboost", num_cpus=0.25',
            "predictor 'xgboost' needs an xgboost.XGBModel or xgboost.Booster, got str",
        ),
    ],
)
def test_bad_model_artifact_fails_the_deploy_step_not_the_replicas(
    tmp_path, write_flow, run_flow, ray_head, assignment, options, expected
):
    """Found in the deploy step, before Serve is touched: no app appears, nothing restarts."""
    steps = f"""
    @step
    def start(self):
        {assignment or "pass"}
        self.next(self.deploy)
    """
    flow = write_flow(tmp_path / "artifact_flow.py", "ArtifactFlow", steps, options)
    finished = run_flow(flow)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert expected in output, output[-3000:]
    app = options.split('"')[1]
    exe = Path(sys.executable).with_name("ray-deploy")
    shown = subprocess.run([str(exe), "status", app], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 1 and f"no app {app!r}" in shown.stderr


def test_unreachable_cluster_fails_the_step_naming_the_address(tmp_path, write_flow, run_flow):
    flow, marker = options_flow(write_flow, tmp_path, 'app="iris", num_cpus=0.25')
    finished = run_flow(flow, env={"RAY_ADDRESS": "127.0.0.1:1"})
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert "Ray cluster unreachable" in output and "127.0.0.1:1" in output, output[-2000:]
    assert marker.exists()


def test_user_predictor_ships_with_the_flow(tmp_path, write_flow, run_flow, ray_head, http):
    (tmp_path / "iris_predictors.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            NAMES = np.array(["setosa", "versicolor", "virginica"])


            class SpeciesNames:
                n_features = 4

                def __init__(self, model, config):
                    self.model = model
                    self.prefix = config.get("prefix", "")

                def predict(self, payload):
                    return [self.prefix + name for name in NAMES[self.model.predict(payload)]]
            """
        )
    )
    flow, _ = options_flow(
        write_flow,
        tmp_path,
        'app="iris", predictor="iris_predictors:SpeciesNames", predictor_config={"prefix": "iris-"}, num_cpus=0.25',
    )
    finished = run_flow(flow)
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-4000:]
    answer = http.post(f"{ray_head.http_url}/iris", json={"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == ["iris-setosa", "iris-virginica"]
    wrong = http.post(f"{ray_head.http_url}/iris", json={"instances": [[1.0, 2.0]]})
    assert wrong.status_code == 400 and "needs 4 features" in wrong.json()["error"]


def test_flow_cli_and_console_script_show_the_app(train_run, ray_head, repo):
    flow_status = subprocess.run(
        [sys.executable, str(repo / "flows" / "train_flow.py"), "--no-pylint", "ray-serve", "status", "--json"],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=120,
    )
    assert flow_status.returncode == 0, flow_status.stderr[-2000:]
    (app,) = json.loads(flow_status.stdout)
    assert app["app"] == "cancer" and app["status"] == "RUNNING"
    assert app["variants"][0]["model_uri"] == f"metaflow://{train_run['deploy'].task.pathspec}/model"

    ray_deploy = Path(sys.executable).with_name("ray-deploy")
    console = subprocess.run(
        [str(ray_deploy), "status", "cancer", "--json"], capture_output=True, text=True, timeout=120
    )
    assert console.returncode == 0, console.stderr[-2000:]
    assert json.loads(console.stdout) == [app]

    predicted = subprocess.run(
        [str(ray_deploy), "predict", "cancer", "--data", json.dumps({"instances": [[1.0] * 30]})],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert predicted.returncode == 0, predicted.stderr
    assert len(json.loads(predicted.stdout)["predictions"]) == 1

    missing = subprocess.run([str(ray_deploy), "status", "nope"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and missing.stderr.startswith("DeployError: no app 'nope'")

    # The flow's own status shows what `ray-deploy status` shows: shares, device paths, live metrics.
    import time

    deadline = time.monotonic() + 30
    while True:
        text = subprocess.run(
            [sys.executable, str(repo / "flows" / "train_flow.py"), "--no-pylint", "ray-serve", "status"],
            capture_output=True,
            text=True,
            cwd=repo,
            timeout=120,
        ).stdout
        if " requests, " in text or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert "cancer: RUNNING" in text and "(100%)" in text and "runs on: cpu" in text
    assert " requests, 0 errors" in text


def test_cluster_status_reports_token_auth_and_resources(ray_head):
    ray_deploy = Path(sys.executable).with_name("ray-deploy")
    # `cluster up` with a head already listening reuses it (and says where it is).
    up = subprocess.run([str(ray_deploy), "cluster", "up", "--json"], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr[-2000:]
    assert json.loads(up.stdout) == ray_head.to_dict()
    status = subprocess.run(
        [str(ray_deploy), "cluster", "status", "--json"], capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0, status.stderr[-2000:]
    described = json.loads(status.stdout)
    assert described["address"] == ray_head.address
    assert described["resources"]["CPU"] >= 1


def test_dashboard_requires_the_token_and_shows_the_app(train_run, ray_head, http):
    from ray_deploy.cluster import auth_headers

    url = f"{ray_head.dashboard_url}/api/serve/applications/"
    assert http.get(url).status_code == 401
    answer = http.get(url, headers=auth_headers())
    assert answer.status_code == 200
    deployment = answer.json()["applications"]["cancer"]["deployments"]["ModelServer"]
    source = deployment["deployment_config"]["user_config"]["source"]
    assert source["task"] == train_run["deploy"].task.pathspec
