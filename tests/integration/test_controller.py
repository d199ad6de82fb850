"""The rollout controller runs on the cluster: a rollout survives its client, its own death and a head restart.

A separate process keeps a steady load on the app (bounded in time and count) while:

* the flow process that started a canary is SIGKILLed (its whole process group) at the first
  canary step: the controller still finishes the rollout, nothing is lost;
* the controller actor's process is SIGKILLed mid-rollout (``wait: False``: the flow has already
  ended): Ray restarts it, it resumes from the persisted phase and finishes, nothing is lost;
* on a head of its own, the head is restarted mid-rollout and ``ray-deploy restore`` brings the
  last settled release back and records the interrupted rollout as rolled back; a second app,
  served by a user predictor shipped from its flow's directory, comes back with the same model
  version answering the same way (requests counted before the restart and after the restore).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ray_deploy import Registry
from ray_deploy.registry.history import events

pytestmark = pytest.mark.integration

APP = "steady"
ROW = [5.1, 3.5, 1.4, 0.2]
BODY = json.dumps({"instances": [ROW]})

PREDICTORS = '''
class Named:
    """A user predictor: it must come back with the app, shipped from the flow's directory."""

    def __init__(self, model, config):
        self.model = model
        self.n_features = 4

    def predict(self, rows):
        return [f"class-{label}" for label in self.model.predict(rows)]
