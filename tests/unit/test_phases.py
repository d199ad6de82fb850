"""The rollout state machine and the planner, without a cluster."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ray_deploy.control.phases import TRANSITIONS, check_move
from ray_deploy.control.rollout import Plan
from ray_deploy.errors import RolloutStateError
from ray_deploy.models.artifacts import ModelRef
from ray_deploy.serving.config import RolloutPhase, ServingConfig, VariantConfig
from ray_deploy.spec import RolloutSpec

P = RolloutPhase
DOCS = Path(__file__).resolve().parents[2] / "docs"


def variant(name: str, release: str, weight: float, shadow: bool = False) -> VariantConfig:
    ref = ModelRef(uri=f"metaflow://Flow/1/train/{name}-{release}/model", kind="metaflow", sha256=release * 8)
    return VariantConfig(name=name, weight=weight, predictor="python", model=ref, release=release, shadow=shadow)


def config(*variants: VariantConfig) -> ServingConfig:
    return ServingConfig(
        app="cancer",
        route_prefix="/cancer",
        variants=variants,
        max_request_bytes=1024,
        max_batch_size=0,
        batch_wait_timeout_s=0.0,
    )


def test_every_phase_has_a_row_and_final_phases_only_settle():
    assert set(TRANSITIONS) == set(RolloutPhase)
    assert TRANSITIONS[P.PROMOTED] == {P.SETTLED} and TRANSITIONS[P.ROLLED_BACK] == {P.SETTLED}
    # Nothing jumps from settled straight to traffic: a release is always staged first.
    assert TRANSITIONS[P.SETTLED] == {P.STAGED}


@pytest.mark.parametrize(
    "current, target",
    [
        (P.SETTLED, P.PROMOTED),
        (P.SETTLED, P.ROLLED_BACK),
        (P.SETTLED, P.STEPPING),
        (P.PROMOTED, P.STEPPING),
        (P.ROLLED_BACK, P.HOLDING),
        (P.HOLDING, P.STAGED),
    ],
)
def test_illegal_moves_are_refused_naming_both_phases(current, target):
    with pytest.raises(RolloutStateError) as raised:
        check_move("cancer", current, target, "promote")
    text = str(raised.value)
    assert current.value in text and target.value in text and "'cancer'" in text
    assert text.startswith("promote: ")


@pytest.mark.parametrize(
    "current, target",
    [
        (P.SETTLED, P.STAGED),
        (P.STAGED, P.STEPPING),
        (P.STEPPING, P.STEPPING),
        (P.STEPPING, P.HOLDING),
        (P.STEPPING, P.PROMOTED),
        (P.STEPPING, P.ROLLED_BACK),
        (P.HOLDING, P.PROMOTED),
        (P.HOLDING, P.ROLLED_BACK),
        (P.HOLDING, P.HOLDING),
    ],
)
def test_the_moves_a_rollout_makes_are_allowed(current, target):
    check_move("cancer", current, target)


def test_promote_with_no_rollout_says_so():
    with pytest.raises(RolloutStateError, match=r"is settled \(no rollout is in progress\)"):
        check_move("cancer", P.SETTLED, P.PROMOTED, "promote")


def test_the_docs_list_the_phases_the_code_has():
    """One list of statuses: docs/rollouts.md names exactly the phases of the enum."""
    text = (DOCS / "rollouts.md").read_text()
    table = re.search(r"<!-- phases -->(.*?)<!-- /phases -->", text, re.S)
    assert table, "docs/rollouts.md has no phase table"
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table.group(1), re.M))
    assert documented == {p.value for p in RolloutPhase}


def test_plan_moves_the_share_and_keeps_both_releases_loaded():
    running = config(variant("default", "v1", 100))
    incoming = config(variant("default", "v2", 100))
    plan = Plan.between(running, incoming)
    assert plan.new_labels == {"default@v2"} and plan.old_labels == {"default@v1"}
    assert {v.label: v.weight for v in plan.at(0)} == {"default@v1": 100, "default@v2": 0}
    assert {v.label: v.weight for v in plan.at(10)} == {"default@v1": 90, "default@v2": 10}
    assert [v.label for v in plan.final()] == ["default@v2"]
    assert [v.label for v in plan.rollback()] == ["default@v1"]


def test_a_persisted_rollout_resumes_to_the_same_plan():
    running = config(variant("a", "v1", 60), variant("b", "v1", 40))
    incoming = config(variant("a", "v2", 60), variant("b", "v1", 40))
    plan = Plan.between(running, incoming)
    policy = RolloutSpec(strategy="canary", steps=(10, 50, 100), interval_s=1)
    state = plan.state(policy, P.STEPPING, 2, 50.0, "2026-12-01T00:00:00+00:00")
    live = incoming.with_variants(plan.at(50)).model_copy(update={"rollout": state})
    # What a restarted controller reads back from Serve's user_config: JSON.
    restored = ServingConfig.model_validate_json(live.model_dump_json())
    assert restored.phase == P.STEPPING and restored.rollout.step == 2 and restored.rollout.policy == policy
    resumed = Plan.resume(restored)
    assert {v.label: v.weight for v in resumed.at(100)} == {v.label: v.weight for v in plan.at(100)}
    assert resumed.new_labels == {"a@v2"} and resumed.old_labels == {"a@v1"}


def test_resuming_a_settled_app_is_refused():
    with pytest.raises(RolloutStateError, match="no rollout to resume"):
        Plan.resume(config(variant("default", "v1", 100)))


def test_a_settled_rollout_leaves_its_outcome_in_the_config_and_later_changes_keep_it():
    from ray_deploy.control.live import LiveApp
    from ray_deploy.registry.history import Action

    running = config(variant("default", "v1", 100))
    plan = Plan.between(running, config(variant("default", "v2", 100)))
    policy = RolloutSpec(strategy="canary", steps=(10, 100), interval_s=1)
    state = plan.state(policy, P.STEPPING, 1, 10.0, "2026-12-01T00:00:00+00:00", "alice")
    live = LiveApp(
        "cancer",
        "/cancer",
        "http://h/cancer",
        running.with_variants(plan.at(10)).model_copy(update={"rollout": state}),
        {},
    )
    settled = running.with_variants(plan.rollback()).model_copy(update={"rollout": None})
    ended = live._with_outcome(settled, Action.ROLLED_BACK, "gate failed at 10%: errors")
    outcome = ended.last_rollout
    assert outcome.phase == P.ROLLED_BACK and outcome.new == ("default@v2",) and outcome.by == "alice"
    assert outcome.reason == "gate failed at 10%: errors" and outcome.recorded_at
    # It survives the trip through Serve's user_config, and a later change (traffic, settings) keeps it.
    after = LiveApp(
        "cancer", "/cancer", "http://h/cancer", ServingConfig.model_validate_json(ended.model_dump_json()), {}
    )
    assert after._with_outcome(settled, Action.DEPLOYED, "settings updated").last_rollout == outcome
    # A change that is not the end of a rollout adds none.
    assert live._with_outcome(settled, Action.TRAFFIC, "step").last_rollout is None
