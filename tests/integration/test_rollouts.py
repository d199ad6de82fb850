"""Rollouts under load: a canary v1 -> v2, an automatic rollback of a broken v3, a manual rollback.

A separate process keeps a steady request load on the app throughout (bounded in time and
count); every request must succeed, and each answer must come from a version that was live then.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from metaflow import Run

from ray_deploy import Registry

pytestmark = pytest.mark.integration

APP = "rollout"
ROW = [5.1, 3.5, 1.4, 0.2]
CANARY = '{"strategy": "canary", "steps": [25, 100], "interval_s": 4, "max_error_rate": 0.05}'

MODELS = '''
class Broken:
    """Loads fine, fails every request: what a bad release looks like once it meets traffic."""

    def __init__(self, inner):
        self.inner = inner

    def predict(self, rows):
        raise RuntimeError("this release is broken")
'''


def rollout_flow(write_flow, directory: Path, app: str = APP, rollout: str = CANARY, variants: str = "") -> Path:
    (directory / "rollout_models.py").write_text(MODELS)
    steps = """
    release = Parameter("release", type=int, default=1)
    broken = Parameter("broken", type=bool, default=False)

    @step
    def start(self):
        from release_model import Release
        model = Release(self.release)
        if self.broken:
            from rollout_models import Broken
            model = Broken(model)
        self.model = model
        self.next(self.deploy)
    """
    options = f'app="{app}", num_cpus=0.25, rollout={rollout}, '
    options += f"variants={variants}" if variants else 'predictor="python"'
    return write_flow(directory / "rollout_flow.py", "RolloutFlow", steps, options)


def ray_deploy(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ray-deploy")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)


def describe(http, url: str) -> dict:
    return http.get(url).json()


def answered(rows: list[dict], start: float, end: float) -> set:
    """Model versions of the answers to requests sent and answered inside [start, end]."""
    return {r["model_version"] for r in rows if r["start"] >= start and r["end"] <= end}


def test_rollouts_and_rollbacks_under_load_drop_nothing(
    tmp_path, write_flow, run_flow, run_user, ray_head, cancer_url, http, recorded_load
):
    (tmp_path / "flow").mkdir()
    flow = rollout_flow(write_flow, tmp_path / "flow")
    first = run_flow(flow, "--release", "1")
    assert first.returncode == 0, first.stderr[-4000:]
    url = f"{ray_head.http_url}/{APP}"
    v1 = describe(http, url)["variants"][0]["model_version"]
    bystander = describe(http, cancer_url)

    load = recorded_load(url, tmp_path, json.dumps({"instances": [ROW]}), rate=25, max_seconds=600)
    try:
        load.wait_for(20)
        canary_start = time.time()
        second = run_flow(flow, "--release", "2", "--run-id-file", str(tmp_path / "second_run_id"))
        canary_end = time.time()
        output = second.stdout + second.stderr
        assert second.returncode == 0, output[-4000:]
        assert "canary step 1/2: 25% to the new release" in output, output[-4000:]
        assert "gate passed at 25%" in output
        v2 = describe(http, url)["variants"][0]["model_version"]
        assert v2 != v1

        time.sleep(2)
        broken_start = time.time()
        third = run_flow(flow, "--release", "3", "--broken", "True")
        broken_end = time.time()
        output = third.stdout + third.stderr
        assert third.returncode != 0, output[-3000:]
        assert "Rollout rolled back" in output and "error rate" in output, output[-3000:]
        # The controller that drove v2 still lingers and drives v3: its v2 lines are not replayed.
        assert f"rollout of default@v{v2.rsplit('/', 1)[1]} from" not in output, output[-3000:]
        assert [v["model_version"] for v in describe(http, url)["variants"]] == [v2]

        time.sleep(2)
        manual_start = time.time()
        undone = ray_deploy("rollback", APP, "--reason", "test: back to v1")
        manual_end = time.time()
        assert undone.returncode == 0, undone.stderr[-3000:]
        time.sleep(2)
    finally:
        rows = load.stop()

    failures = [r for r in rows if r["status"] != 200]
    assert not failures, f"{len(failures)} of {len(rows)} requests failed, e.g. {failures[:3]}"
    assert len(rows) >= 200, "the load generator sent too few requests to prove anything"
    assert answered(rows, 0, canary_start) == {v1}
    assert answered(rows, canary_start, canary_end) == {v1, v2}, "the canary never got traffic"
    assert answered(rows, canary_end, broken_start) == {v2}
    # The broken release got its canary share; its failures were answered by v2 and counted.
    assert answered(rows, broken_start, broken_end) == {v2}
    v3 = f"{APP}/{int(v2.rsplit('/', 1)[1]) + 1}"
    rescued = [r for r in rows if r.get("fallback_from") == f"default@v{v3.rsplit('/', 1)[1]}"]
    assert rescued and all(broken_start <= r["start"] <= broken_end for r in rescued)
    assert answered(rows, broken_end, manual_start) == {v2}
    assert answered(rows, manual_start, manual_end) <= {v1, v2}
    assert answered(rows, manual_end, float("inf")) == {v1}

    # The other app on the cluster never noticed: same replica, same models.
    after = describe(http, cancer_url)
    assert after["replica"] == bystander["replica"] and after["variants"] == bystander["variants"]

    # Every change is on the model versions: who, when, why, and the gates' numbers.
    registry = Registry()
    tags = {v: registry.version_tags(registry.resolve(v)) for v in (v1, v2, v3)}
    assert tags[v3]["ray_deploy.status"] == "rolled_back"
    assert "error rate" in tags[v3]["ray_deploy.rollback_reason"]
    assert tags[v2]["ray_deploy.status"] == "rolled_back"
    assert "test: back to v1" in tags[v2]["ray_deploy.rollback_reason"]
    assert tags[v1]["ray_deploy.status"] == "serving"
    assert str(registry.resolve(f"{APP}@production")) == v1
    v2_events = [json.loads(tags[v2][k]) for k in sorted(tags[v2]) if k.startswith("ray_deploy.event.")]
    actions = [e["action"] for e in v2_events]
    assert actions[:2] == ["staged", "traffic"] and "gate_passed" in actions and "promoted" in actions
    # By whom: the user the run ran as (the rollback command ran in the same environment).
    user = run_user(Run(f"RolloutFlow/{(tmp_path / 'second_run_id').read_text()}", _namespace_check=False))
    assert actions[-1] == "rolled_back" and all(e["by"] == user for e in v2_events), (user, v2_events)
    gates = [e["gate"] for e in v2_events if e.get("gate")]
    assert gates and gates[0]["passed"] and gates[0]["canary"]["requests"] > 0

    # `ray-deploy lineage` shows each version's traffic history and why it was rolled back.
    shown = ray_deploy("lineage", "--model", v3)
    assert "traffic history:" in shown.stdout and "automatic rollback: gate failed at 25%" in shown.stdout

    # Traffic shares and gate numbers are also metrics on the MLflow run mirroring v2's Metaflow run.
    run_id = registry.client.get_model_version(*v2.split("/")).run_id
    metrics = registry.client.get_run(run_id).data.metrics
    assert any(k.endswith(".traffic_pct") for k in metrics) and any(k.endswith(".error_rate") for k in metrics)


def test_a_holding_canary_is_the_operators_and_a_second_deployer_is_turned_away(
    tmp_path, write_flow, run_flow, run_user, ray_head, http
):
    """Steps short of 100 hold the canary; traffic/promote/rollback from the flow's own CLI; the
    app lock refuses a flow that deploys while another change is in progress, changing nothing."""
    from ray_deploy import connect
    from ray_deploy.control.lock import BRIEF_WAIT_S, app_lock

    app = "held"
    (tmp_path / "flow").mkdir()
    flow = rollout_flow(
        write_flow, tmp_path / "flow", app=app, rollout='{"strategy": "canary", "steps": [30], "interval_s": 1}'
    )
    url = f"{ray_head.http_url}/{app}"
    for args in (("--release", "1", "--run-id-file", str(tmp_path / "first_run_id")), ("--release", "2")):
        done = run_flow(flow, *args)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (status,) = json.loads(ray_deploy("status", app, "--json").stdout)
    assert status["rollout"]["percent"] == 30 and status["rollout"]["strategy"] == "canary"
    (old,), (new,) = status["rollout"]["old"], status["rollout"]["new"]
    assert {v["label"]: v["weight"] for v in status["variants"]} == {old: 70, new: 30}

    def flow_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(flow), "--no-pylint", "ray-serve", *args],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=str(flow.parent),
        )

    split = flow_cli("traffic", "--set", f"{old}=50,{new}=50", "--reason", "more evidence")
    assert split.returncode == 0, split.stderr[-2000:]
    assert {v["label"]: v["weight"] for v in describe(http, url)["variants"]} == {old: 50, new: 50}
    bad = flow_cli("traffic", "--set", f"{old}=50,{new}=40")
    assert bad.returncode != 0 and "add up to 100" in bad.stdout + bad.stderr

    before = describe(http, url)["variants"]
    with connect(None, start_local=False), app_lock(app, "a test holding the lock"):
        asked = time.monotonic()
        refused = ray_deploy("promote", app)
        assert refused.returncode == 1
        assert "AppLocked" in refused.stderr and "a test holding the lock" in refused.stderr
        # Turned away at once: an operator's move waits only for a controller step.
        assert time.monotonic() - asked < BRIEF_WAIT_S / 2, "promote waited for a lock it should not wait for"
        loser = run_flow(flow, "--release", "3")
        output = loser.stdout + loser.stderr
        # The refusal names the lock's holder: this process, run by the user the flow's runs ran as.
        user = run_user(Run(f"RolloutFlow/{(tmp_path / 'first_run_id').read_text()}", _namespace_check=False))
        assert loser.returncode != 0 and f"is being changed by {user} on " in output, output[-3000:]
    assert describe(http, url)["variants"] == before

    promoted = flow_cli("promote")
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    assert [(v["label"], v["weight"]) for v in describe(http, url)["variants"]] == [(new, 100)]

    undone = flow_cli("rollback", "--reason", "operator test")
    assert undone.returncode == 0, undone.stderr[-2000:]
    assert [(v["label"], v["weight"]) for v in describe(http, url)["variants"]] == [(old, 100)]
    answer = http.post(url, json={"instances": [ROW]})
    assert answer.status_code == 200 and answer.json()["model_version"] == f"{app}/{old.split('@v')[1]}"


def test_isolated_releases_show_side_by_side_in_the_dashboard(tmp_path, write_flow, run_flow, ray_head, http):
    """An isolated variant runs in a Serve app of its own, named by variant and release: during a
    rollout the dashboard lists the old and the new release with their replica states."""
    from ray_deploy.cluster import auth_headers

    app = "iso"
    (tmp_path / "flow").mkdir()
    flow = rollout_flow(
        write_flow,
        tmp_path / "flow",
        app=app,
        rollout='{"strategy": "canary", "steps": [50], "interval_s": 1}',
        variants='{"default": {"model": "model", "predictor": "python", "isolate": True, "num_cpus": 0.25}}',
    )
    url = f"{ray_head.http_url}/{app}"
    first = run_flow(flow, "--release", "1")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    second = run_flow(flow, "--release", "2")
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    (status,) = json.loads(ray_deploy("status", app, "--json").stdout)
    (old,), (new,) = status["rollout"]["old"], status["rollout"]["new"]
    old_app, new_app = f"{app}--{old.replace('@', '-')}", f"{app}--{new.replace('@', '-')}"

    shown = http.get(f"{ray_head.dashboard_url}/api/serve/applications/", headers=auth_headers()).json()
    for name, label in ((old_app, old), (new_app, new)):
        deployment = shown["applications"][name]["deployments"][label.replace("@", "-")]
        assert deployment["status"] == "HEALTHY"
        assert [r["state"] for r in deployment["replicas"]] == ["RUNNING"]
    assert {v["label"]: v["isolated_app"] for v in status["variants"]} == {old: old_app, new: new_app}

    versions = {http.post(url, json={"instances": [ROW]}).json()["model_version"] for _ in range(40)}
    assert versions == {f"{app}/{old.split('@v')[1]}", f"{app}/{new.split('@v')[1]}"}
    bad = http.post(url, json={"instances": [[1.0]]})
    assert bad.status_code == 400 and "error" in bad.json()
    # The Open Inference Protocol reaches isolated releases too: at the server's root, each pinned by
    # its version number, answered by its own app.
    tensor = {"name": "input", "shape": [1, 4], "datatype": "FP64", "data": ROW}
    for label in (old, new):
        number = label.split("@v")[1]
        pinned = http.post(f"{ray_head.http_url}/v2/models/{app}/versions/{number}/infer", json={"inputs": [tensor]})
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["model_version"] == number and pinned.json()["outputs"][0]["data"] == [int(number) % 3]

    assert ray_deploy("promote", app).returncode == 0
    deadline = time.monotonic() + 60
    while old_app in ray_deploy_apps(http, ray_head) and time.monotonic() < deadline:
        time.sleep(1)
    assert old_app not in ray_deploy_apps(http, ray_head) and new_app in ray_deploy_apps(http, ray_head)
    assert {http.post(url, json={"instances": [ROW]}).json()["model_version"] for _ in range(10)} == {
        f"{app}/{new.split('@v')[1]}"
    }
    deleted = ray_deploy("delete", app, "never-deployed")
    assert deleted.returncode == 0, deleted.stderr[-2000:]
    assert f"deleted app {app!r}" in deleted.stdout and "app 'never-deployed' was not deployed" in deleted.stdout
    assert not [name for name in ray_deploy_apps(http, ray_head) if name.startswith(app)]


def ray_deploy_apps(http, ray_head) -> set:
    from ray_deploy.cluster import auth_headers

    return set(
        http.get(f"{ray_head.dashboard_url}/api/serve/applications/", headers=auth_headers()).json()["applications"]
    )


def test_a_change_waits_for_a_controller_step_but_not_for_another_change(ray_head):
    """The rollout controller holds an app's lock for the seconds one step takes: a deploy (or a
    retried deploy step) that meets it waits; any other holder turns the change away at once."""
    import threading

    from ray_deploy import connect
    from ray_deploy.control.lock import app_lock
    from ray_deploy.errors import AppLocked

    def hold(purpose: str, taken: threading.Event, seconds: float) -> None:
        with app_lock("lock-demo", purpose):
            taken.set()
            time.sleep(seconds)

    with connect(None, start_local=False):
        taken = threading.Event()
        step = threading.Thread(target=hold, args=("rollout", taken, 3.0))
        step.start()
        assert taken.wait(60)
        started = time.monotonic()
        with app_lock("lock-demo", "deploy"):
            waited = time.monotonic() - started
        step.join()
        assert waited >= 2.0, f"the deploy took the lock while the controller held it ({waited:.1f}s)"

        taken = threading.Event()
        operator = threading.Thread(target=hold, args=("traffic", taken, 4.0))
        operator.start()
        assert taken.wait(60)
        with pytest.raises(AppLocked, match=r"is being changed by .*traffic"):
            with app_lock("lock-demo", "deploy"):
                pass
        assert operator.is_alive(), "the change waited for an operator's lock instead of being turned away"
        operator.join()

        # A holder that dies mid-change (SIGKILL: no `finally` runs) does not leave the app locked.
        holder = subprocess.Popen(
            [sys.executable, "-c", KILLED_HOLDER],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "holding", "the holder process did not take the lock"
            with pytest.raises(AppLocked, match=r"is being changed by .*a doomed deploy"):
                with app_lock("lock-demo", "deploy"):
                    pass
        finally:
            holder.kill()
            holder.wait(30)
        started = time.monotonic()
        with app_lock("lock-demo", "deploy"):
            taken_after = time.monotonic() - started
        assert taken_after < 30, f"the dead holder's lock was taken over only after {taken_after:.0f}s"


KILLED_HOLDER = """
import time
from ray_deploy import connect
from ray_deploy.control.lock import app_lock
with connect(None, start_local=False), app_lock("lock-demo", "a doomed deploy"):
    print("holding", flush=True)
    time.sleep(600)
"""
