"""The Python that runs KServe's REST client (``kserve_client.py``): KServe's SDK pins pandas and
protobuf below ours, so it lives in a venv of its own, kept in the user's cache and rebuilt when
missing or broken (~40 s on 2 cores). ``make test`` builds it before the suite starts, as it
installs the other test tools; the test builds it itself when run alone.

    python tests/integration/kserve_venv.py     # build (or find) it; prints its python
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KSERVE = "kserve==0.21.0"


class KServeVenvError(RuntimeError):
    """Building the venv failed: the message says at which command and what it printed."""


def kserve_python() -> Path:
    """A Python with ``kserve`` installed: the cached venv, or one built now."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ray-deploy-tests"
    target = cache / f"{KSERVE.replace('==', '-')}-py{sys.version_info.major}{sys.version_info.minor}"
    python = target / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import kserve"], capture_output=True).returncode == 0:
        return python
    cache.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=cache))
    started = time.monotonic()
    print(f"building a venv with {KSERVE} for KServe's REST client in {target} ...", file=sys.stderr, flush=True)
    for command in (
        [sys.executable, "-m", "venv", str(build)],
        [str(build / "bin" / "python"), "-m", "pip", "install", "-q", KSERVE],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            subprocess.run(["rm", "-rf", str(build)])
            raise KServeVenvError(
                f"building the KServe venv failed at {command}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
            )
    subprocess.run(["rm", "-rf", str(target)], check=True)  # a broken one, if any
    build.rename(target)  # venvs run from where they are moved: Python finds pyvenv.cfg beside its bin
    print(f"built the KServe venv in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return python


if __name__ == "__main__":
    print(kserve_python())