'''


def canary(wait: bool, interval_s: float = 5) -> str:
    policy = {"strategy": "canary", "steps": [30, 100], "interval_s": interval_s, "max_error_rate": 0.05}
    return json.dumps({**policy, "wait": wait}).replace("true", "True").replace("false", "False")


def write(write_flow, directory: Path, app: str, rollout: str, steps: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    options = f'app="{app}", num_cpus=0.25, predictor="python", rollout={rollout}'
    return write_flow(directory / "steady_flow.py", "SteadyFlow", steps, options)


def served(url: str) -> list[tuple[str, float]]:
    return [(v["model_version"], v["weight"]) for v in httpx.get(url, timeout=30).json()["variants"]]


def split_in_two(url: str) -> bool:
    """Whether the app serves two releases, each with a share of traffic (a canary step)."""
    return len([weight for _, weight in served(url) if weight > 0]) == 2


def wait_until(check, timeout: float, what: str, every: float = 0.5):
    """Poll ``check`` until it answers; ``every`` a couple of seconds for checks that start a process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def ray_deploy(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ray-deploy")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env)


def status(app: str, env: dict | None = None) -> dict:
    shown = ray_deploy("status", app, "--json", env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    (row,) = json.loads(shown.stdout)
    return row


def test_the_rollout_outlives_the_killed_flow_and_the_killed_controller(
    tmp_path, write_flow, run_flow, ray_head, recorded_load, release_steps
):
    url = f"{ray_head.http_url}/{APP}"
    flow = write(write_flow, tmp_path / "flow", APP, canary(wait=True), release_steps)
    first = run_flow(flow, "--release", "1")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    ((v1, _),) = served(url)

    load = recorded_load(url, tmp_path, BODY, rate=25, max_seconds=600)
    try:
        load.wait_for(20)
        # 1. The flow process (and its task) SIGKILLed at the first canary step.
        started = subprocess.Popen(
            [sys.executable, str(flow), "--no-pylint", "run", "--release", "2"],
            cwd=str(flow.parent),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        seen: list[str] = []
        deadline = time.monotonic() + 300
        for line in started.stdout:
            seen.append(line)
            if "canary step 1/2" in line or time.monotonic() > deadline:
                break
        assert any("canary step 1/2" in line for line in seen), "".join(seen)[-4000:]
        killed_at = time.time()
        os.killpg(started.pid, signal.SIGKILL)
        started.wait(timeout=30)
        v2 = wait_until(
            lambda: served(url)[0][0] if len(served(url)) == 1 and served(url)[0][0] != v1 else None,
            180,
            "the controller to finish the rollout the killed flow started",
        )
        finished_at = time.time()

        # 2. The controller's own process SIGKILLed mid-rollout; the flow has handed over and ended.
        third_flow = write(write_flow, tmp_path / "third", APP, canary(wait=False, interval_s=8), release_steps)
        third = run_flow(third_flow, "--release", "3")
        assert third.returncode == 0, (third.stdout + third.stderr)[-4000:]
        assert "rollout continues in controller 'rollout:steady'" in third.stdout + third.stderr
        row = status(APP)
        assert row["phase"] in ("staged", "stepping"), row["rollout"]
        assert row["controller"] == f"rollout:{APP}"
        pid_before = controller_pid(APP)
        os.kill(pid_before, signal.SIGKILL)
        v3 = wait_until(
            lambda: served(url)[0][0] if len(served(url)) == 1 and served(url)[0][0] not in (v1, v2) else None,
            180,
            "the restarted controller to finish the rollout",
        )
        assert controller_pid(APP) != pid_before, "the controller was not restarted"
        time.sleep(2)
    finally:
        rows = load.stop()

    failures = [r for r in rows if r["status"] != 200]
    assert not failures, f"{len(failures)} of {len(rows)} requests failed, e.g. {failures[:3]}"
    assert len([r for r in rows if killed_at <= r["start"] <= finished_at]) >= 20, "too little load during the rollout"
    after_kill = {r["model_version"] for r in rows if r["start"] >= killed_at and r["end"] <= finished_at}
    assert after_kill == {v1, v2}, "traffic kept moving after the flow died"

    registry = Registry()
    user = os.environ["USERNAME"]
    for version in (v2, v3):
        history = events(registry, registry.resolve(version))
        actions = [e["action"] for e in history]
        # This version's own rollout: from its staging to its promotion (v2 later appears in v3's).
        history = history[: actions.index("promoted") + 1]
        actions = actions[: len(history)]
        assert actions.count("staged") == 1 and actions[-1] == "promoted", actions
        # One traffic step per step of the plan: a restarted controller does not apply a step twice.
        assert actions.count("traffic") == 2, actions
        assert {e["by"] for e in history} == {user}, "the controller records the changes as the deploying user's"
    assert str(registry.resolve(f"{APP}@production")) == v3
    last = status(APP)["last_rollout"]
    assert last["phase"] == "promoted", last


def controller_pid(app: str) -> int:
    import ray

    from ray_deploy.cluster import connect
    from ray_deploy.control.controller import CONTROLLER_NAMESPACE, controller_name

    with connect(start_local=False):
        handle = ray.get_actor(controller_name(app), namespace=CONTROLLER_NAMESPACE)
        deadline = time.monotonic() + 60
        while True:
            try:
                return ray.get(handle.progress.remote(10**9), timeout=10)["pid"]
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


PORTS = {
    "RAY_DEPLOY_GCS_PORT": "6699",
    "RAY_DEPLOY_DASHBOARD_PORT": "8698",
    "RAY_DEPLOY_HTTP_PORT": "8697",
    "RAY_DEPLOY_METRICS_PORT": "8696",
    "RAY_DEPLOY_CLIENT_PORT": "9097",
}


def test_operators_and_a_head_restart_follow_the_state_machine_and_the_apps_own_aliases(
    tmp_path, write_flow, run_flow, counted_load, release_steps
):
    """On a head of its own: an app deployed with its own aliases (``live``/``trial``) keeps them
    through the controller, an operator's refused split and promote, a head restart mid-rollout
    followed by ``restore``, and a rollback rebuilt from the registry; ``production``/``canary``
    never appear."""
    env = {**os.environ, **PORTS}
    app = "phase"
    url = f"http://127.0.0.1:{PORTS['RAY_DEPLOY_HTTP_PORT']}/{app}"
    assert ray_deploy("cluster", "up", env=env).returncode == 0
    registry = Registry()

    def recorded_rollout() -> dict:
        tags = registry.client.get_registered_model(app).tags or {}
        return json.loads(tags.get(f"ray_deploy.rollout.{app}", "{}"))

    def aliases() -> dict[str, str]:
        found = registry.client.get_registered_model(app).aliases or {}
        return {alias: f"{app}/{version}" for alias, version in found.items()}

    try:
        rollout = canary(wait=False, interval_s=600)
        flow = write(
            write_flow,
            tmp_path / "flow",
            app,
            rollout + ', production_alias="live", canary_alias="trial"',
            release_steps,
        )
        first = run_flow(flow, "--release", "1", env=env)
        assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
        ((v1, _),) = served(url)
        second = run_flow(flow, "--release", "2", env=env)
        assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
        # Watched over HTTP (the app's own answer), then the phase read once with the CLI.
        wait_until(lambda: split_in_two(url), 120, "the canary's first step")
        assert status(app, env)["phase"] == "stepping"
        split = dict(served(url))
        v2 = next(v for v in split if v != v1)
        assert (split[v1], split[v2]) == (70, 30)
        # The step is recorded once Serve serves it: the aliases follow within moments.
        wait_until(lambda: aliases() == {"live": v1, "trial": v2}, 60, f"live -> {v1}, trial -> {v2}: {aliases()}")

        # While the controller drives, a split is refused naming the phase; a promote is handed to it.
        refused = ray_deploy("traffic", app, "--set", f"default@v{v1.rsplit('/', 1)[1]}=100", env=env)
        assert refused.returncode != 0 and "is stepping: its rollout controller moves the traffic" in refused.stderr
        promoted = ray_deploy("promote", app, env=env)
        assert promoted.returncode == 0, promoted.stderr[-3000:]
        assert served(url) == [(v2, 100)] and aliases() == {"live": v2}
        again = ray_deploy("promote", app, env=env)
        assert again.returncode != 0 and "is settled (no rollout is in progress)" in again.stderr

        # A second app, served by user code from its flow's directory, settled when the head goes.
        (tmp_path / "phoenix").mkdir()
        (tmp_path / "phoenix" / "phoenix_predictors.py").write_text(PREDICTORS)
        options = 'app="phoenix", predictor="phoenix_predictors:Named", num_cpus=0.25'
        phoenix_flow = write_flow(tmp_path / "phoenix" / "phoenix_flow.py", "PhoenixFlow", release_steps, options)
        done = run_flow(phoenix_flow, "--release", "2", env=env)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        phoenix = f"http://127.0.0.1:{PORTS['RAY_DEPLOY_HTTP_PORT']}/phoenix"
        rows = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}
        before = httpx.post(phoenix, json=rows, timeout=30).json()
        assert before["predictions"] == ["class-2", "class-2"]  # release 2 of the Release model, by Named
        with counted_load(phoenix, json.dumps(rows)) as load:
            time.sleep(1.5)
        load.assert_nothing_lost()

        # The head restarts mid-rollout of v3: restore brings v2 back and records v3's rollout as
        # rolled back, and brings the other app back as it was.
        third = run_flow(flow, "--release", "3", env=env)
        assert third.returncode == 0, (third.stdout + third.stderr)[-4000:]
        wait_until(lambda: split_in_two(url), 120, "the third release's first step")
        assert status(app, env)["phase"] == "stepping"
        v3 = next(v for v, _ in served(url) if v not in (v1, v2))
        # The registry records the step moments after Serve serves it; the head goes after that.
        wait_until(lambda: recorded_rollout().get("percent") == 30, 60, f"the 30% step recorded: {recorded_rollout()}")
        assert ray_deploy("cluster", "down", env=env).returncode == 0
        assert ray_deploy("cluster", "up", env=env).returncode == 0
        missing = ray_deploy("status", "phoenix", env=env)
        assert missing.returncode == 1 and "no app 'phoenix'" in missing.stderr
        for name in (app, "phoenix"):
            restored = ray_deploy("restore", name, env=env)
            assert restored.returncode == 0, restored.stderr[-3000:]
            assert f"restored: {name}" in restored.stdout, restored.stdout
        assert served(url) == [(v2, 100)]
        after = httpx.post(phoenix, json=rows, timeout=30).json()
        assert after.pop("request_id") != before.pop("request_id")  # every answer is named anew
        assert after == before, "the same model version answers the same way after the restart"
        with counted_load(url, BODY) as load, counted_load(phoenix, json.dumps(rows)) as other:
            time.sleep(1.5)
        load.assert_nothing_lost()
        other.assert_nothing_lost()
        again = ray_deploy("restore", "phoenix", env=env)
        assert again.returncode == 0 and "left as it is" in again.stderr
        row = status(app, env)
        assert row["phase"] == "settled" and row["last_rollout"]["phase"] == "rolled_back", row["last_rollout"]
        tags = registry.version_tags(registry.resolve(v3))
        assert tags["ray_deploy.status"] == "rolled_back", tags
        assert "lost app 'phase' during a rollout (stepping at 30%)" in tags["ray_deploy.rollback_reason"]
        assert aliases() == {"live": v2}

        # A rollback of the settled app rebuilds the previous release from the registry.
        back = ray_deploy("rollback", app, "--reason", "test: back to v1", env=env)
        assert back.returncode == 0, back.stderr[-3000:]
        assert served(url) == [(v1, 100)] and aliases() == {"live": v1}
    finally:
        ray_deploy("cluster", "down", env=env, timeout=120)
