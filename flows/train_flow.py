"""Train several XGBoost models, keep the best, and serve it with Ray Serve.

The story of "From training to deployment with Metaflow and Cortex", on scikit-learn's bundled
breast-cancer data (nothing is downloaded):

    start    load the data set and split it (the split is an artifact: the model's input data)
    train    one XGBoost strategy per branch of a foreach
    join     evaluate every strategy on held-out data and keep the best
    deploy   @ray_serve serves the best model; the app outlives the run
    end      ask the live endpoint for a prediction

Run it with ``python flows/train_flow.py run``; then
``curl -s -H 'Content-Type: application/json' -d '{"instances": [[...30 numbers...]]}' http://127.0.0.1:8000/cancer``.
"""

from metaflow import FlowSpec, Parameter, current, ray_serve, step

STRATEGIES = [
    {"name": "shallow", "params": {"n_estimators": 60, "max_depth": 2, "learning_rate": 0.3}},
    {"name": "deep", "params": {"n_estimators": 100, "max_depth": 6, "learning_rate": 0.1}},
    {"name": "regularized", "params": {"n_estimators": 100, "max_depth": 4, "learning_rate": 0.1, "reg_lambda": 5.0}},
]


class TrainFlow(FlowSpec):
    """Train, select and serve a breast-cancer classifier."""

    seed = Parameter("seed", help="Random seed for the split and the models.", default=7)
    test_size = Parameter("test_size", help="Share of rows held out for evaluation.", default=0.25)

    @step
    def start(self):
        from sklearn.datasets import load_breast_cancer
        from sklearn.model_selection import train_test_split

        data = load_breast_cancer()
        X_train, X_test, y_train, y_test = train_test_split(
            data.data, data.target, test_size=self.test_size, random_state=self.seed, stratify=data.target
        )
        self.dataset = {
            "source": "sklearn.datasets.load_breast_cancer",
            "feature_names": [str(name) for name in data.feature_names],
            "X_train": X_train,
            "y_train": y_train,
            "X_test": X_test,
            "y_test": y_test,
        }
        self.strategies = STRATEGIES
        self.next(self.train, foreach="strategies")

    @step
    def train(self):
        import xgboost as xgb
        from sklearn.metrics import accuracy_score, roc_auc_score

        self.strategy = self.input["name"]
        model = xgb.XGBClassifier(**self.input["params"], n_jobs=1, random_state=self.seed)
        model.fit(self.dataset["X_train"], self.dataset["y_train"])
        X_test, y_test = self.dataset["X_test"], self.dataset["y_test"]
        self.metrics = {
            "accuracy": float(accuracy_score(y_test, model.predict(X_test))),
            "auc": float(roc_auc_score(y_test, model.predict_proba(X_test)[:, 1])),
        }
        self.model = model
        self.next(self.join)

    @step
    def join(self, inputs):
        best = max(inputs, key=lambda branch: (branch.metrics["auc"], branch.metrics["accuracy"]))
        self.scores = {branch.strategy: branch.metrics for branch in inputs}
        self.best_strategy = best.strategy
        self.best_metrics = best.metrics
        self.best_model = best.model
        self.merge_artifacts(inputs, include=["dataset"])
        print("scores: %s; keeping %r" % (self.scores, self.best_strategy))
        self.next(self.deploy)

    @ray_serve(
        app="cancer",
        model="model",
        predictor="xgboost",
        num_cpus=0.5,
        data=["dataset"],
        metrics=["best_metrics", "scores"],
    )
    @step
    def deploy(self):
        self.model = self.best_model
        self.next(self.end)

    @step
    def end(self):
        import json
        import urllib.request

        row = [float(x) for x in self.dataset["X_test"][0]]
        request = urllib.request.Request(
            self.ray_serve["url"],
            data=json.dumps({"instances": [row]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            prediction = json.loads(answer.read())["predictions"][0]
        record = self.ray_serve
        print("run %s: model %r serves at %s" % (current.run_id, self.best_strategy, record["url"]))
        print(
            "live prediction for the first held-out row: %s (true label %s)" % (prediction, self.dataset["y_test"][0])
        )
        print("lineage:")
        for variant in record["variants"]:
            print(
                "  app %s -> variant %s -> MLflow model version %s (%s)"
                % (record["app"], variant["name"], variant["model_version"], record["registry_uri"])
            )
            print("  -> artifact %s (sha256 %s...)" % (variant["model_uri"], variant["sha256"][:16]))
            origin = record["lineage"].get("model_origins", {}).get(variant["name"], record["lineage"]["task"])
            print("  -> trained by task %s (deployed by %s)" % (origin.rsplit("/", 1)[0], record["lineage"]["task"]))
        for data in record["lineage"]["data"]:
            print("  -> input data %s (sha256 %s...)" % (data["pathspec"], data["sha256"][:16]))


if __name__ == "__main__":
    TrainFlow()
