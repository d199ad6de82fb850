"""The rollout controller: a detached, named Ray actor per app that drives rollouts on the cluster.

A rollout is only as alive as the process that drives it. The deploying flow stages the new
release beside the serving one (phase ``staged``), then hands the app to its controller,
``rollout:<app>`` in namespace ``ray_deploy`` (the Ray dashboard's Actors page lists it; its log
says each step, gate numbers and decision). The controller reads the app's persisted rollout state
(``ServingConfig.rollout``), takes the steps, judges the gates and promotes, holds or rolls back,
recording each transition in the app's config and the registry. Because it reads everything from
the persisted state, it resumes wherever it stands when Ray restarts it (``max_restarts=-1``), and
the flow that started it may end, be killed or go to sleep.

The deploying process waits on ``wait_for_outcome`` (streaming the controller's progress lines), or
returns at once with ``rollout={"wait": False}``. Operators' ``promote``/``rollback`` during a
rollout are handed to the controller (``request``), so two drivers never move one app.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ray_deploy import errors
from ray_deploy.control.live import LiveApp, stats_snapshot
from ray_deploy.control.lock import BRIEF_HOLDERS, app_lock
from ray_deploy.control.phases import check_move
from ray_deploy.control.rollout import GateResult, Plan, watch
from ray_deploy.errors import DeployError, LineageError, RayDeployError, RolloutFailed
from ray_deploy.progress import Waiter, report, reporting_to
from ray_deploy.registry.history import Action, VersionStatus, recorded_rollout, version_of
from ray_deploy.serving.config import RolloutPhase, ServingConfig

logger = logging.getLogger(__name__)

CONTROLLER_NAMESPACE = "ray_deploy"
LINGER_S = 30.0
"""How long a controller stays after its rollout ends, so that a waiting deploy step (or one that
reconnects after a restart) still reads the outcome; then it exits for good."""
CONTACT_LOST_S = 180.0


def controller_name(app: str) -> str:
    return f"rollout:{app}"


class OperatorMove(Exception):
    """An operator asked the controller to promote or roll back while it waits out a step."""

    def __init__(self, action: Action, reason: str):
        super().__init__(reason)
        self.action = action
        self.reason = reason


class RolloutController:
    """The actor. Driving happens on a thread, so ``progress`` and ``request`` answer meanwhile."""

    def __init__(self, app: str, warm: bool = False):
        import ray

        self.app = app
        self.lines: list[str] = []
        self.outcome: dict[str, Any] | None = None
        self.moves: list[tuple[Action, str]] = []
        self.guard = threading.Lock()
        self.thread: threading.Thread | None = None
        self.runs = 0
        # A restarted controller (its process died) picks the rollout up from the persisted phase.
        # One started ahead of its rollout (``warm_controller``) waits to be told, and leaves if
        # nobody tells it (the deploy failed before handing over).
        if not warm or ray.get_runtime_context().was_current_actor_reconstructed:
            self.resume()
        else:
            threading.Timer(LINGER_S, self._exit_if_idle, args=(0,)).start()

    def resume(self) -> int:
        """Drive the app's rollout if nobody does; returns the number of the drive now under way."""
        with self.guard:
            if self.thread is None or not self.thread.is_alive():
                self.runs += 1
                self.outcome = None
                # A lingering controller starts a new rollout: its waiter reads this rollout's
                # lines from 0, never the last rollout's again.
                self.lines = []
                self.thread = threading.Thread(target=self._run, name=f"rollout-{self.app}", daemon=True)
                self.thread.start()
            return self.runs

    def progress(self, since: int = 0) -> dict[str, Any]:
        """Lines said since line ``since``, and the outcome once the rollout has ended."""
        return {
            "lines": self.lines[since:],
            "next": len(self.lines),
            "outcome": self.outcome,
            "run": self.runs,
            "pid": os.getpid(),
        }

    def request(self, action: str, reason: str) -> bool:
        """Ask for a promote or rollback at the next check (within a second); False if idle."""
        driving = self.thread is not None and self.thread.is_alive()
        if driving:
            self.moves.append((Action(action), reason))
        return driving

    def _say(self, line: str) -> None:
        self.lines.append(line)
        logger.info("%s", line)

    def _next_move(self) -> tuple[Action, str] | None:
        return self.moves.pop(0) if self.moves else None

    def _run(self) -> None:
        run = self.runs
        with reporting_to(self._say):
            try:
                outcome = drive(self.app, self._next_move)
            except RayDeployError as exc:
                outcome = {"state": "failed", "error": exc.message, "error_type": type(exc).__name__}
                if isinstance(exc, RolloutFailed):
                    outcome.update(state=RolloutPhase.ROLLED_BACK.value, gate=exc.gate)
            except Exception as exc:  # a bug, or Ray/Serve failing: say exactly what
                logger.exception("rollout of %s failed", self.app)
                outcome = {"state": "failed", "error": f"{type(exc).__name__}: {exc}", "error_type": "DeployError"}
            report(f"rollout controller of app {self.app!r}: outcome {outcome['state']}")
        self.outcome = outcome
        threading.Timer(LINGER_S, self._exit_if_idle, args=(run,)).start()

    def _exit_if_idle(self, run: int) -> None:
        import ray

        with self.guard:
            if self.runs != run or (self.thread is not None and self.thread.is_alive()):
                return  # a new rollout started meanwhile
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def drive(app: str, next_move: Callable[[], tuple[Action, str] | None] = lambda: None) -> dict[str, Any]:
    """Take ``app``'s rollout from its persisted phase to its end: steps, gates, then promote, hold
    or roll back. Returns the outcome; raises what failed (the app is put back first)."""
    live = LiveApp.require(app)
    state = live.config.rollout
    if state is None:
        reconcile(live)
        return {"state": RolloutPhase.SETTLED.value}
    if state.phase == RolloutPhase.HOLDING:
        return {"state": RolloutPhase.HOLDING.value, "percent": state.percent}
    _record_missed(live)
    policy, plan = state.policy, Plan.resume(live.config)
    steps = policy.plan
    new_labels = sorted(plan.new_labels)
    gates: list[dict[str, Any]] = []
    taken = state.step if state.phase == RolloutPhase.STEPPING else 0
    report(
        f"app {app!r}: driving the {policy.strategy} rollout of {', '.join(new_labels)} from {state.phase.value} "
        f"(step {taken}/{len(steps)}, {state.percent:g}% on the new release)"
    )

    def at(phase: RolloutPhase, step: int, percent: float) -> ServingConfig:
        return live.config.with_variants(plan.at(percent)).model_copy(
            update={"rollout": plan.state(policy, phase, step, percent, state.started_at, state.started_by)}
        )

    rollout_start = stats_snapshot(app)
    try:
        for step in range(max(taken, 1), len(steps) + 1):
            percent = steps[step - 1]
            if step > taken:
                move = _pending(next_move)
                if move is not None:
                    raise move
                live = change(
                    live,
                    at(RolloutPhase.STEPPING, step, percent),
                    Action.TRAFFIC,
                    f"{policy.strategy} step {step}/{len(steps)}: {percent:g}% to the new release",
                    wait_for=None,
                )
            if not policy.gated:
                continue
            gate = _judge(live, plan, percent, rollout_start, next_move)
            record = {**gate.to_dict(), "new": new_labels}
            gates.append(record)
            if not gate.passed:
                reason = f"gate failed at {percent:g}%: {gate.reason}"
                report(f"app {app!r}: {reason}; rolling back")
                roll_back(live, plan, f"automatic rollback: {reason}", gate=record, settled=False, wait_for=None)
                raise RolloutFailed(
                    f"app {app!r}: the new release ({', '.join(new_labels)}) was rolled back, {reason}; "
                    "the previous release serves all traffic",
                    gate=record,
                )
            report(f"app {app!r}: gate passed at {percent:g}%: {gate.reason}")
            recorder = live.recorder()
            if recorder is not None:
                recorder.record(
                    live.config, Action.GATE_PASSED, f"gate passed at {percent:g}%: {gate.reason}", gate=record
                )
    except OperatorMove as move:
        live = LiveApp.require(app)
        if move.action == Action.PROMOTED:
            promote_now(live, move.reason, wait_for=None)
            return {"state": RolloutPhase.PROMOTED.value, "percent": 100.0, "gates": gates, "reason": move.reason}
        roll_back(live, Plan.resume(live.config), move.reason, settled=True, wait_for=None)
        return {"state": RolloutPhase.ROLLED_BACK.value, "percent": 0.0, "gates": gates, "reason": move.reason}
    except (DeployError, LineageError) as failure:
        if not isinstance(failure, RolloutFailed):
            _abandon(app, plan, failure)
        raise
    if steps[-1] < 100:
        change(
            live,
            at(RolloutPhase.HOLDING, len(steps), steps[-1]),
            Action.HOLDING,
            f"holding at {steps[-1]:g}% on the new release for an operator",
            wait_for=None,
        )
        report(f"app {app!r}: holding at {steps[-1]:g}%; `ray-deploy promote {app}` or `ray-deploy rollback {app}`")
        return {"state": RolloutPhase.HOLDING.value, "percent": steps[-1], "gates": gates}
    promote_now(live, f"{policy.strategy} rollout complete", wait_for=None)
    return {"state": RolloutPhase.PROMOTED.value, "percent": 100.0, "gates": gates}


