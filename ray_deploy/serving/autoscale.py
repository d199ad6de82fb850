"""Replica autoscaling that sees the load a fast model's replicas do not.

Serve's autoscaler counts the requests inside each replica's event loop. A replica whose model
answers in well under a millisecond takes one request at a time off its sockets and answers it
before it reads the next, so it never holds more than one, however many callers wait: measured on
the direct path, 32 callers against one replica of the benchmark's ONNX model (target 2 ongoing
requests) never brought a second replica. The requests are there, waiting in HAProxy and in the
replica's sockets, and the front counts them (``Front.app_load``).

So on an app with ``autoscaling``:

* each ModelServer replica reports the front's count for its route as a custom autoscaling metric
  (``FRONT_LOAD_METRIC``; Serve asks for it through ``ModelServer.record_autoscaling_stats``);
* the deployment's policy (``front_load_policy``) scales on the larger of Serve's own count and
  the front's, exactly as Serve's default policy scales on its own: ``load / target_ongoing_requests``
  replicas, with Serve applying the delays, bounds and smoothing of the app's settings.

Where no front runs (Serve's proxy or its HAProxy mode), replicas report nothing and the policy is
Serve's default. This module is imported by Serve's controller: it imports nothing heavy.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

FRONT_NAME = "ray_deploy_front"
FRONT_NAMESPACE = "ray_deploy"
"""The front's detached actor (``serving.front``), which replicas ask for their route's count."""
FRONT_LOAD_METRIC = "ray_deploy_front_requests"
POLICY_FUNCTION = f"{__name__}:front_load_policy"
FRONT_ANSWER_S = 1.0
"""How long a replica waits for the front's count before it reports none this time."""
RETRY_S = 10.0
"""How long a replica that found no front waits before it looks again."""


def front_load_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Replicas for the larger of Serve's request count and the front's (``AutoscalingContext``).

    Every replica reports the route's whole count, so the front's figure is their largest report,
    not their sum. Serve wraps a custom policy with the app's delays, bounds and smoothing.
    """
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    reported = (ctx.aggregated_metrics or {}).get(FRONT_LOAD_METRIC) or {}
    load = max([float(ctx.total_num_requests), *(float(v) for v in reported.values())])
    return load / ctx.config.get_target_ongoing_requests(), {}


class FrontLoad:
    """A replica's view of the front's count for its route (``Front.app_load``)."""

    def __init__(self) -> None:
        self._front: Any = None
        self._retry_at = 0.0

    async def read(self, prefix: str) -> float | None:
        """The front's count for ``prefix``; None where no front runs or it does not answer."""
        if self._front is None:
            if time.monotonic() < self._retry_at:
                return None
            try:
                self._front = await asyncio.to_thread(_front_actor)
            except Exception:  # no front on this cluster (Serve's proxy or HAProxy mode)
                self._retry_at = time.monotonic() + RETRY_S
                return None
        try:
            return await asyncio.wait_for(self._front.app_load.remote(prefix), FRONT_ANSWER_S)
        except Exception:  # restarting, or replaced: look it up again next time
            self._front = None
            return None


def _front_actor() -> Any:
    import ray

    return ray.get_actor(FRONT_NAME, namespace=FRONT_NAMESPACE)
