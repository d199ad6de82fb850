"""One group of rows, run in a process of its own (started by ``benchmarks.run``):

    python -m benchmarks.groups GROUP PLAN.json OUT.json

The process's environment selects the head (``benchmarks.heads.head_environment``). A head
group starts its Ray head, deploys and measures each row in turn (deleting each app after its
row; the last one goes with the head), and stops the head at the end, whatever happened. The rows
that ratios compare with ``ours`` (``INTERLEAVED_ROWS``) are measured together, their points
interleaved; the rows of one app whose capture is switched in place (``TOGGLED_ROWS``) likewise, on
their own app. A row that fails is recorded with its error and the next row runs. The result (head,
rows, deploy cost) is written to OUT.json.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from benchmarks.measure import JSON_HEADERS, REPO, measure_http, measure_inprocess, wait_until_answers
from benchmarks.plan import (
    GROUP_DATA_PATHS,
    GROUPS,
    ROUND_ENV,
    ROWS_BY_ID,
    TOGGLE_WARMUP_S,
    TOGGLED_ROWS,
    TOGGLED_SEGMENT_S,
    Plan,
    RowSpec,
)

TRAIN_FLOW = REPO / "flows" / "train_flow.py"
FLOW_TIMEOUT_S = 900.0
VARIANT_SAMPLE_REQUESTS = 40
HEAD_STOP_GRACE_S = 2.0
"""Seconds a head's processes get after SIGTERM before SIGKILL (nothing of the head is kept)."""
_SERVING_LINE = re.compile(r"app '([^']+)' is serving at (\S+) \(([\d.]+)s\)")


def row_result(spec: RowSpec, **fields: Any) -> dict[str, Any]:
    return {"id": spec.id, "title": spec.title, "group": spec.group, "http": spec.http, "points": [], **fields}