def _pending(next_move: Callable[[], tuple[Action, str] | None]) -> OperatorMove | None:
    move = next_move()
    return OperatorMove(*move) if move is not None else None


def _judge(
    live: LiveApp,
    plan: Plan,
    percent: float,
    rollout_start: dict[str, Any],
    next_move: Callable[[], tuple[Action, str] | None],
) -> GateResult:
    waiter = Waiter(f"gate at {percent:g}%", every_s=5.0)
    policy = live.config.rollout.policy

    def progress(line: str) -> None:
        move = _pending(next_move)
        if move is not None:
            raise move
        waiter.update(line)

    capture = live.config.capture
    return watch(
        policy,
        percent,
        plan,
        lambda: stats_snapshot(live.name),
        stats_snapshot(live.name),
        rollout_start,
        progress,
        goal=capture.goal if capture is not None else "max",
    )


def change(
    live: LiveApp,
    config: ServingConfig,
    action: Action,
    reason: str,
    *,
    locked: bool = False,
    wait_for: tuple[str, ...] | None = BRIEF_HOLDERS,
    **record: Any,
) -> LiveApp:
    """Apply one transition under the app's lock (``locked``: the caller holds it), refusing a move
    the state machine does not allow.

    ``wait_for`` is whom to wait for when the lock is held (see ``app_lock``): an operator's move
    waits for a controller step and is turned away by any other holder; the controller passes
    None, as every other change holds the lock briefly (an operator's move, a retried deploy
    checking its release) and the rollout must not fail for it."""
    check_move(live.name, live.phase, config.phase if config.rollout else _final(action), reason)
    if locked:
        return live.apply(config, action, reason, **record)
    with app_lock(live.name, "rollout", wait_for=wait_for):
        return live.apply(config, action, reason, **record)


