"""A Metaflow `@retry` of the deploy step is idempotent: one model version, one release, no dropped request.

The deploy step's first attempt dies right after its deploy went live, the way a task does when
its node is lost: a thread started by the step body waits, while `@ray_serve` deploys in
`task_post_step`, until the new release answers (``answered``: the rollout has moved traffic
but not finished recording it) or until the registry holds the settled release
(``recorded``: the deploy is complete, only Metaflow's own bookkeeping of the task is missing),
then ends the process with ``os._exit(1)``. Metaflow retries the task (same task pathspec) and
attempt 1 deploys again. A baseline release serves first, and a separate process keeps a
steady request load on the app across the whole retried run.

"One registry entry" here means what a user of the registry sees as one deployment:

* one model version for the task (and so for the run and step): attempt 1 finds and reuses the
  version attempt 0 registered (``Registry.find_version``); one MLflow run mirrors the Metaflow run;
* aliases: ``production`` on the new version, no ``canary`` left behind; the baseline version
  is retired, not left looking staged or serving;
* history: the new version went live once (one event takes it from no traffic to traffic), and
  the app's release records (what ``rollback`` rebuilds from) list the baseline release, then
  the new one, once each.

A retry that finds its own release mid-rollout finishes that rollout (the baseline is retired);
one that finds it already serving changes and records nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ray_deploy import Registry, delete_app
from ray_deploy.registry.history import events, releases

pytestmark = pytest.mark.integration

ROW = [5.1, 3.5, 1.4, 0.2]
RUN_TIMEOUT_S = 600

FLOW = '''
"""Train a small classifier, deploy it; the deploy step's first attempt dies once it is live."""

import os
import threading
import time

from metaflow import FlowSpec, Parameter, current, ray_serve, retry, step

APP = "APP_NAME"
ROW = [5.1, 3.5, 1.4, 0.2]


def die_once_live(task: str, url: str, crash_after: str, deadline_s: float = 400.0) -> None:
    """Simulates the task's node being lost right after its deploy went live: ends this
    process, as a lost node would, without Metaflow recording the task as done."""
    import httpx

    from ray_deploy import Registry, delete_app
    from ray_deploy.registry.history import releases

    registry = Registry()
    version = None
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            if version is None:
                found = registry.client.search_model_versions(f"name = '{APP}' and tags.`metaflow.task` = '{task}'")
                if not found:
                    continue
                version = f"{APP}/{found[0].version}"
            if crash_after == "recorded":
                settled = releases(registry, APP, APP)
                if not any(v["model_version"] == version for r in settled for v in r["variants"]):
                    continue
            answer = httpx.post(url, json={"instances": [ROW]}, timeout=5)
            if answer.status_code == 200 and answer.json().get("model_version") == version:
                print(f"simulated node loss: attempt 0 exits, {version} {crash_after}", flush=True)
                os._exit(1)
        except Exception:
            continue


