"""Ask a deployed app for predictions on held-out rows of the latest TrainFlow run.

Usage: python flows/predict_sample.py [ROWS]

Reads the rows through the Metaflow client and the endpoint through the run's `ray_serve`
artifact: nothing here knows where the model lives except what the run recorded.
"""

import json
import sys
import urllib.request

from metaflow import Flow, namespace


def main(rows: int = 3) -> None:
    namespace(None)
    run = Flow("TrainFlow").latest_successful_run
    deploy = run["deploy"].task.data
    dataset = deploy.dataset
    body = {"instances": [[float(x) for x in row] for row in dataset["X_test"][:rows]]}
    request = urllib.request.Request(
        deploy.ray_serve["url"], data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        predictions = json.loads(answer.read())["predictions"]
    print("POST %s (run %s, model %s)" % (deploy.ray_serve["url"], run.id, deploy.best_strategy))
    for prediction, label in zip(predictions, dataset["y_test"][:rows]):
        print("  predicted %s, true label %s" % (prediction, label))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
