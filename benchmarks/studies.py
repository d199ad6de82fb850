"""Studies of one head as users size clusters by (issue #17), run on the ``default`` head after its rows.

    apps       N apps deployed one after the other with the package's ``deploy`` (one ONNX replica
               each, the same model): each app's deploy and first-answer time, and at each
               checkpoint (10 and 30 apps) the memory of a replica (resident and unique), of Serve's
               controller and of our front (its actor and HAProxy), and the controller's idle CPU.
    scale_out  one app with replica autoscaling on (1 to ``SCALE_MAX_REPLICAS``): one caller, then
               a step to 32. wrk measures one-second slices back to back (p99 per slice) while a
               thread polls Serve's replica states: each new replica's start (STARTING seen to
               RUNNING seen, to the poll's resolution) and the time from the step until every later
               slice's p99 stays under 2x its steady value (the median p99 of the last slices).

Each study deploys apps of its own and deletes them at the end, whatever happened; its result says
what failed instead of raising, like a row.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import threading
import time
import traceback
from typing import Any

from benchmarks.measure import measure_http, wait_until_answers
from benchmarks.plan import Plan

APP_PREFIX = "bench-app-"
APP_NUM_CPUS = 0.05
"""Logical CPUs each of the many apps' replicas reserves, so that 30 fit on the benchmark head
(4 logical CPUs); the replicas share the machine's cores as any idle apps do."""
CONTROLLER_IDLE_S = 3.0
"""Seconds over which the idle CPU of Serve's controller is read at each checkpoint."""
SCALE_APP = "bench-scale-out"
SCALE_MAX_REPLICAS = 4
SCALE_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": SCALE_MAX_REPLICAS,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 600.0,
    "look_back_period_s": 2.0,
}
"""Autoscaling of the scale-out app: quick to add replicas (1 s of high load over a 2 s window),
slow to remove them (none leaves during the study)."""
STEP_FROM, STEP_TO = 1, 32
BEFORE_STEP_SLICES = 3
STEADY_SLICES = 5
"""The steady p99 after the step: the median p99 of this many last slices."""
RECOVERED_FACTOR = 2.0
POLL_S = 0.2


def run_studies(plan: Plan) -> dict[str, Any]:
    """The studies the plan's settings ask for, each recorded with its error if it failed."""
    done: dict[str, Any] = {}
    for name in plan.settings.studies:
        print(f"[bench] study {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            done[name] = STUDY_FUNCTIONS[name](plan)
        except Exception as exc:
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            done[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=-3)[-3000:]}
        done[name]["study_s"] = round(time.monotonic() - started, 1)
    return done


# -- many apps on one head ---------------------------------------------------------------------


def study_apps(plan: Plan) -> dict[str, Any]:
    from ray_deploy import DeploymentSpec, ModelRef, delete_app, deploy

    checkpoints = sorted(set(plan.settings.many_apps))
    ref = ModelRef.model_validate(plan.model_refs["onnx"])
    deployed: list[str] = []
    apps: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    try:
        for index in range(1, checkpoints[-1] + 1):
            app = f"{APP_PREFIX}{index:02d}"
            options = {"app": app, "predictor": "onnx", "num_cpus": APP_NUM_CPUS, "lineage": False}
            started = time.monotonic()
            result = deploy(DeploymentSpec.from_options(options), {"default": ref})
            deploy_s = time.monotonic() - started
            deployed.append(app)
            wait_s = wait_until_answers(result.url, plan.body)
            apps.append({"apps": index, "deploy_s": round(deploy_s, 3), "first_answer_s": round(deploy_s + wait_s, 3)})
            print(f"[bench]   app {index}: deployed in {deploy_s:.1f}s", file=sys.stderr, flush=True)
            if index in checkpoints:
                memory.append({"apps": index, **head_memory(deployed)})
    finally:
        deleting = time.monotonic()
        for app in deployed:
            try:
                delete_app(app)
            except Exception as exc:
                print(f"[bench]   could not delete {app}: {exc}", file=sys.stderr, flush=True)
        deleted_s = time.monotonic() - deleting
    return {
        "num_cpus": APP_NUM_CPUS,
        "apps": apps,
        "memory": memory,
        "delete_all_s": round(deleted_s, 2),
        "cost_of_last": last_vs_first(apps),
    }


