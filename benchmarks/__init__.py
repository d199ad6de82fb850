"""The benchmark harness (issue #6): ``python -m benchmarks.run --quick|--full``; see ``benchmarks/run.py``.

run.py             the entry point: modes, groups, reports
plan.py            rows, modes and the plan each group process reads
groups.py          one group of rows in its own process (a Ray head per group), and the deploy cost
heads.py           benchmark ports and each head's data path
measure.py         HTTP points through loadgen.py, in-process calls
loadgen.py         closed-loop HTTP/1.1 keep-alive load generator (the role of wrk)
models.py          the example flow's XGBoost model and its ONNX export, stored for our replicas
handwritten.py     the hand-written Serve deployment
fastapi_server.py  the FastAPI + uvicorn baseline
report.py          ratios, targets, Markdown and PNG
"""

import os as _os
import sys as _sys
from importlib.machinery import PathFinder as _PathFinder
from pathlib import Path as _Path


def _prefer_the_installed_package() -> None:
    """Run from a checkout (``python -m benchmarks...``), the checkout's root is on ``sys.path``
    (and in ``PYTHONPATH`` for the processes the harness starts), and with it a second copy of
    the Metaflow extension when the package is installed normally (not editable): Metaflow
    refuses to load two, here and in the Ray head this process starts. Once this package is
    imported its modules need the root no more, so it goes when an installed ``ray_deploy`` is
    found elsewhere. (Processes that import ``benchmarks`` are started with the root added back.)"""
    root = _Path(__file__).resolve().parent.parent

    def elsewhere(entries: list[str]) -> list[str]:
        return [entry for entry in entries if _Path(entry or ".").resolve() != root]

    if _PathFinder.find_spec("ray_deploy", elsewhere(_sys.path)) is None:
        return  # an editable install, or none: the checkout is the package
    _sys.path[:] = elsewhere(_sys.path)
    if _os.environ.get("PYTHONPATH"):
        _os.environ["PYTHONPATH"] = _os.pathsep.join(elsewhere(_os.environ["PYTHONPATH"].split(_os.pathsep)))


_prefer_the_installed_package()
