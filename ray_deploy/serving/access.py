"""Only the front may call a replica's own HTTP port.

On the direct data path every ingress replica answers HTTP on a port of its node, so that the
front (HAProxy on the head) reaches replicas on any node without Serve's proxy hop. A port that
answers predictions to whoever can reach the node would be an open door (Serve's own HAProxy
mode leaves it open), so on a cluster with a front:

- the cluster has one key: 32 random bytes in Ray's internal key-value store (the GCS, which
  Ray's token authentication guards), created by the first front (``cluster_key``);
- each app's secret is ``HMAC-SHA256(key, app name)``, in hex (``app_secret``): a replica holds
  its own app's secret only;
- the front's HAProxy computes the secret per request (its ``hmac`` converter; the key reaches
  HAProxy through its environment, never its configuration file) and sets it as the
  ``X-Ray-Deploy-Front`` header of every request it sends to an app, replacing whatever a caller
  sent; Serve's proxy passes it on when it answers for the app;
- a ModelServer replica refuses an HTTP request without its app's secret (401, JSON), and
  removes the header before anything else sees it (``FrontGate``).

The secret is never written down: not in Serve's config or the app's options, not in MLflow's
tags, not in HAProxy's configuration, not in a log. Requests from Python (a ``DeploymentHandle``)
do not pass through HTTP and need none.

Which replicas check: those on nodes started with the direct data path's settings
(``RAY_DEPLOY_FRONT_ONLY=1``, set by ``serving.front.head_environment``, the KubeRay export and
the cloud config) check always: until the front has made the cluster's key they refuse every HTTP
request (503), so a replica that starts before the front is never open. Elsewhere a replica
checks once the cluster has a key (a front was started on a cluster whose nodes lack the
setting); where no front runs (Serve's proxy or its HAProxy mode) nothing is checked.

Anyone who can run code on the cluster (and so read the GCS) can read the key: the key guards the
replicas' ports from the network, not from the cluster's own users.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from typing import Any

HEADER = b"x-ray-deploy-front"
"""The request header that carries an app's secret from the front to its replicas."""
HEADER_NAME = HEADER.decode()
KEY_ENV = "RAY_DEPLOY_FRONT_KEY"
"""The front's HAProxy reads the cluster key (base64) from this environment variable."""
REQUIRED_ENV = "RAY_DEPLOY_FRONT_ONLY"
"""``1`` on a node: its replicas answer HTTP requests with their app's secret only (see above)."""
KV_NAMESPACE = "ray_deploy"
KV_KEY = b"front_key"
KEY_BYTES = 32
LOOK_AGAIN_S = 1.0
"""How long a replica that must check, and found no key (no front yet), waits before it looks again."""
LOOK_AGAIN_IDLE_S = 10.0
"""The same for a replica that need not check (a cluster without a front, most likely for good)."""


def app_secret(key: bytes, app: str) -> bytes:
    """The secret the front sends with every request to ``app`` (hex, as HAProxy's ``hex,lower`` prints it)."""
    return hmac.new(key, app.encode("utf-8"), hashlib.sha256).hexdigest().encode("ascii")


def cluster_key(*, create: bool = False) -> bytes | None:
    """This cluster's front key (from the GCS); with ``create``, made first if there is none.

    Needs a connected Ray (a driver, an actor or a replica). Two fronts that create it at once
    end with the same key: the store keeps the first.
    """
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    if create:
        _internal_kv_put(KV_KEY, secrets.token_bytes(KEY_BYTES), overwrite=False, namespace=KV_NAMESPACE)
    key = _internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
    return bytes(key) if key else None


UNAUTHORIZED = (
    b'{"error": "this port answers the ray-deploy front only: send requests to the cluster\'s HTTP '
    b'address (the front), not to a replica"}'
)
NO_FRONT_YET = (
    b'{"error": "this replica answers the ray-deploy front only, and the cluster has no front yet: '
    b'start it (`ray-deploy cluster front` on the head) and send requests there"}'
)


class FrontGate:
    """A replica's check that an HTTP request came through the front (see the module docstring)."""

    def __init__(self, required: bool | None = None) -> None:
        """``required``: refuse requests while there is no key (default: ``RAY_DEPLOY_FRONT_ONLY=1``)."""
        self.required = os.environ.get(REQUIRED_ENV) == "1" if required is None else required
        self.app: str | None = None
        self.expected: bytes | None = None
        self._look_at = 0.0

    def configure(self, app: str) -> None:
        """Learn the secret of ``app`` (blocking: a GCS read; call it off the event loop)."""
        if app != self.app:
            self.app, self.expected, self._look_at = app, None, 0.0
        self.refresh()

    def refresh(self) -> None:
        if self.expected is not None or self.app is None or time.monotonic() < self._look_at:
            return
        try:
            key = cluster_key()
        except Exception:  # the GCS does not answer now: look again later
            key = None
        if key is None:
            self._look_at = time.monotonic() + (LOOK_AGAIN_S if self.required else LOOK_AGAIN_IDLE_S)
            return
        self.expected = app_secret(key, self.app)

    @property
    def looking(self) -> bool:
        """Whether this replica has no key yet and it is time to look for one (``refresh``)."""
        return self.expected is None and self.app is not None and time.monotonic() >= self._look_at

    def admits(self, scope: dict[str, Any]) -> bool:
        """Whether ``scope`` (an HTTP request) may be answered; removes the secret from its headers.

        Without a key: True, unless the secret is ``required`` (then the answer is ``refusal()``).
        """
        expected = self.expected
        headers = scope["headers"]
        for index, (name, value) in enumerate(headers):
            if name == HEADER:
                scope["headers"] = [*headers[:index], *headers[index + 1 :]]
                return hmac.compare_digest(value, expected) if expected is not None else not self.required
        return expected is None and not self.required

    def refusal(self) -> tuple[int, bytes]:
        """The status and JSON body for a request ``admits`` refused."""
        return (401, UNAUTHORIZED) if self.expected is not None else (503, NO_FRONT_YET)