def _final(action: Action) -> RolloutPhase:
    return RolloutPhase.ROLLED_BACK if action == Action.ROLLED_BACK else RolloutPhase.PROMOTED


def promote_now(live: LiveApp, reason: str, wait_for: tuple[str, ...] | None = BRIEF_HOLDERS) -> LiveApp:
    """All traffic on the new release, then the old models dropped (running requests finish)."""
    plan = Plan.resume(live.config)
    return change(
        live,
        live.config.with_variants(plan.final()).model_copy(update={"rollout": None}),
        Action.PROMOTED,
        reason,
        wait_for=wait_for,
        leaving=[v for v in plan.old if v.label in plan.old_labels],
        leaving_status=VersionStatus.RETIRED,
        settled=True,
    )


def roll_back(
    live: LiveApp,
    plan: Plan,
    reason: str,
    gate: dict[str, Any] | None = None,
    settled: bool = True,
    wait_for: tuple[str, ...] | None = BRIEF_HOLDERS,
) -> LiveApp:
    """The old release's weights back; the new release's models dropped and its versions marked."""
    return change(
        live,
        live.config.with_variants(plan.rollback()).model_copy(update={"rollout": None}),
        Action.ROLLED_BACK,
        reason,
        wait_for=wait_for,
        gate=gate,
        leaving=[v for v in plan.new if v.label in plan.new_labels],
        leaving_status=VersionStatus.ROLLED_BACK,
        settled=settled,
    )


