"""A/B test the ONNX export of a model against the native XGBoost model, behind one endpoint.

The seed story's last act: after picking a model, export it to ONNX and serve both formats side
by side, 50/50, to compare them on live traffic. The ONNX variant is derived from the XGBoost
one, so it must pass the parity gate (same probabilities within 1e-5, same labels, on the
held-out rows) before it takes any traffic. Every request is captured (its rows, the answer, the
variant, the latency) under the flow's datastore root, and once the 100 test requests are
answered their true labels are posted to the app's /feedback, as delayed labels would arrive:
each variant gets a live accuracy, and flows/ab_review_flow.py picks the winner from them.

    python flows/ab_flow.py run
    curl -s -H 'Content-Type: application/json' -H 'X-Request-Key: user-42' \\
        -d '{"instances": [[...30 numbers...]]}' http://127.0.0.1:8000/cancer-ab
    python flows/ab_review_flow.py run      # compare the variants on their labels, promote the winner
"""

from metaflow import FlowSpec, Parameter, ray_serve, step


class ABTestFlow(FlowSpec):
    """Serve an XGBoost model and its ONNX export side by side."""

    seed = Parameter("seed", help="Random seed for the split and the model.", default=11)

    @step
    def start(self):
        import xgboost as xgb
        from sklearn.datasets import load_breast_cancer
        from sklearn.model_selection import train_test_split

        from ray_deploy import xgboost_to_onnx

        X, y = load_breast_cancer(return_X_y=True)
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=self.seed, stratify=y)
        self.dataset = {"X_train": X_train, "y_train": y_train, "X_test": X_test, "y_test": y_test}
        self.model = xgb.XGBClassifier(n_estimators=100, max_depth=4, n_jobs=1, random_state=self.seed)
        self.model.fit(X_train, y_train)
        self.model_onnx = xgboost_to_onnx(self.model)
        self.accuracy = float(self.model.score(X_test, y_test))
        self.next(self.deploy)

    @ray_serve(
        app="cancer-ab",
        variants={
            "xgb": {"model": "model", "predictor": "xgboost", "weight": 50},
            "onnx": {"model": "model_onnx", "predictor": "onnx", "weight": 50, "derived_from": "xgb"},
        },
        parity_rows="dataset.X_test",
        data=["dataset"],
        metrics=["accuracy"],
        num_cpus=0.5,
        capture={"sample": 1.0, "flush_s": 1},
    )
    @step
    def deploy(self):
        self.next(self.end)

    @step
    def end(self):
        import json
        import urllib.error
        import urllib.request
        from collections import Counter

        url = self.ray_serve["url"]
        answered = Counter()
        labels = []
        for row, truth in zip(self.dataset["X_test"][:100], self.dataset["y_test"][:100]):
            request = urllib.request.Request(
                url,
                data=json.dumps({"instances": [[float(x) for x in row]]}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as answer:
                body = json.loads(answer.read())
            answered[body["variant"]] += 1
            labels.append({"request_id": body["request_id"], "label": int(truth)})
        print("%s" % self.ray_serve["parity"][0]["summary"])
        print("100 requests to %s were answered by: %s" % (url, dict(answered)))

        # The true labels arrive later, as they would in production (a diagnosis confirmed): one
        # POST to the app's /feedback scores each against the answer it labels, per variant.
        request = urllib.request.Request(
            url + "/feedback", data=json.dumps(labels).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                accepted = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError("%s/feedback refused the labels: %s %s" % (url, exc.code, exc.read().decode())) from exc
        self.labels_accepted = accepted["accepted"]
        print("%d labels accepted by %s/feedback (scored by %s)" % (self.labels_accepted, url, accepted["quality"]))


if __name__ == "__main__":
    ABTestFlow()
