"""The rollout state machine: which phase may follow which, and the error for any other move.

The phases themselves (``RolloutPhase``) live with the app's config, which persists them; this
table is the only place that says how an app moves between them::

    settled ──> staged ──> stepping ──> stepping (the next step)
                  │           ├──────> holding ──> holding (an operator's split), stepping
                  │           ├──────> promoted ──> settled
                  └───────────┴──────> rolled_back ──> settled

    staged, stepping and holding may each go to holding (an operator's split), promoted or
    rolled_back (an operator's promote or rollback, or the controller's gate).

``promoted`` and ``rolled_back`` are final for a rollout: the app's config goes back to no
rollout (``settled``) and the registry keeps the phase it ended in.
"""

from __future__ import annotations

from ray_deploy.errors import RolloutStateError
from ray_deploy.serving.config import RolloutPhase

P = RolloutPhase

TRANSITIONS: dict[RolloutPhase, frozenset[RolloutPhase]] = {
    P.SETTLED: frozenset({P.STAGED}),
    P.STAGED: frozenset({P.STEPPING, P.HOLDING, P.PROMOTED, P.ROLLED_BACK}),
    P.STEPPING: frozenset({P.STEPPING, P.HOLDING, P.PROMOTED, P.ROLLED_BACK}),
    P.HOLDING: frozenset({P.HOLDING, P.STEPPING, P.PROMOTED, P.ROLLED_BACK}),
    P.PROMOTED: frozenset({P.SETTLED}),
    P.ROLLED_BACK: frozenset({P.SETTLED}),
}

ACTIVE = frozenset({P.STAGED, P.STEPPING})
"""Phases in which the rollout controller drives the app (an operator's promote or rollback is
handed to it; other changes wait for it)."""

IN_PROGRESS = frozenset({P.STAGED, P.STEPPING, P.HOLDING})
"""Phases of a rollout that has not ended: two releases are loaded."""


def check_move(app: str, current: RolloutPhase, to: RolloutPhase, what: str = "") -> None:
    """Refuse a move the table does not allow, naming both phases and what is allowed.

    Raises:
        RolloutStateError: ``to`` may not follow ``current``.

    Example:
        >>> check_move("cancer", RolloutPhase.STEPPING, RolloutPhase.PROMOTED)
        >>> check_move("cancer", RolloutPhase.SETTLED, RolloutPhase.PROMOTED, "promote")
        Traceback (most recent call last):
        ...
        ray_deploy.errors.RolloutStateError: promote: app 'cancer' is settled ...
    """
    allowed = TRANSITIONS[current]
    if to in allowed:
        return
    options = ", ".join(sorted(p.value for p in allowed)) or "nothing"
    hint = " (no rollout is in progress)" if current == P.SETTLED else ""
    raise RolloutStateError(
        f"{what + ': ' if what else ''}app {app!r} is {current.value}{hint}; it cannot move to {to.value} "
        f"(from {current.value} it can move to: {options})"
    )