class RetryFlow(FlowSpec):
    release = Parameter("release", type=int, default=1)
    crash_after = Parameter("crash_after", default="", help="answered or recorded; empty: never crash")
    url = Parameter("url", default="")

    @step
    def start(self):
        from release_model import Release

        self.model = Release(self.release)
        self.next(self.deploy)

    @retry(times=1, minutes_between_retries=0)
    @ray_serve(app=APP, predictor="python", num_cpus=0.25)
    @step
    def deploy(self):
        self.attempt = current.retry_count
        if self.crash_after and current.retry_count == 0:
            args = (current.pathspec, self.url, self.crash_after)
            threading.Thread(target=die_once_live, args=args, daemon=True).start()
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RetryFlow()
'''


@dataclass
class Scenario:
    crash_after: str
    app: str
    url: str
    baseline: str
    run_id: str
    finished: subprocess.CompletedProcess
    rows: list[dict] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    @property
    def output(self) -> str:
        return self.finished.stdout + self.finished.stderr


APP = "retried"
RELEASES = {"answered": 2, "recorded": 3}


@pytest.fixture(scope="module")
def first_release(tmp_path_factory, run_flow, ray_head, write_release_model) -> Iterator[tuple[Path, str]]:
    """The module's app serving a first release; each scenario starts from the release it finds
    serving (its baseline) and leaves one release serving."""
    directory = tmp_path_factory.mktemp(APP)
    flow = directory / "retry_flow.py"
    flow.write_text(FLOW.replace("APP_NAME", APP))
    write_release_model(directory)
    first = run_flow(flow, "--release", "1", timeout=RUN_TIMEOUT_S)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    yield flow, f"{ray_head.http_url}/{APP}"
    delete_app(APP)  # its replicas' CPUs go back to the tests that follow


@pytest.fixture(scope="module", params=["answered", "recorded"])
def scenario(request, tmp_path_factory, first_release, run_flow, recorded_load) -> Scenario:
    """A run whose deploy step dies once live and is retried, under load, replacing the baseline."""
    crash_after = request.param
    flow, url = first_release
    directory = tmp_path_factory.mktemp(crash_after)  # beside the flow's directory, not in it
    (variant,) = httpx.get(url, timeout=30).json()["variants"]
    baseline = variant["model_version"]

    body = json.dumps({"instances": [ROW]})
    load = recorded_load(url, directory, body, rate=20, max_seconds=RUN_TIMEOUT_S + 120)
    try:
        load.wait_for(20)
        started = time.time()
        run_id_file = directory / "run_id"
        finished = run_flow(
            flow,
            *("--release", str(RELEASES[crash_after]), "--crash_after", crash_after, "--url", url),
            *("--run-id-file", str(run_id_file)),
            timeout=RUN_TIMEOUT_S,
        )
        ended = time.time()
        time.sleep(3)  # answers after the run, from whatever it left serving
    finally:
        rows = load.stop()
    return Scenario(crash_after, APP, url, baseline, run_id_file.read_text().strip(), finished, rows, started, ended)


def number(version: str) -> int:
    return int(version.rsplit("/", 1)[1])


def deploy_task(scenario: Scenario):
    from metaflow import Run, namespace

    namespace(None)
    return Run(f"RetryFlow/{scenario.run_id}")["deploy"].task


def served_version(scenario: Scenario) -> str:
    (variant,) = deploy_task(scenario).data.ray_serve["variants"]
    return variant["model_version"]


def test_the_run_succeeds_on_the_retry_after_the_first_attempt_died_live(scenario):
    assert scenario.finished.returncode == 0, scenario.output[-4000:]
    assert "simulated node loss: attempt 0 exits" in scenario.output, (
        "attempt 0 was never killed after going live; the test proved nothing\n" + scenario.output[-4000:]
    )
    task = deploy_task(scenario)
    assert task.successful and task.current_attempt == 1
    assert task.data.attempt == 1


def test_one_model_version_for_the_task_and_one_mirror_run(scenario):
    registry = Registry()
    task = deploy_task(scenario)
    by_task = registry.client.search_model_versions(
        f"name = '{scenario.app}' and tags.`metaflow.task` = '{task.pathspec}'"
    )
    by_run = registry.client.search_model_versions(
        f"name = '{scenario.app}' and tags.`metaflow.run_id` = '{scenario.run_id}'"
    )
    assert [v.version for v in by_task] == [v.version for v in by_run], (by_task, by_run)
    (version,) = by_task
    assert served_version(scenario) == f"{scenario.app}/{version.version}"
    assert version.tags["metaflow.step"] == "deploy"
    # Since the baseline (an earlier scenario may have deployed before it), one new version.
    everything = registry.client.search_model_versions(f"name = '{scenario.app}'")
    since = sorted(int(v.version) for v in everything if int(v.version) >= number(scenario.baseline))
    assert since == [number(scenario.baseline), number(served_version(scenario))]
    mirrors = registry.client.search_runs(
        [registry.client.get_experiment_by_name("metaflow/RetryFlow").experiment_id],
        filter_string=f"tags.`metaflow.run` = 'RetryFlow/{scenario.run_id}'",
    )
    assert len(mirrors) == 1
    assert version.run_id == mirrors[0].info.run_id


def test_the_app_serves_the_retried_release_alone(scenario, http):
    new = served_version(scenario)
    described = http.get(scenario.url).json()
    assert [(v["model_version"], v["weight"]) for v in described["variants"]] == [(new, 100)]
    assert described["source"]["task"] == deploy_task(scenario).pathspec
    answer = http.post(scenario.url, json={"instances": [ROW, [6.7, 3.0, 5.2, 2.3]]})
    assert answer.status_code == 200, answer.text
    # The retried release's own model answers (a Release model answers its release number mod 3).
    release = RELEASES[scenario.crash_after]
    assert answer.json()["predictions"] == [release % 3] * 2 and answer.json()["model_version"] == new


def test_lineage_of_the_app_checks_out_to_the_retried_task(scenario):
    exe = Path(sys.executable).with_name("ray-deploy")
    shown = subprocess.run([str(exe), "lineage", scenario.app], capture_output=True, text=True, timeout=180)
    assert shown.returncode == 0, shown.stdout[-3000:] + shown.stderr[-3000:]
    assert served_version(scenario) in shown.stdout and deploy_task(scenario).pathspec in shown.stdout


def test_aliases_follow_the_retried_release(scenario):
    registry = Registry()
    new = registry.resolve(served_version(scenario))
    assert str(registry.resolve(f"{scenario.app}@production")) == str(new)
    aliases = registry.client.get_registered_model(scenario.app).aliases
    assert set(aliases) == {"production"}, aliases
    tags = registry.version_tags(new)
    assert tags["ray_deploy.status"] == "serving" and tags["ray.traffic_weight"] == "100"
    assert tags["ray_deploy.previous_production"] == scenario.baseline.rsplit("/", 1)[1]


def test_the_new_version_went_live_once(scenario):
    registry = Registry()
    history = events(registry, registry.resolve(served_version(scenario)))
    went_live = [
        e for before, e in zip([{"weight": 0}, *history], history) if before.get("weight", 0) == 0 and e["weight"] > 0
    ]
    assert len(went_live) == 1, [(e["action"], e["reason"], e["weight"]) for e in history]


def test_the_replaced_release_is_recorded_as_retired(scenario):
    tags = Registry().version_tags(Registry().resolve(scenario.baseline))
    assert (tags["ray_deploy.status"], tags["ray.traffic_weight"]) == ("retired", "0")


def test_the_release_records_list_each_deployment_once(scenario):
    new = served_version(scenario)
    settled = releases(Registry(), scenario.app, scenario.app)
    served = [[(v["model_version"], v["weight"]) for v in r["variants"] if v["weight"] > 0] for r in settled]
    # From the baseline's record on (an earlier scenario's releases come before it).
    start = max(i for i, r in enumerate(served) if r == [(scenario.baseline, 100)])
    assert served[start:] == [[(scenario.baseline, 100)], [(new, 100)]], [(r["action"], r["reason"]) for r in settled]


def test_no_request_failed_while_the_deploy_was_retried(scenario):
    rows = scenario.rows
    during = [r for r in rows if scenario.started <= r["start"] <= scenario.ended]
    assert len(during) >= 100, f"only {len(during)} requests during the retried run; too few to prove anything"
    failures = [r for r in rows if r["status"] != 200]
    assert not failures, f"{len(failures)} of {len(rows)} requests failed (sent != answered), e.g. {failures[:3]}"
    new = served_version(scenario)
    assert {r["model_version"] for r in rows} <= {scenario.baseline, new}
    assert {r["model_version"] for r in rows if r["start"] > scenario.ended} == {new}
