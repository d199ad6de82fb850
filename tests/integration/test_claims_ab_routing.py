"""README: "an ``X-Request-Key`` header pins a caller to one variant (the same on every replica)".

An A/B app with three replicas; each answer names its variant, and its prediction is the pid of
the replica process that computed it. Many requests with one key reach several replicas and
always the same variant; different keys split across both variants.
"""

import random
import time
from collections import defaultdict

import pytest

pytestmark = pytest.mark.integration

APP = "sticky"
REPLICAS = 3
KEYS = 25  # not a multiple of REPLICAS, and shuffled each round: keys do not follow the front's rotation
PER_KEY = 12

MODELS = '''
import os


class WhoAnswers:
    """Predicts, for every row, the pid of the process that runs it: the replica."""

    n_features_in_ = 4

    def predict(self, rows):
        return [os.getpid()] * len(rows)
'''

STEPS = """
@step
def start(self):
    from sticky_models import WhoAnswers
    self.model_a = WhoAnswers()
    self.model_b = WhoAnswers()
    self.next(self.deploy)
"""

OPTIONS = (
    f'app="{APP}", num_replicas={REPLICAS}, num_cpus=0.25, '
    'variants={"a": {"model": "model_a", "predictor": "python", "weight": 50}, '
    '"b": {"model": "model_b", "predictor": "python", "weight": 50}}'
)


def replica_pids(http, url: str, timeout_s: float = 120) -> set[int]:
    """The app's replica pids, once all of them have answered a GET (the front spreads requests)."""
    deadline = time.monotonic() + timeout_s
    seen: set[int] = set()
    while len(seen) < REPLICAS and time.monotonic() < deadline:
        seen.add(http.get(url).json()["replica"]["pid"])
    assert len(seen) == REPLICAS, f"saw replicas {sorted(seen)} of {REPLICAS}"
    return seen


def test_a_request_key_lands_on_the_same_variant_on_every_replica(tmp_path, write_flow, run_flow, ray_head, http):
    (tmp_path / "sticky_models.py").write_text(MODELS)
    flow = write_flow(tmp_path / "sticky_flow.py", "StickyFlow", STEPS, OPTIONS)
    done = run_flow(flow)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    url = f"{ray_head.http_url}/{APP}"
    replicas = replica_pids(http, url)

    variants_by_key: dict[str, set[str]] = defaultdict(set)
    replicas_by_key: dict[str, set[int]] = defaultdict(set)
    order = random.Random(7)
    keys = [f"caller-{index}" for index in range(KEYS)]
    for _ in range(PER_KEY):
        order.shuffle(keys)
        for key in keys:
            answer = http.post(url, json={"instances": [[1.0, 2.0, 3.0, 4.0]]}, headers={"X-Request-Key": key})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["variant"] == answer.headers["x-ray-deploy-variant"]
            variants_by_key[key].add(body["variant"])
            replicas_by_key[key].add(body["predictions"][0])

    assert set().union(*replicas_by_key.values()) == replicas, "every answer comes from one of the app's replicas"
    # Each key was answered by several replicas, and by one variant on all of them.
    spread = {key: len(pids) for key, pids in replicas_by_key.items()}
    assert all(count >= 2 for count in spread.values()), spread
    mixed = {key: sorted(names) for key, names in variants_by_key.items() if len(names) != 1}
    assert not mixed, f"keys answered by more than one variant: {mixed}"
    # Different keys split across both variants (25 keys at 50/50: all on one side has p = 2**-24).
    pinned = {key: next(iter(names)) for key, names in variants_by_key.items()}
    assert set(pinned.values()) == {"a", "b"}, pinned

    # Requests without a key are split by weight, on every replica alike.
    unkeyed = {http.post(url, json={"instances": [[1.0, 2.0, 3.0, 4.0]]}).json()["variant"] for _ in range(40)}
    assert unkeyed == {"a", "b"}