def attempt(spec: RowSpec, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one row; its error (type, message, where) is recorded instead of raised."""
    started = time.monotonic()
    print(f"[bench] {spec.id} ...", file=sys.stderr, flush=True)
    try:
        result = row_result(spec, **measure())
    except Exception as exc:
        where = traceback.format_exc(limit=-3)
        print(where, file=sys.stderr, flush=True)
        result = row_result(spec, error=f"{type(exc).__name__}: {exc}", traceback=where[-3000:])
    result["row_seconds"] = round(time.monotonic() - started, 2)
    return result


# -- rows without Ray --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure_inprocess_row(plan: Plan, spec: RowSpec) -> dict[str, Any]:
    s = plan.settings
    point = measure_inprocess(
        Path(plan.onnx_path).read_bytes(),
        plan.rows_for(spec),
        seconds=s.seconds,
        warmup_s=s.warmup_s,
        max_calls=s.inprocess_max_calls,
    )
    return {"points": [point]}


def measure_fastapi_rows(plan: Plan, specs: list[RowSpec]) -> list[dict[str, Any]]:
    """Start the FastAPI server on a free loopback port, measure each of its rows (their rows
    per request), stop it. Rows the server could not start for are recorded with its error."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/predict"
    log = open(Path(plan.workdir) / "fastapi.log", "ab")  # noqa: SIM115 - closed below
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fastapi_server", plan.onnx_path, "--port", str(port)],
        cwd=str(REPO),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            ready_s = wait_until_answers(url, plan.body)
        except Exception as exc:
            return [row_result(spec, error=f"{type(exc).__name__}: {exc}") for spec in specs]
        s = plan.settings

        def measure(spec: RowSpec) -> dict[str, Any]:
            body = plan.body_for(spec)
            points = measure_http(url, body, concurrency=s.concurrency, seconds=s.seconds, warmup_s=s.warmup_s)
            return {"url": url, "startup": {"first_answer_s": round(ready_s, 3)}, "points": points}

        return [attempt(spec, partial(measure, spec)) for spec in specs]
    finally:
        stop_process(server)
        log.close()


def stop_process(process: subprocess.Popen) -> None:
    """Stop a process this module started: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


# -- rows on a Ray head ------------------------------------------------------------------------


def app_name(spec: RowSpec) -> str:
    return "bench-" + spec.id.replace("_", "-")


OUR_APPS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    # row id: (spec options, variant name -> stored model)
    "ours": ({"predictor": "onnx"}, {"default": "onnx"}),
    "ours_among": ({"predictor": "onnx"}, {"default": "onnx"}),
    "ours_proxy": ({"predictor": "onnx"}, {"default": "onnx"}),
    "ours_ab": (
        {"variants": {"a": {"predictor": "onnx", "weight": 50}, "b": {"predictor": "onnx", "weight": 50}}},
        {"a": "onnx", "b": "onnx"},
    ),
    "ours_ab_xgb": (
        {"variants": {"xgb": {"predictor": "xgboost", "weight": 50}, "onnx": {"predictor": "onnx", "weight": 50}}},
        {"xgb": "xgboost", "onnx": "onnx"},
    ),
    "ours_shadow": (
        {"variants": {"served": {"predictor": "onnx", "weight": 100}, "shadow": {"predictor": "onnx", "shadow": True}}},
        {"served": "onnx", "shadow": "onnx"},
    ),
    "ours_rows64": ({"predictor": "onnx"}, {"default": "onnx"}),
    "ours_rows1024": ({"predictor": "onnx"}, {"default": "onnx"}),
    "ours_oip_binary1024": ({"predictor": "onnx"}, {"default": "onnx"}),
    "ours_batched": ({"predictor": "onnx", "max_batch_size": None, "batch_wait_timeout_s": None}, {"default": "onnx"}),
    # The ``ours`` app's settings plus capture; its path is set under the work dir (our_spec_options).
    "ours_capture10": ({"predictor": "onnx", "capture": {"sample": 0.1, "flush_s": 0.25}}, {"default": "onnx"}),
    "ours_capture100": ({"predictor": "onnx", "capture": {"sample": 1.0, "flush_s": 0.25}}, {"default": "onnx"}),
}
SHARED_APP = {"ours_mlflow": "ours_among", "ours_oip": "ours_among"}
"""Rows that deploy no app of their own: they ask the ``ours_among`` app, each in its own protocol (``our_request``)."""
PAIRED_ROWS = ("ours", "handwritten_direct")
"""Our app and the hand-written deployment, on the package's data path: the two apps alone on the
head, measured in cycles (``measure_in_cycles``) before the feature apps come. ``ours`` so measured
is what the rows of other heads and processes compare with (Serve's proxy and HAProxy mode,
FastAPI): like them, one app serving beside nothing busier than one idle neighbour. (Measured among
the feature apps instead, as it once was, ours read 7-12% below the hand-written deployment measured
alone, and below Serve's HAProxy mode; beside each other, the two read 0.95x-1.01x.) Each of their
segments follows its own warm-up (``warmup_s``), as every point of the other heads does, so that
both sides of a ratio across heads are measured the same way."""
INTERLEAVED_ROWS = (
    "ours_among",
    "ours_mlflow",
    "ours_oip",
    "ours_capture10",
    "ours_capture100",
    "ours_ab",
    "ours_shadow",
)
"""Rows that ratios compare with ``ours_among`` (our plain app among them): deployed together on one
head and measured in cycles (``measure_in_cycles``: at each level, one short segment of every row in
turn, the order turned each cycle, until every target at that level is decided or the cycles run
out), so that a drift of the machine meets all of them alike and each ratio pairs segments taken
seconds apart. The protocol rows ask the ``ours_among`` app itself (``SHARED_APP``); the others are
apps of their own. ``ours_among`` against ``ours`` is what six busy neighbours cost."""
CAPTURES_DIR = "captures"
"""Where the capture rows' apps write their captures: this folder of the run's work dir."""
CAPTURE_SETTLE_MARGIN_S = 0.1
"""When capturing apps are measured, the harness waits their ``flush_s`` plus this after every
segment (of any row): a capturing app's writer wakes every ``flush_s`` and writes what its segment
captured before the next segment starts, so that no other row pays for it; and every segment,
whatever its row, starts after the same pause (a pause after some rows only favoured the row
measured next: measured, the plain app read 5-15% above rows whose points followed no pause)."""
STATS_PUSH_WAIT_S = 2.5
"""Replicas push their stats (requests, captured, dropped) every 2 s: a wait before reading them."""
TOGGLED_APP = "bench-ours-capture10-toggled"
TOGGLED_CAPTURE = {"sample": 0.1, "flush_s": 1.0}
"""The toggled app's capture when on: 10% of requests, a Parquet file a second (files five times as
often as the default ``flush_s`` of 5 s, so each costs more per record than by default)."""
_T = TypeVar("_T")


def app_owner(row_id: str) -> str:
    """The row whose app a row of ours asks (itself, but for the protocol rows)."""
    return SHARED_APP.get(row_id, row_id)


def interleaved(rows: Sequence[_T], levels: Sequence[int], start: int = 0) -> list[tuple[int, _T]]:
    """The order of an interleaved measurement, as (level, row): at each level every row once, the
    order turned by one more row each level (a, b, c at the first level, then b, c, a, then c, a, b),
    and by ``start`` more (the round): a row's place in the order, which a drift or a pause favours,
    changes from round to round, and the median over rounds evens it out."""
    rows = list(rows)
    schedule: list[tuple[int, _T]] = []
    for index, level in enumerate(levels):
        turn = (start + index) % max(1, len(rows))
        schedule += [(level, row) for row in rows[turn:] + rows[:turn]]
    return schedule


def measure_in_cycles(
    rows: Sequence[str],
    settings: Any,
    segment: Callable[[str, int, float], dict[str, Any]],
    *,
    start: int = 0,
    pause_s: float = 0.0,
    failed: Callable[[str, BaseException], None] = lambda row, exc: None,
) -> dict[str, list[dict[str, Any]]]:
    """Every row's points, measured in cycles: at each level (``settings.concurrency``), a warm-up
    segment of each row (``settings.warmup_s``), then cycles of one segment (``settings.segment_s``)
    of every row, the order turned by one row each cycle and each level, and by ``start`` (the
    round), with ``pause_s`` after every segment. After ``min_cycles``, the level ends as soon as
    every target ratio between these rows at that level is decided (met or missed, its interval
    clear of the target: ``benchmarks.report``), else after ``max_cycles``. A row whose segment
    raises is reported to ``failed`` and measured no more. ``segment(row, level, seconds)`` returns
    one point; each row's point at a level merges its segments (``merge_segments``)."""
    from benchmarks.report import RATIOS, estimate

    alive = list(rows)
    points: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}

    def run(row: str, level: int, seconds: float, into: list[dict[str, Any]] | None) -> None:
        try:
            measured = segment(row, level, seconds)
        except Exception as exc:
            alive.remove(row)
            failed(row, exc)
            return
        if into is not None:
            into.append(measured)
        if pause_s:
            time.sleep(pause_s)

    for index, level in enumerate(settings.concurrency):
        segments: dict[str, list[dict[str, Any]]] = {row: [] for row in alive}
        if settings.warmup_s > 0:
            for row in list(alive):
                run(row, level, settings.warmup_s, None)
        for cycle in range(settings.max_cycles):
            for _, row in interleaved(list(alive), (level,), start + index + cycle):
                if row in alive:
                    run(row, level, settings.segment_s, segments[row])
            if cycle + 1 < settings.min_cycles:
                continue
            merged = {row: merge_segments(segments[row], level) for row in alive}
            undecided = [
                ratio.name
                for ratio in RATIOS
                if ratio.numerator in merged
                and ratio.denominator in merged
                and estimate(ratio, merged[ratio.numerator], merged[ratio.denominator], level)["status"] == "close"
            ]
            if not undecided:
                break
            if cycle + 1 < settings.max_cycles:
                print(f"[bench] c={level}: {', '.join(undecided)} too close to call after {cycle + 1} cycles; "
                      "one more", file=sys.stderr, flush=True)  # fmt: skip
        for row in alive:
            points[row].append(merge_segments(segments[row], level))
    return points