def _abandon(app: str, plan: Plan, failure: RayDeployError) -> None:
    """A step could not be applied or recorded: the old release back, without recording (the
    registry may be what failed); its versions keep their last recorded state."""
    try:
        live = LiveApp.require(app)
        target = live.config.with_variants(plan.rollback()).model_copy(update={"rollout": None})
        with app_lock(app, "rollout"):
            live.apply(target, Action.ROLLED_BACK, f"rollout abandoned: {failure}", record=False)
    except Exception as exc:
        logger.error("could not put app %s back after %s: %s", app, failure, exc)


def reconcile(live: LiveApp) -> None:
    """A settled app whose registry still shows a rollout under way (its last transition was
    applied but its record did not land): record where the app really is."""
    if live.registry is None:
        return
    names = {version_of(v).name for v in live.config.variants if version_of(v)}
    for name in names:
        recorded = recorded_rollout(live.registry, name, live.name)
        if recorded and recorded.get("phase") in (RolloutPhase.STAGED, RolloutPhase.STEPPING, RolloutPhase.HOLDING):
            report(f"app {live.name!r}: the registry shows a rollout {recorded['phase']}; recording that it settled")
            recorder = live.recorder()
            if recorder is not None:
                recorder.record(live.config, Action.DEPLOYED, "settled while its last record was missing")
            return


# The client side: start, find, wait.


def _controller_actor(app: str) -> Any:
    import ray

    return ray.remote(RolloutController).options(
        name=controller_name(app),
        namespace=CONTROLLER_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=8,
        num_cpus=0,
    )


def warm_controller(app: str) -> None:
    """Start the app's controller process now, idle, without waiting: its seconds of start-up
    overlap the deploy's preflight and staging instead of following them. A controller that is
    already there is left as it is; a warm one nobody hands a rollout to leaves after ``LINGER_S``."""
    _controller_actor(app).remote(app, warm=True)


def start_controller(app: str) -> Any:
    """The app's controller (created, detached, if there is none) set to drive its rollout."""
    import ray

    actor = _controller_actor(app)
    for attempt in range(10):
        handle = actor.remote(app)
        try:
            ray.get(handle.resume.remote(), timeout=60)
            return handle
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            # A controller that was exiting (its linger ended) as we asked: make a new one.
            logger.info("controller of %s not usable yet (%s); retrying", app, exc)
            time.sleep(0.5 * (attempt + 1))
    raise DeployError(f"could not start the rollout controller {controller_name(app)!r} for app {app!r}")


def stop_controller(app: str) -> bool:
    """Stop the app's controller for good wherever its rollout stands; True if there was one."""
    import ray

    try:
        handle = ray.get_actor(controller_name(app), namespace=CONTROLLER_NAMESPACE)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True


def find_controller(app: str) -> Any | None:
    """The app's controller if one is alive and driving a rollout now."""
    import ray

    try:
        handle = ray.get_actor(controller_name(app), namespace=CONTROLLER_NAMESPACE)
        status = ray.get(handle.progress.remote(10**9), timeout=10)
    except Exception:
        return None
    return handle if status["outcome"] is None else None