def last_vs_first(apps: list[dict[str, Any]], window: int = 3) -> dict[str, Any] | None:
    """What deploying the last app cost against the first: the median first-answer time of the
    last ``window`` apps over that of the first ``window`` (one deploy is one sample; the medians
    keep a single slow deploy from deciding it)."""
    if len(apps) < 2 * window:
        return None
    first = statistics.median(a["first_answer_s"] for a in apps[:window])
    last = statistics.median(a["first_answer_s"] for a in apps[-window:])
    return {
        "apps": apps[-1]["apps"],
        "window": window,
        "first_s": round(first, 3),
        "last_s": round(last, 3),
        "ratio": round(last / first, 3) if first > 0 else None,
    }


def head_memory(apps: list[str]) -> dict[str, Any]:
    """Memory (MB) of the given apps' replicas (median and total, resident and unique), of Serve's
    controller, and of our front (its actor and its HAProxy processes); the controller's CPU share
    over ``CONTROLLER_IDLE_S`` of no traffic."""
    from ray.util.state import list_actors

    # Ray's own copy of psutil (ray/thirdparty_files, on the path once ray is imported).
    psutil = importlib.import_module("psutil")

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    wanted = {f"ServeReplica:{app}:" for app in apps}
    replicas = [a.pid for a in actors if any(a.class_name.startswith(prefix) for prefix in wanted)]
    controller = next((a.pid for a in actors if a.class_name == "ServeController"), None)
    front = next((a.pid for a in actors if a.class_name == "Front"), None)
    rss, uss = [], []
    for pid in replicas:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rss.append(info.rss / 2**20)
        uss.append(info.uss / 2**20)
    found: dict[str, Any] = {
        "replicas": len(rss),
        "replica_rss_mb": _median(rss),
        "replica_uss_mb": _median(uss),
        "replicas_uss_total_mb": round(sum(uss), 1),
    }
    if controller is not None:
        process = psutil.Process(controller)
        found["serve_controller_rss_mb"] = round(process.memory_info().rss / 2**20, 1)
        before = process.cpu_times()
        time.sleep(CONTROLLER_IDLE_S)
        after = process.cpu_times()
        busy = (after.user - before.user) + (after.system - before.system)
        found["serve_controller_idle_cpu"] = round(busy / CONTROLLER_IDLE_S, 3)
    if front is not None:
        process = psutil.Process(front)
        children = process.children(recursive=True)
        found["front_rss_mb"] = round(sum(p.memory_info().rss for p in [process, *children]) / 2**20, 1)
    return found


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


# -- scale-out under a load step ---------------------------------------------------------------


class ReplicaWatch(threading.Thread):
    """Polls Serve's replica states of one app's deployments every ``POLL_S``: the replica counts
    over time, and each replica's start (the first poll that saw it STARTING to the first that saw
    one more RUNNING; first in, first out)."""

    def __init__(self, app: str, since: float) -> None:
        super().__init__(daemon=True)
        self.app, self.since = app, since
        self.timeline: list[tuple[float, int, int]] = []  # (seconds since `since`, starting, running)
        self.starts: list[float] = []
        self.seen: list[tuple[float, float]] = []  # (seconds, the front's count for the route), on change
        self._done = threading.Event()

    def run(self) -> None:
        from ray_deploy.control.apply import app_states, serve_details

        waiting: list[float] = []
        running_before = None
        while not self._done.is_set():
            try:
                details = serve_details()
                status = app_states(details).get(self.app)
            except Exception:
                details, status = {}, None
            now = time.monotonic() - self.since
            seen = front_load("/" + self.app)
            if seen is not None and (not self.seen or self.seen[-1][1] != round(seen, 1)):
                self.seen.append((round(now, 2), round(seen, 1)))
            if status is not None:
                states: dict[str, int] = {}
                for deployment in status.deployments.values():
                    for state, count in deployment.replica_states.items():
                        states[state] = states.get(state, 0) + count
                starting, running = states.get("STARTING", 0), states.get("RUNNING", 0)
                if not self.timeline or self.timeline[-1][1:] != (starting, running):
                    self.timeline.append((round(now, 2), starting, running))
                waiting += [now] * max(0, starting - len(waiting))
                if running_before is not None:
                    for _ in range(max(0, running - running_before)):
                        if waiting:
                            self.starts.append(round(now - waiting.pop(0), 2))
                running_before = running
            self._done.wait(POLL_S)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