def merge_segments(segments: list[dict[str, Any]], level: int) -> dict[str, Any]:
    """One point from a row's segments at a level: counts summed, requests/s over their summed
    time, p50 and p99 the medians of the segments' (each segment's numbers kept, in order, as
    ``segments``: ratios pair them with another row's)."""
    seconds = sum(p["seconds"] for p in segments)
    ok = sum(p["ok"] for p in segments)
    errors: Counter[str] = Counter()
    for p in segments:
        errors.update(p.get("errors") or {})

    def middle(key: str) -> float | None:
        values = [p[key] for p in segments if p.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    shares = [p["generator_cpu"] for p in segments if p.get("generator_cpu") is not None]
    busy = [p["server_cpu_s"] for p in segments if p.get("server_cpu_s") is not None]
    costs = {}
    if busy and len(busy) == len(segments):
        costs["server_cpu_s"] = round(sum(busy), 4)
        costs["cpu_us_per_request"] = round(sum(busy) / ok * 1e6, 2) if ok else None
        costs["steal"] = round(statistics.fmean(p.get("steal") or 0.0 for p in segments), 3)
    return {
        "concurrency": level,
        "seconds": round(seconds, 3),
        "sent": sum(p["sent"] for p in segments),
        "ok": ok,
        "failed": sum(p["failed"] for p in segments),
        "errors": dict(errors),
        "rps": round(ok / seconds, 1) if seconds else 0.0,
        "p50_ms": middle("p50_ms"),
        "p99_ms": middle("p99_ms"),
        "generator": segments[0].get("generator") if segments else None,
        "generator_cpu": round(statistics.fmean(shares), 3) if shares else None,
        **costs,
        "cycles": len(segments),
        "segments": [
            {key: p.get(key) for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request", "steal")} for p in segments
        ],
    }


def our_request(spec: RowSpec, url: str, body: str, app: str) -> tuple[str, str | bytes, dict[str, str]]:
    """Where a row of ours sends its requests to ``app`` (at ``url``), what, and with which headers:
    the plan's JSON body at the app's URL, or the same rows as MLflow's clients send them, to
    ``/invocations`` (``ours_mlflow``), or as an Open Inference Protocol client sends them, to
    ``/v2/models/<app>/infer`` at the server's root: JSON tensors (``ours_oip``) or the binary
    tensor extension, FP32 bytes after a JSON header, the answer asked for in binary as well
    (``ours_oip_binary1024``, what ``tritonclient`` sends by default)."""
    if spec.id not in ("ours_mlflow", "ours_oip", "ours_oip_binary1024"):
        return url, body, JSON_HEADERS
    rows = json.loads(body)["instances"]
    if spec.id.startswith("ours_oip"):
        root = url[: -len(urlsplit(url).path)] if urlsplit(url).path else url
        infer = f"{root}/v2/models/{app}/infer"
        shape = [len(rows), len(rows[0])]
        if spec.id == "ours_oip":
            tensor = {"name": "input", "shape": shape, "datatype": "FP32", "data": [v for row in rows for v in row]}
            return infer, json.dumps({"inputs": [tensor]}), JSON_HEADERS
        import numpy as np

        data = np.asarray(rows, dtype="<f4").tobytes()
        tensor = {"name": "input", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": len(data)}}
        header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
        return infer, header + data, headers
    columns = [f"f{index}" for index in range(len(rows[0]))]
    return f"{url}/invocations", json.dumps({"dataframe_split": {"columns": columns, "data": rows}}), JSON_HEADERS


def our_spec_options(spec: RowSpec, plan: Plan) -> dict[str, Any]:
    s = plan.settings
    options, _ = OUR_APPS[spec.id]
    options = dict(options)
    if spec.id == "ours_batched":
        options.update(max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s)
    if "capture" in options:
        options["capture"] = {**options["capture"], "path": str(Path(plan.workdir).resolve() / CAPTURES_DIR)}
    return {
        "app": app_name(spec),
        "num_cpus": s.replica_num_cpus,
        "max_ongoing_requests": s.max_ongoing_requests,
        "lineage": False,
        **options,
    }


def measure_our_row(spec: RowSpec, plan: Plan, *, keep: bool) -> dict[str, Any]:
    """Deploy with the package's own API, wait for a scoring answer, measure, delete the app (unless ``keep``)."""
    from ray_deploy import DeploymentSpec, ModelRef, delete_app, deploy

    options = our_spec_options(spec, plan)
    deployment = DeploymentSpec.from_options(options)
    refs = {
        variant: ModelRef.model_validate(plan.model_refs[stored]) for variant, stored in OUR_APPS[spec.id][1].items()
    }
    started = time.monotonic()
    result = deploy(deployment, refs)
    deploy_s = time.monotonic() - started
    url, body, headers = our_request(spec, result.url, plan.body_for(spec), deployment.app)
    wait_s = wait_until_answers(url, body, headers=headers)
    try:
        answered = sample_answers(url, body, headers=headers)
        s = plan.settings
        points = measure_http(
            url, body, concurrency=s.concurrency, seconds=s.seconds, warmup_s=s.warmup_s, headers=headers
        )
    finally:
        if not keep:
            delete_app(deployment.app)
    return {
        "url": result.url,
        "app": deployment.app,
        "options": {k: v for k, v in options.items() if k != "app"},
        "deploy": {"deploy_s": round(deploy_s, 3), "first_answer_s": round(deploy_s + wait_s, 3)},
        "answers": answered,
        "points": points,
    }


def measure_interleaved_rows(
    specs: list[RowSpec], plan: Plan, http_url: str, *, keep: bool, segment_warmup_s: float = 0.0
) -> list[dict[str, Any]]:
    """The ``PAIRED_ROWS`` or the ``INTERLEAVED_ROWS`` of the plan: each app they ask deployed once
    (the protocol rows ask the ``ours_among`` app; ``handwritten_direct`` is the hand-written app),
    then every row's points, interleaved level by level (``interleaved``), each segment after
    ``segment_warmup_s`` of load, with a settling wait after each point of a capturing app
    (``CAPTURE_SETTLE_MARGIN_S``); then what each capturing app captured. A row that fails is recorded with its error; the others go on. The apps
    are deleted at the end, unless ``keep``."""
    from ray_deploy import DeploymentSpec, ModelRef, delete_app, deploy

    s = plan.settings
    results = {spec.id: row_result(spec) for spec in specs}
    print(f"[bench] {', '.join(results)} (interleaved) ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    deployed: dict[str, tuple[Any, float]] = {}  # app owner -> (its DeploymentSpec, time.time() at its deploy)
    requests: dict[str, tuple[str, str | bytes, dict[str, str]]] = {}
    settle_s: dict[str, float] = {}
    try:
        for owner in dict.fromkeys(app_owner(spec.id) for spec in specs):
            asking = [spec for spec in specs if app_owner(spec.id) == owner]
            if owner == "handwritten_direct":
                deploy_handwritten_among(plan, http_url, results[owner], requests)
                continue
            options = our_spec_options(ROWS_BY_ID[owner], plan)
            try:
                deployment = DeploymentSpec.from_options(options)
                stored = OUR_APPS[owner][1]
                refs = {v: ModelRef.model_validate(plan.model_refs[name]) for v, name in stored.items()}
                deploy_started, since = time.monotonic(), time.time()
                result = deploy(deployment, refs)
            except Exception as exc:
                for spec in asking:
                    record_error(results[spec.id], exc)
                continue
            deploy_s = time.monotonic() - deploy_started
            deployed[owner] = (deployment, since)
            for spec in asking:
                url, body, headers = our_request(spec, result.url, plan.body_for(spec), deployment.app)
                try:
                    wait_s = wait_until_answers(url, body, headers=headers)
                    answered = sample_answers(url, body, headers=headers)
                except Exception as exc:
                    record_error(results[spec.id], exc)
                    continue
                results[spec.id].update(
                    url=url,
                    app=deployment.app,
                    options={k: v for k, v in options.items() if k != "app"},
                    deploy={"deploy_s": round(deploy_s, 3), "first_answer_s": round(deploy_s + wait_s, 3)},
                    answers=answered,
                )
                requests[spec.id] = (url, body, headers)
                if deployment.capture is not None:
                    settle_s[spec.id] = deployment.capture.flush_s + CAPTURE_SETTLE_MARGIN_S
        measured = [spec.id for spec in specs if spec.id in requests]

        def segment(row_id: str, level: int, seconds: float) -> dict[str, Any]:
            url, body, headers = requests[row_id]
            (point,) = measure_http(
                url, body, concurrency=(level,), seconds=seconds, warmup_s=segment_warmup_s, headers=headers
            )
            return point

        points = measure_in_cycles(
            measured,
            s,
            segment,
            start=int(os.environ.get(ROUND_ENV, "0")),
            pause_s=max(settle_s.values(), default=0.0),
            failed=lambda row_id, exc: record_error(results[row_id], exc),
        )
        for row_id, row_points in points.items():
            if not results[row_id].get("error"):
                results[row_id]["points"] = row_points
        capturing = {owner: app for owner, app in deployed.items() if app[0].capture is not None}
        if capturing:
            time.sleep(STATS_PUSH_WAIT_S)
        for owner, (deployment, since) in capturing.items():
            counts = capture_counts(deployment.app, deployment.capture, since)
            for spec in specs:
                if app_owner(spec.id) == owner and not results[spec.id].get("error"):
                    results[spec.id]["capture"] = counts
    finally:
        if not keep:
            for deployment, _ in deployed.values():
                delete_app(deployment.app)
            if "handwritten_direct" in requests:
                from ray import serve

                from benchmarks.handwritten import APP_NAME

                serve.delete(APP_NAME)
    seconds = round(time.monotonic() - started, 2)
    for row in results.values():
        row["row_seconds"] = seconds
    return list(results.values())


def toggled_options(plan: Plan, capture: bool) -> dict[str, Any]:
    """The toggled app's spec options: the ``ours`` app's settings, with ``TOGGLED_CAPTURE`` (written
    under the work dir) when ``capture``; the options differ in nothing else, so a deploy of the other
    only reconfigures the running replica (Serve's ``user_config``), which keeps its process."""
    options = {**our_spec_options(ROWS_BY_ID["ours"], plan), "app": TOGGLED_APP}
    if capture:
        options["capture"] = {**TOGGLED_CAPTURE, "path": str(Path(plan.workdir).resolve() / CAPTURES_DIR)}
    return options


def measure_toggled_rows(specs: list[RowSpec], plan: Plan, *, keep: bool) -> list[dict[str, Any]]:
    """The ``TOGGLED_ROWS`` of the plan, on one app: deployed with capture, then measured in cycles
    (``measure_in_cycles``, segments of at least ``TOGGLED_SEGMENT_S``) where each row's segment
    first switches the app's capture to the row's (a deploy that changes only ``capture``, checked
    on the replica's own description) and loads it for ``TOGGLE_WARMUP_S`` unmeasured. The turning
    order of two rows (on, off | off, on | ...) switches once per cycle, and each cycle's two
    segments, one switch apart, form a ratio's pair. Recorded: the replica processes that answered
    (one, if every switch happened in place), the switches and their times, the requests sent while
    capturing and the rows captured on disk."""
    from ray_deploy import DeploymentSpec, ModelRef, delete_app, deploy, read_captures

    results = {spec.id: row_result(spec) for spec in specs}
    print(f"[bench] {', '.join(results)} (one app, capture switched in place) ...", file=sys.stderr, flush=True)
    started, since = time.monotonic(), time.time()
    ref = ModelRef.model_validate(plan.model_refs[OUR_APPS["ours"][1]["default"]])
    body = plan.body_for(ROWS_BY_ID["ours"])
    state: dict[str, Any] = {"capture": None, "url": None}
    toggles: dict[str, Any] = {"switches": 0, "switch_s": [], "replica_pids": [], "requests_capturing": 0}
    deployed = False

    def switch(capture: bool) -> None:
        switching = time.monotonic()
        result = deploy(DeploymentSpec.from_options(toggled_options(plan, capture)), {"default": ref})
        described = describe_app(result.url)
        if (described.get("capture") is not None) != capture:
            raise RuntimeError(f"app {TOGGLED_APP!r} was deployed with capture {'on' if capture else 'off'} "
                               f"but its replica describes capture {described.get('capture')!r}")  # fmt: skip
        pid = (described.get("replica") or {}).get("pid")
        if pid not in toggles["replica_pids"]:
            toggles["replica_pids"].append(pid)
        if state["capture"] is not None:
            toggles["switches"] += 1
            toggles["switch_s"].append(round(time.monotonic() - switching, 3))
        state.update(capture=capture, url=result.url)

    def load(level: int, seconds: float) -> dict[str, Any]:
        (point,) = measure_http(state["url"], body, concurrency=(level,), seconds=seconds, warmup_s=0.0)
        if state["capture"]:
            toggles["requests_capturing"] += point["ok"]
        return point

    def segment(row_id: str, level: int, seconds: float) -> dict[str, Any]:
        if state["capture"] != TOGGLED_ROWS[row_id]:
            switch(TOGGLED_ROWS[row_id])
            load(level, TOGGLE_WARMUP_S)
        return load(level, seconds)

    try:
        try:
            switch(True)
            deployed = True
            wait_until_answers(state["url"], body)
            answered = sample_answers(state["url"], body)
            toggles["requests_capturing"] += VARIANT_SAMPLE_REQUESTS
        except Exception as exc:
            for row in results.values():
                record_error(row, exc)
            return list(results.values())
        for spec in specs:
            results[spec.id].update(
                url=state["url"],
                app=TOGGLED_APP,
                options={k: v for k, v in toggled_options(plan, TOGGLED_ROWS[spec.id]).items() if k != "app"},
                answers=answered,
            )
        s = plan.settings
        points = measure_in_cycles(
            list(results),
            replace(s, segment_s=max(s.segment_s, TOGGLED_SEGMENT_S)),
            segment,
            start=int(os.environ.get(ROUND_ENV, "0")),
            failed=lambda row_id, exc: record_error(results[row_id], exc),
        )
        if state["capture"]:
            switch(False)  # the writer writes what it holds as it stops
        capture = {"root": str(Path(plan.workdir).resolve() / CAPTURES_DIR), **TOGGLED_CAPTURE}
        try:
            capture["rows_on_disk"] = len(read_captures(capture["root"], TOGGLED_APP, since=since))
        except Exception as exc:
            capture["error"] = f"{type(exc).__name__}: {exc}"
        capture["requests"] = toggles["requests_capturing"]
        for row_id, row_points in points.items():
            row = results[row_id]
            if not row.get("error"):
                row.update(points=row_points, toggles=toggles)
                if TOGGLED_ROWS[row_id]:
                    row["capture"] = capture
    except Exception as exc:
        for row in results.values():
            if not row.get("error"):
                record_error(row, exc)
    finally:
        if deployed and not keep:
            delete_app(TOGGLED_APP)
    seconds = round(time.monotonic() - started, 2)
    for row in results.values():
        row["row_seconds"] = seconds
    return list(results.values())


def describe_app(url: str) -> dict[str, Any]:
    """What a replica of an app says it serves (``GET`` the app's URL): variants, capture, process."""
    import httpx

    answer = httpx.get(url, timeout=10)
    answer.raise_for_status()
    return answer.json()


def record_error(row: dict[str, Any], exc: BaseException) -> None:
    """Record the exception being handled on a row (type, message, where)."""
    row.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=-3)[-3000:])


def capture_counts(app: str, capture: Any, since: float) -> dict[str, Any]:
    """What a capturing app did: the requests its replicas answered, captured and dropped (their
    stats, summed over variants), and the rows of its Parquet files written since ``since``
    (``time.time()``; earlier rounds of the run wrote to the same root). Errors are recorded."""
    from ray_deploy import app_status, read_captures

    counts: dict[str, Any] = {"root": capture.path, "sample": capture.sample, "flush_s": capture.flush_s}
    try:
        (status,) = app_status(app)
        metrics = (status.get("metrics") or {}).values()
        for key in ("requests", "captured", "capture_dropped"):
            counts[key] = sum(variant.get(key) or 0 for variant in metrics)
        counts["rows_on_disk"] = len(read_captures(capture.path, app, since=since))
    except Exception as exc:
        counts["error"] = f"{type(exc).__name__}: {exc}"
    return counts


def sample_answers(
    url: str, body: str | bytes, count: int = VARIANT_SAMPLE_REQUESTS, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """A few answers before the load: which variants answered, and one answer's body (of an
    answer in the Open Inference Protocol's binary extension, its JSON header)."""
    import httpx

    variants: Counter[str] = Counter()
    example = None
    with httpx.Client(timeout=10) as client:
        for _ in range(count):
            answer = client.post(url, content=body, headers=JSON_HEADERS if headers is None else headers)
            length = answer.headers.get("inference-header-content-length")
            data = json.loads(answer.content[: int(length)]) if length else answer.json()
            example = example or data
            # An Open Inference Protocol answer names its variant in a header only.
            variants[str(data.get("variant") or answer.headers.get("x-ray-deploy-variant"))] += 1
    return {"variants": dict(variants), "example": example}


def deploy_handwritten_among(
    plan: Plan, http_url: str, result: dict[str, Any], requests: dict[str, tuple[str, str | bytes, dict[str, str]]]
) -> None:
    """Deploy the hand-written app beside ``ours`` (``PAIRED_ROWS``), to be measured in the same
    cycles: its row's details go into ``result``, its request into ``requests``, a failure into
    ``result`` alone."""
    from benchmarks.handwritten import ROUTE_PREFIX, deploy_handwritten

    s = plan.settings
    url = http_url + ROUTE_PREFIX
    try:
        started = time.monotonic()
        deploy_handwritten(
            Path(plan.onnx_path).read_bytes(), num_cpus=s.replica_num_cpus, max_ongoing_requests=s.max_ongoing_requests
        )
        deploy_s = time.monotonic() - started
        wait_s = wait_until_answers(url, plan.body)
        answered = sample_answers(url, plan.body, count=3)
    except Exception as exc:
        record_error(result, exc)
        return
    result.update(
        url=url,
        deploy={"deploy_s": round(deploy_s, 3), "first_answer_s": round(deploy_s + wait_s, 3)},
        answers=answered,
    )
    requests["handwritten_direct"] = (url, plan.body, JSON_HEADERS)


def measure_handwritten_row(plan: Plan, http_url: str, *, keep: bool) -> dict[str, Any]:
    """Deploy the hand-written app with ``serve.run``, measure it, delete it (unless ``keep``).

    The last row of a group keeps its app: the head goes next, and deleting a direct-ingress
    replica waits for Serve's draining period (30 s by default in HAProxy mode).
    """
    from ray import serve

    from benchmarks.handwritten import APP_NAME, ROUTE_PREFIX, deploy_handwritten

    s = plan.settings
    started = time.monotonic()
    deploy_handwritten(
        Path(plan.onnx_path).read_bytes(), num_cpus=s.replica_num_cpus, max_ongoing_requests=s.max_ongoing_requests
    )
    deploy_s = time.monotonic() - started
    url = http_url + ROUTE_PREFIX
    wait_s = wait_until_answers(url, plan.body)
    try:
        answered = sample_answers(url, plan.body, count=3)
        points = measure_http(url, plan.body, concurrency=s.concurrency, seconds=s.seconds, warmup_s=s.warmup_s)
    finally:
        if not keep:
            serve.delete(APP_NAME)
    return {
        "url": url,
        "deploy": {"deploy_s": round(deploy_s, 3), "first_answer_s": round(deploy_s + wait_s, 3)},
        "answers": answered,
        "points": points,
    }


def head_state() -> dict[str, Any]:
    """What the package recorded about the running head (its data path), if it records anything."""
    from ray_deploy.cluster import LocalClusterSettings

    settings = LocalClusterSettings.from_env()
    state: dict[str, Any] = {"address": settings.address, "http_port": settings.http_port}
    if hasattr(settings, "head_state"):
        state.update(settings.head_state())
    else:
        state["data_path"] = "proxy (this ray_deploy has no RAY_DEPLOY_DATA_PATH)"
    return state


def run_head_group(group: str, plan: Plan) -> dict[str, Any]:
    from ray_deploy import connect, start_local_cluster, stop_local_cluster

    specs = plan.rows_of(group)
    head: dict[str, Any] = {
        "group": group,
        "requested_data_path": GROUP_DATA_PATHS[group],
        "env_data_path": os.environ.get("RAY_DEPLOY_DATA_PATH"),
    }
    rows: list[dict[str, Any]] = []
    deploy_cost = None
    studies = None
    started = time.monotonic()
    try:
        start_local_cluster()
        head["start_s"] = round(time.monotonic() - started, 2)
        head["state"] = head_state()
        with connect() as info:
            head["http_url"] = info.http_url
            paired = partial(measure_interleaved_rows, http_url=info.http_url, segment_warmup_s=plan.settings.warmup_s)
            among = partial(measure_interleaved_rows, http_url=info.http_url)
            for index, spec in enumerate(specs):
                keep = index == len(specs) - 1
                for kind, measure_together in ((PAIRED_ROWS, paired),
                                               (INTERLEAVED_ROWS, among),
                                               (TOGGLED_ROWS, measure_toggled_rows)):  # fmt: skip
                    if spec.id in kind:
                        together = [other for other in specs if other.id in kind]
                        if spec is together[0]:  # the others are measured with it; kept if no other row follows
                            last = all(later.id in kind for later in specs[index:])
                            rows += measure_together(together, plan, keep=last)
                        break
                else:
                    if spec.id.startswith("handwritten"):
                        measure = partial(measure_handwritten_row, plan, info.http_url, keep=keep)
                    else:
                        measure = partial(measure_our_row, spec, plan, keep=keep)
                    rows.append(attempt(spec, measure))
            if group == "default" and plan.settings.studies:
                from benchmarks.studies import run_studies

                studies = run_studies(plan)
            if group == "default" and plan.settings.deploy_cost:
                deploy_cost = measure_deploy_cost(plan)
    except Exception as exc:
        head["error"] = f"{type(exc).__name__}: {exc}"
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        done = {row["id"] for row in rows}
        rows += [row_result(s, error=f"the {group} head failed: {head['error']}") for s in specs if s.id not in done]
    finally:
        stopping = time.monotonic()
        stop_local_cluster(grace_s=HEAD_STOP_GRACE_S)
        head["stop_s"] = round(time.monotonic() - stopping, 2)
    return {"group": group, "head": head, "rows": rows, "deploy_cost": deploy_cost, "studies": studies}


def run_local_group(plan: Plan) -> dict[str, Any]:
    specs = plan.rows_of("local")
    rows = [attempt(spec, partial(measure_inprocess_row, plan, spec)) for spec in specs if not spec.http]
    served = [spec for spec in specs if spec.http]
    if served:
        rows += measure_fastapi_rows(plan, served)
    return {"group": "local", "head": None, "rows": rows, "deploy_cost": None, "studies": None}


# -- deploy cost -------------------------------------------------------------------------------


def write_flow_without_deploy(source: Path, target: Path) -> Path:
    """A copy of ``source`` with every ``@ray_serve`` removed, and steps that read ``self.ray_serve`` emptied.

    Made from the flow's own source each time (never a hand-kept copy), so the two runs differ
    only by the deploy.
    """
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef):
            continue
        node.decorator_list = [d for d in node.decorator_list if not _is_ray_serve(d)]
        reads_record = any(isinstance(n, ast.Attribute) and n.attr == "ray_serve" for n in ast.walk(node))
        if reads_record:
            node.body = [ast.Pass()]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(ast.unparse(ast.fix_missing_locations(tree)) + "\n")
    return target


def _is_ray_serve(decorator: ast.expr) -> bool:
    func = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(func, ast.Name) and func.id == "ray_serve") or (
        isinstance(func, ast.Attribute) and func.attr == "ray_serve"
    )


def run_flow(flow: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    started = time.monotonic()
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, str(flow), "--no-pylint", "run"],
            cwd=str(REPO),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=FLOW_TIMEOUT_S,
            check=False,
        )
    wall_s = time.monotonic() - started
    text = log.read_text(errors="replace")
    serving = _SERVING_LINE.findall(text)
    run: dict[str, Any] = {"flow": str(flow), "wall_s": round(wall_s, 2), "returncode": result.returncode}
    if serving:
        run["deploy_s"] = float(serving[-1][2])
        run["url"] = serving[-1][1]
    if result.returncode != 0:
        run["error"] = text.strip()[-2000:]
    return run


