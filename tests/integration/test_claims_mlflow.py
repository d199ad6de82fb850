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


SHAPES_MODEL = '''
import mlflow
import pandas as pd


class Shapes(mlflow.pyfunc.PythonModel):
    """Sums each row; the "shape" param picks how the answer comes back."""

    def predict(self, context, model_input, params=None):
        total = model_input.sum(axis=1)
        shape = (params or {}).get("shape", "array")
        if shape == "frame":
            return pd.DataFrame({"total": total, "double": total * 2})
        if shape == "dict":
            return {"total": total.to_numpy(), "rows": len(total)}
        return total.to_numpy()


mlflow.models.set_model(Shapes())
'''


def test_mlflow_scoring_clients_work_unchanged(tmp_path, write_flow, run_flow, ray_head, http):
    """MLflow's own ScoringServerClient, pointed at an app's URL: ping, version, a DataFrame in; a
    CSV body over plain HTTP; a pyfunc's params, and its DataFrame and dict answers, shaped as
    `mlflow models serve` shapes them (its own encoder is the reference)."""
    import io
    import json

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.pyfunc.scoring_server import predictions_to_json
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    from ray_deploy import Registry

    registry = Registry()
    name = f"shapes-{uuid.uuid4().hex[:8]}"
    code = tmp_path / "shapes_model.py"
    code.write_text(SHAPES_MODEL)
    table = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [0.5, 0.25, 0.125]})
    experiment = registry.client.create_experiment(name, artifact_location=(tmp_path / "mlartifacts").as_uri())
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
        env.setenv("MLFLOW_REGISTRY_URI", registry.registry_uri)
        with mlflow.start_run(experiment_id=experiment):
            signature = infer_signature(table, table.sum(axis=1).to_numpy(), params={"shape": "array"})
            mlflow.pyfunc.log_model(
                name="model", python_model=str(code), signature=signature, registered_model_name=name
            )
        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
    app = "mlflow-shapes"
    options = f'app="{app}", model="models:/{name}/1", num_cpus=0.25'
    done = run_flow(write_flow(tmp_path / "shapes_flow.py", "ShapesFlow", STEPS, options))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    url = f"{ray_head.http_url}/{app}"

    def as_mlflow_answers(params=None):
        written = io.StringIO()
        predictions_to_json(pyfunc.predict(table, params=params), written)
        return json.loads(written.getvalue())["predictions"]

    client = ScoringServerClient("127.0.0.1", ray_head.http_url.rsplit(":", 1)[1])
    client.url_prefix = url  # the app's URL instead of a server's root
    client.ping()
    assert client.get_version() == mlflow.__version__
    answer = client.invoke(table)
    assert answer.get_predictions(predictions_format="ndarray").tolist() == as_mlflow_answers()
    for shape in ("frame", "dict"):
        shaped = client.invoke(table, params={"shape": shape})
        assert shaped["predictions"] == as_mlflow_answers({"shape": shape}), shape
    assert http.get(f"{url}/health").status_code == 200

    csv = http.post(f"{url}/invocations", content=table.to_csv(index=False), headers={"Content-Type": "text/csv"})
    assert csv.status_code == 200, csv.text[:2000]
    assert csv.json()["predictions"] == as_mlflow_answers()
    latin = http.post(url, content=b"a,b\n1,2\n", headers={"Content-Type": "text/csv; charset=latin-1"})
    assert latin.status_code == 415 and "UTF-8" in latin.json()["error"]
    assert http.post(url, json={"instances": [[1.0, 2.0]], "params": "frame"}).status_code == 400