def front_load(app_prefix: str) -> float | None:
    """The requests the front holds for the route: the load the app's autoscaling policy counts
    beside Serve's own (``ray_deploy.serving.autoscale``); None where no front answers."""
    import ray

    from ray_deploy.serving.front import FRONT_NAME, FRONT_NAMESPACE

    try:
        front = ray.get_actor(FRONT_NAME, namespace=FRONT_NAMESPACE)
        return ray.get(front.app_load.remote(app_prefix), timeout=2)
    except Exception:
        return None


def study_scale_out(plan: Plan) -> dict[str, Any]:
    from ray_deploy import DeploymentSpec, ModelRef, delete_app, deploy

    s = plan.settings
    ref = ModelRef.model_validate(plan.model_refs["onnx"])
    options = {
        "app": SCALE_APP,
        "predictor": "onnx",
        "num_cpus": s.replica_num_cpus,
        "max_ongoing_requests": s.max_ongoing_requests,
        "autoscaling": SCALE_AUTOSCALING,
        "lineage": False,
    }
    result = deploy(DeploymentSpec.from_options(options), {"default": ref})
    try:
        wait_until_answers(result.url, plan.body)
        slices: list[dict[str, Any]] = []
        started = time.monotonic()
        watch = ReplicaWatch(SCALE_APP, started)
        watch.start()
        try:
            for index in range(BEFORE_STEP_SLICES + s.scale_out_slices):
                level = STEP_FROM if index < BEFORE_STEP_SLICES else STEP_TO
                at = time.monotonic() - started
                (point,) = measure_http(result.url, plan.body, concurrency=(level,), seconds=1.0, warmup_s=0.0)
                kept = {key: point.get(key) for key in ("concurrency", "rps", "p99_ms", "failed")}
                slices.append({"at_s": round(at, 2), **kept})
        finally:
            watch.stop()
    finally:
        delete_app(SCALE_APP)
    timeline = [{"at_s": t, "starting": a, "running": b} for t, a, b in watch.timeline]
    front = [{"at_s": t, "requests": n} for t, n in watch.seen][:400]
    found = recovery(slices)
    return {
        "autoscaling": SCALE_AUTOSCALING,
        "num_cpus": s.replica_num_cpus,
        "slices": slices,
        "replicas": timeline,
        "replica_start_s": watch.starts,
        "front_load": front,
        **found,
        **autoscaler_response(found.get("step_at_s"), timeline, front),
    }


def recovery(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """From the slices of a load step: the step's time, the p99 before it and the steady p99 after
    it (medians), and the seconds from the step to the start of the first slice from which every
    slice's p99 stays under ``RECOVERED_FACTOR`` x the steady value (None if that never held)."""
    before = [x for x in slices if x["concurrency"] == STEP_FROM and x["p99_ms"] is not None]
    after = [x for x in slices if x["concurrency"] == STEP_TO]
    if not after or len(after) < STEADY_SLICES or any(x["p99_ms"] is None for x in after):
        return {"recovered_s": None, "error_in_slices": "too few answered slices after the step"}
    step_at = after[0]["at_s"]
    steady = statistics.median(x["p99_ms"] for x in after[-STEADY_SLICES:])
    recovered_s = None
    for index, item in enumerate(after):
        if all(x["p99_ms"] <= RECOVERED_FACTOR * steady for x in after[index:]):
            recovered_s = round(item["at_s"] - step_at, 2)
            break
    return {
        "step_at_s": step_at,
        "p99_before_ms": statistics.median(x["p99_ms"] for x in before) if before else None,
        "p99_first_slice_ms": after[0]["p99_ms"],
        "steady_p99_ms": round(steady, 3),
        "recovered_s": recovered_s,
    }


def autoscaler_response(
    step_at: float | None, timeline: list[dict[str, Any]], front: list[dict[str, Any]]
) -> dict[str, Any]:
    """How the autoscaler answered the step: seconds from the step until Serve first had more
    replicas (starting or running) than before it, and the most requests the front held for the
    app after the step (what the app's autoscaling policy counts; None where it reported none)."""
    if step_at is None:
        return {"first_added_s": None, "front_peak": None}
    before = [x for x in timeline if x["at_s"] <= step_at]
    base = before[-1]["starting"] + before[-1]["running"] if before else 1
    added = next((x["at_s"] for x in timeline if x["at_s"] > step_at and x["starting"] + x["running"] > base), None)
    held = [x["requests"] for x in front if x["at_s"] >= step_at]
    return {
        "first_added_s": None if added is None else round(added - step_at, 2),
        "front_peak": max(held) if held else None,
    }


STUDY_FUNCTIONS = {"apps": study_apps, "scale_out": study_scale_out}