def wait_for_outcome(app: str, handle: Any, stream: bool = True) -> dict[str, Any]:
    """Stream the controller's progress until the rollout ends; its outcome, or what it raised.

    The controller may restart meanwhile (it resumes from the persisted phase); the wait follows it.

    Raises:
        RolloutFailed: a gate failed; the old release serves again.
        DeployError, LineageError: the rollout could not go on; the old release serves again.
    """
    import ray

    since, pid, lost_since = 0, None, None
    while True:
        try:
            status = ray.get(handle.progress.remote(since), timeout=30)
            lost_since = None
        except ray.exceptions.ActorDiedError:
            handle = find_controller(app) or _settled_handle(app)
            if handle is None:
                return _outcome_from_app(app)
            continue
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > CONTACT_LOST_S:
                raise DeployError(
                    f"lost contact with the rollout controller {controller_name(app)!r} for {CONTACT_LOST_S:g}s: {exc}"
                ) from None
            report(f"app {app!r}: the rollout controller is restarting; waiting for it ...")
            time.sleep(1.0)
            continue
        if pid is not None and status["pid"] != pid:
            report(f"app {app!r}: the rollout controller restarted (pid {status['pid']}) and resumes")
            since = 0
            status = ray.get(handle.progress.remote(0), timeout=30)
        pid = status["pid"]
        if stream:
            for line in status["lines"]:
                report(f"controller: {line}")
        since = status["next"]
        if status["outcome"] is not None:
            return raise_for(app, status["outcome"])
        time.sleep(0.5)


def _settled_handle(app: str) -> Any | None:
    import ray

    try:
        return ray.get_actor(controller_name(app), namespace=CONTROLLER_NAMESPACE)
    except Exception:
        return None


def _outcome_from_app(app: str) -> dict[str, Any]:
    """The controller is gone for good: where the app stands, and how the registry says its last
    rollout ended, is the outcome."""
    live = LiveApp.require(app)
    if live.config.rollout is None:
        ended = live.config.last_rollout
        last = ended.phase if ended is not None else _last_recorded(live)
        if last == RolloutPhase.ROLLED_BACK:
            why = f": {ended.reason}" if ended is not None and ended.reason else ""
            raise RolloutFailed(
                f"app {app!r}: the rollout was rolled back{why}; the previous release serves all traffic "
                f"(the events are on the model versions: `ray-deploy lineage {app}`)"
            )
        return {"state": (last or RolloutPhase.SETTLED).value}
    raise DeployError(
        f"the rollout controller of app {app!r} stopped with the app {live.phase.value} at "
        f"{live.config.rollout.percent:g}%; `ray-deploy promote {app}` or `ray-deploy rollback {app}`"
    )


def _latest_record(live: LiveApp) -> dict[str, Any] | None:
    """The app's rollout state as the registry last recorded it."""
    if live.registry is None:
        return None
    records = [
        recorded_rollout(live.registry, name, live.name)
        for name in {version_of(v).name for v in live.config.variants if version_of(v)}
    ]
    return max((r for r in records if r), key=lambda r: r.get("recorded_at", ""), default=None)


def _last_recorded(live: LiveApp) -> RolloutPhase | None:
    latest = _latest_record(live)
    return RolloutPhase(latest["phase"]) if latest else None


def _record_missed(live: LiveApp) -> None:
    """A transition applied to Serve whose record did not land (the controller died between the
    two): record it now, so the registry never lags what serves."""
    state, recorded = live.config.rollout, _latest_record(live)
    if recorded is None or (recorded.get("phase"), recorded.get("step")) == (state.phase.value, state.step):
        return
    recorder = live.recorder()
    if recorder is not None:
        action = Action.STAGED if state.phase == RolloutPhase.STAGED else Action.TRAFFIC
        report(f"app {live.name!r}: recording {state.phase.value} at {state.percent:g}%, applied before a restart")
        recorder.record(
            live.config,
            action,
            f"recorded on resume: {state.phase.value} step {state.step} at {state.percent:g}% was applied before "
            "the controller restarted",
        )


def raise_for(app: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """The outcome as a return value, or the error it reports raised with its own class."""
    if outcome["state"] == RolloutPhase.ROLLED_BACK.value and outcome.get("error"):
        raise RolloutFailed(outcome["error"], gate=outcome.get("gate"))
    if outcome["state"] == "failed":
        kind = getattr(errors, outcome.get("error_type") or "", None)
        if not (isinstance(kind, type) and issubclass(kind, RayDeployError)) or kind is RolloutFailed:
            kind = DeployError
        raise kind(outcome["error"])
    return outcome
