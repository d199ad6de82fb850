"""README: "MLflow pyfunc models" are served by a built-in predictor, and a model already in the
MLflow registry deploys by reference: ``@ray_serve(model="models:/<name>/<version>")``.

A scikit-learn regressor (a bundled dataset, no download) is logged as a pyfunc model, with its
signature, to the suite's registry (the embedded SQLite store under RAY_DEPLOY_HOME, what users
get by default), registered as version 1 of a new model, deployed by a Metaflow flow with
``models:/<name>/1``, and asked over HTTP in the ``mlflow models serve`` formats: the answers are
the pyfunc's own predictions, and input its signature refuses is a 4xx naming the problem.
"""

import uuid

import pytest

pytestmark = pytest.mark.integration

STEPS = """
@step
def start(self):
    self.next(self.deploy)
"""


@pytest.fixture()
def registered_pyfunc(tmp_path):
    """``models:/<new name>/1``: a pyfunc model logged and registered in the suite's registry (its
    artifacts under the test's directory), and the table it was trained on."""
    import mlflow
    from mlflow.models import infer_signature
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    from ray_deploy import Registry

    registry = Registry()
    name = f"diabetes-pyfunc-{uuid.uuid4().hex[:8]}"
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    model = Ridge(alpha=0.5).fit(X, y)
    experiment = registry.client.create_experiment(name, artifact_location=(tmp_path / "mlartifacts").as_uri())
    uri = f"models:/{name}/1"
    # As a user would log it: MLflow pointed at the registry for this block only, so the flow
    # below runs with no MLFLOW_* settings, on ray-deploy's default registry.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
        env.setenv("MLFLOW_REGISTRY_URI", registry.registry_uri)
        with mlflow.start_run(experiment_id=experiment):
            signature = infer_signature(X, model.predict(X))
            mlflow.sklearn.log_model(model, name="model", signature=signature, registered_model_name=name)
        pyfunc = mlflow.pyfunc.load_model(uri)
    return uri, X, pyfunc


def test_a_registered_pyfunc_model_deploys_by_models_uri_and_answers_as_the_pyfunc(
    registered_pyfunc, write_flow, run_flow, tmp_path, ray_head, http
):
    uri, X, pyfunc = registered_pyfunc
    app = "mlflow-pyfunc"
    flow = write_flow(tmp_path / "pyfunc_flow.py", "PyfuncFlow", STEPS, f'app="{app}", model="{uri}", num_cpus=0.25')
    done = run_flow(flow)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    url = f"{ray_head.http_url}/{app}"
    (served,) = http.get(url).json()["variants"]
    assert served["predictor"] == "mlflow" and served["model"] == uri  # chosen from the URI: predictor="auto"

    rows = X.iloc[:25]
    expected = [float(value) for value in pyfunc.predict(rows)]
    bodies = {
        "dataframe_split": {"dataframe_split": {"columns": list(rows.columns), "data": rows.values.tolist()}},
        "dataframe_records": {"dataframe_records": rows.to_dict(orient="records")},
        "instances": {"instances": rows.to_dict(orient="records")},
        "inputs": {"inputs": {column: rows[column].tolist() for column in rows.columns}},
    }
    for form, body in bodies.items():
        answer = http.post(url, json=body)
        assert answer.status_code == 200, (form, answer.text[:2000])
        assert answer.json()["predictions"] == pytest.approx(expected, rel=1e-12), form
        assert answer.json()["model_version"] == served["model_version"]
    on_invocations = http.post(f"{url}/invocations", json=bodies["dataframe_split"])
    assert on_invocations.status_code == 200 and on_invocations.json()["predictions"] == pytest.approx(expected)

    # Columns the signature does not know are the caller's mistake: 400, naming what is missing.
    wrong = http.post(url, json={"dataframe_split": {"columns": ["a", "b"], "data": [[1.0, 2.0]]}})
    assert wrong.status_code == 400, wrong.text[:2000]
    assert "missing inputs" in wrong.json()["error"] and "'bmi'" in wrong.json()["error"], wrong.text[:2000]
    assert http.post(url, json=bodies["dataframe_split"]).status_code == 200  # and the replica keeps serving