def measure_deploy_cost(plan: Plan) -> dict[str, Any]:
    """The example flow with and without its deploy step's ``@ray_serve``, on the running head.

    Runs: the flow without the deploy, the flow (first deploy of app ``cancer``), the flow again
    (a new release of a serving app). ``deploy_s`` is the package's own "serving after" time;
    the flow's ``end`` step then asks the live app for a prediction, so a run that passes answered.
    """
    from ray_deploy import delete_app

    workdir = Path(plan.workdir)
    env = dict(os.environ)
    env.update(
        USERNAME="ci",
        METAFLOW_DATASTORE_SYSROOT_LOCAL=str(workdir / "flows-datastore"),
        RAY_DEPLOY_HOME=str(workdir / "ray-deploy-home"),
    )
    print("[bench] deploy cost ...", file=sys.stderr, flush=True)
    cost: dict[str, Any] = {"flow": str(TRAIN_FLOW.relative_to(REPO))}
    try:
        no_deploy = write_flow_without_deploy(TRAIN_FLOW, workdir / "flows" / "train_flow_no_deploy.py")
        cost["without_deploy"] = run_flow(no_deploy, env, workdir / "flow-without-deploy.log")
        cost["first_deploy"] = run_flow(TRAIN_FLOW, env, workdir / "flow-first-deploy.log")
        cost["redeploy"] = run_flow(TRAIN_FLOW, env, workdir / "flow-redeploy.log")
        base = cost["without_deploy"]["wall_s"]
        for key in ("first_deploy", "redeploy"):
            cost[key]["extra_s"] = round(cost[key]["wall_s"] - base, 2)
        cost["canary"] = measure_canary(plan)
    except Exception as exc:
        cost["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            delete_app("cancer")
        except Exception as exc:
            cost.setdefault("cleanup_error", f"{type(exc).__name__}: {exc}")
    return cost


CANARY_STEPS = (25.0, 50.0, 100.0)
CANARY_INTERVAL_S = 1.0


def measure_canary(plan: Plan) -> dict[str, Any]:
    """A canary rollout (ONNX release -> XGBoost release, 25/50/100 %, gated) on a serving app:
    its wall time, and that time minus the configured waits (steps x interval_s)."""
    from ray_deploy import DeploymentSpec, delete_app, deploy

    base = {"app": "bench-canary", "num_cpus": plan.settings.replica_num_cpus, "lineage": False}
    rollout = {"strategy": "canary", "steps": list(CANARY_STEPS), "interval_s": CANARY_INTERVAL_S}
    rollout["max_error_rate"] = 0.05
    try:
        deploy(DeploymentSpec.from_options({**base, "predictor": "onnx"}), {"default": _ref(plan, "onnx")})
        started = time.monotonic()
        result = deploy(
            DeploymentSpec.from_options({**base, "predictor": "xgboost", "rollout": rollout}),
            {"default": _ref(plan, "xgboost")},
        )
        total = time.monotonic() - started
    finally:
        delete_app("bench-canary")
    waits = len(CANARY_STEPS) * CANARY_INTERVAL_S
    return {
        "steps": list(CANARY_STEPS),
        "interval_s": CANARY_INTERVAL_S,
        "state": (result.rollout or {}).get("state"),
        "wall_s": round(total, 2),
        "excluding_waits_s": round(total - waits, 2),
    }


def _ref(plan: Plan, stored: str) -> Any:
    from ray_deploy import ModelRef

    return ModelRef.model_validate(plan.model_refs[stored])


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] not in GROUPS:
        raise SystemExit(f"usage: python -m benchmarks.groups {{{','.join(GROUPS)}}} PLAN.json OUT.json")
    group, plan_path, out_path = args
    # The harness stops a group that runs too long with SIGTERM: unwind, so the finally blocks
    # stop the FastAPI server and the Ray head this process started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    plan = Plan.read(Path(plan_path))
    result = run_local_group(plan) if group == "local" else run_head_group(group, plan)
    Path(out_path).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
