"""What a benchmark run measures: the rows, the modes, and the plan handed to each group process.

A *row* is one way of serving the model; a *point* is one row at one concurrency. Rows that
need the same kind of Ray head form a *group*, run in a process of its own (Serve reads its
data-path settings when a process imports it, so each head gets a fresh driver too):

    local    in-process predict, plain FastAPI + uvicorn          no Ray
    proxy    hand-written Serve app, our app (reference)           RAY_DEPLOY_DATA_PATH=proxy
    haproxy  hand-written Serve app                                RAY_DEPLOY_DATA_PATH=haproxy
    default  our app: one variant, A/B, shadow, capture, batching; deploy cost   the package's default
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

GROUPS = ("local", "proxy", "haproxy", "default")
STUDIES = ("apps", "scale_out")
"""Studies of the default head (``benchmarks/studies.py``): many apps on it, and scale-out under a load step."""
GROUP_DATA_PATHS = {"proxy": "proxy", "haproxy": "haproxy", "default": "default"}


@dataclass(frozen=True)
class RowSpec:
    """One way of serving the model."""

    id: str
    title: str
    group: str
    description: str
    http: bool = True
    rows_per_request: int = 1


ROWS = (
    RowSpec(
        "inprocess",
        "in-process predict",
        "local",
        "onnxruntime InferenceSession.run on one row in a loop, in one Python process: no HTTP, no "
        "JSON; concurrency does not apply (shown under c=1).",
        http=False,
    ),
    RowSpec(
        "fastapi",
        "FastAPI + uvicorn",
        "local",
        "one uvicorn process on 127.0.0.1 (benchmarks/fastapi_server.py), the same ONNX model, one onnxruntime thread.",
    ),
    RowSpec(
        "inprocess_rows1024",
        "in-process predict, 1,024 rows",
        "local",
        "onnxruntime InferenceSession.run on 1,024 rows at a time (the held-out rows, repeated) in one Python "
        "process: the model's own speed on a batch, the ceiling of any server's rows/s.",
        http=False,
        rows_per_request=1024,
    ),
    RowSpec(
        "fastapi_rows64",
        "FastAPI + uvicorn, 64 rows",
        "local",
        "the FastAPI server with 64 rows per request (request.json(), numpy.asarray, predict).",
        rows_per_request=64,
    ),
    RowSpec(
        "fastapi_rows1024",
        "FastAPI + uvicorn, 1,024 rows",
        "local",
        "the FastAPI server with 1,024 rows per request.",
        rows_per_request=1024,
    ),
    RowSpec(
        "handwritten_proxy",
        "hand-written Serve, proxy",
        "proxy",
        "a minimal @serve.deployment class (benchmarks/handwritten.py) on a head with Serve's default "
        "data path (HTTP proxy actor, then an actor call to the replica).",
    ),
    RowSpec(
        "handwritten_haproxy",
        "hand-written Serve, HAProxy mode",
        "haproxy",
        "the same deployment on Serve's fastest data path: RAY_SERVE_ENABLE_HA_PROXY=1 and "
        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (HAProxy in front of direct-ingress replicas).",
    ),
    RowSpec(
        "handwritten_direct",
        "hand-written Serve, our data path",
        "default",
        "the same deployment on a head with the package's default data path: with the 'ours' row, it "
        "separates what the data path costs from what our app's request handling costs.",
    ),
    RowSpec(
        "ours_proxy",
        "ours, 1 variant, proxy",
        "proxy",
        "our app (ray_deploy.control.deploy, one ONNX variant) on a head with Serve's default data path: "
        "the reference for what the package's own data path adds.",
    ),
    RowSpec(
        "ours",
        "ours, 1 variant",
        "default",
        "our app with one ONNX variant, deployed with ray_deploy.control.deploy on a head with the package's "
        "default data path, through the URL deploy returns; server-side batching off (the default). Measured "
        "in cycles with the hand-written row on our data path, the two apps alone on the head.",
    ),
    RowSpec(
        "ours_among",
        "ours, 1 variant, among the feature apps",
        "default",
        "the same app again, deployed with the protocol, capture, A/B and shadow rows' apps and measured in "
        "their cycles: the reference of their ratios. Against 'ours', what six busy neighbours cost.",
    ),
    RowSpec(
        "ours_ab",
        "ours, A/B 50/50",
        "default",
        "our app with two ONNX variants splitting traffic 50/50 (the same model twice, so the row "
        "measures the split itself).",
    ),
    RowSpec(
        "ours_ab_xgb",
        "ours, A/B XGBoost vs ONNX",
        "default",
        "our app splitting 50/50 between the native XGBoost model and its ONNX export (the example "
        "A/B test; XGBoost's own predict costs more per row).",
    ),
    RowSpec(
        "ours_shadow",
        "ours, served + shadow",
        "default",
        "our app with the ONNX variant serving all traffic and a second ONNX variant as its shadow "
        "(every request is also scored by the shadow, after the answer is sent).",
    ),
    RowSpec(
        "ours_mlflow",
        "ours, MLflow /invocations",
        "default",
        "the 'ours' app asked as MLflow's scoring clients ask it: POST <app>/invocations with the same row "
        'as {"dataframe_split": {"columns": [...], "data": [[...]]}} (named columns).',
    ),
    RowSpec(
        "ours_oip",
        "ours, Open Inference Protocol",
        "default",
        "the 'ours' app asked as KServe and Triton clients ask it: POST /v2/models/<app>/infer at the server's "
        'root (the front rewrites it to the app) with the same row as {"inputs": [{"name": "input", "shape": '
        '[1, 20], "datatype": "FP32", "data": [...]}]} (JSON tensors); the answer is a typed output tensor.',
    ),
    RowSpec(
        "ours_capture10",
        "ours, capture 10%",
        "default",
        "the 'ours' app's exact settings, as an app of its own, plus prediction capture of 10% of requests "
        '(capture={"sample": 0.1}: each replica hands a sampled copy of the request and its answer to a background '
        "writer thread, which writes Parquet every flush_s, here 0.25 s, under the harness's work dir). Against "
        "'ours' it measures what capture costs the request path; its segments are taken in turn with ours' "
        "(and the other interleaved rows') at each level, and every segment (of any row) is followed by a pause "
        "of flush_s + 0.1 s, so that the writer's last batch is written before the next segment starts and "
        "every segment starts alike.",
    ),
    RowSpec(
        "ours_capture100",
        "ours, capture 100%",
        "default",
        'the same with every request captured (capture={"sample": 1.0}): the upper bound of what capture costs, '
        "writer included (every segment contains several of its writes).",
    ),
    RowSpec(
        "ours_capture10_on",
        "ours, capture 10%, one app switched",
        "default",
        "one app with the 'ours' app's settings whose capture is switched on and off in place, by a deploy that "
        "changes only capture (Serve reconfigures the running replica: the same process, the same model): this "
        'row is its segments with capture={"sample": 0.1, "flush_s": 1.0}, each at least 2 s (two Parquet files), '
        "after 0.5 s of load following the switch. Against ours_capture10_off it measures capture alone.",
    ),
    RowSpec(
        "ours_capture10_off",
        "the same app, capture switched off",
        "default",
        "the ours_capture10_on app's segments with capture switched off (the writer stops after writing what it "
        "holds); the two rows take turns on, off | off, on | ..., so each cycle's pair is one switch apart.",
    ),
    RowSpec(
        "ours_rows64",
        "ours, 64 rows",
        "default",
        "the 'ours' app's settings, as an app of its own, with 64 rows per request "
        '({"instances": [64 rows]}): batch scoring.',
        rows_per_request=64,
    ),
    RowSpec(
        "ours_rows1024",
        "ours, 1,024 rows",
        "default",
        "the same with 1,024 rows per request (about 390 KB of JSON).",
        rows_per_request=1024,
    ),
    RowSpec(
        "ours_oip_binary1024",
        "ours, OIP binary tensors, 1,024 rows",
        "default",
        "the same 1,024 rows as an Open Inference Protocol request in its binary tensor extension (a JSON "
        "header, then the rows as 80 KB of little-endian FP32; Inference-Header-Content-Length), the answer "
        "asked for in binary too: what tritonclient sends by default.",
        rows_per_request=1024,
    ),
    RowSpec(
        "ours_batched",
        "ours, batching on",
        "default",
        "our app with one ONNX variant and server-side batching on (max_batch_size and "
        "batch_wait_timeout_s as in the settings).",
    ),
)
ROWS_BY_ID = {row.id: row for row in ROWS}

TOGGLED_ROWS = {"ours_capture10_on": True, "ours_capture10_off": False}
"""Rows measured on ONE app whose capture is switched on (True) or off (False) in place before each
of their segments (``measure_toggled_rows``): capture's cost against the same app without capture,
the same replica process and model, where two apps (``ours_capture10`` against ``ours``) also differ
by their processes (measured: two identical apps side by side differ by 2-3% with no capture at all)."""
TOGGLED_SEGMENT_S = 2.0
"""The toggled rows' segments are at least this long: two of the writer's flushes in every segment
that captures, so that each pairs a whole share of the writer's work with the same app's without."""
TOGGLE_WARMUP_S = 0.5
"""Load after each switch, unmeasured, before the switched row's segment (the reconfigured replica's
first requests)."""


@dataclass(frozen=True)
class Settings:
    """How long and how hard each point runs, and what the replicas reserve."""

    mode: str
    concurrency: tuple[int, ...] = (1, 8, 32)
    seconds: float = 2.0
    warmup_s: float = 0.5
    rows: tuple[str, ...] = ()
    replica_num_cpus: float = 0.5
    max_ongoing_requests: int = 32
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.002
    inprocess_max_calls: int = 2_000_000
    deploy_cost: bool = False
    # Studies on the default head, after its rows, in the first round only (benchmarks/studies.py).
    studies: tuple[str, ...] = ()
    many_apps: tuple[int, ...] = (10, 30)  # the "apps" study's checkpoints; it deploys up to the last
    scale_out_slices: int = 30  # one-second slices after the "scale_out" study's load step
    group_timeout_s: float = 600.0
    repeat: int = 1  # rounds of every group; each point reports its median round
    # The interleaved rows (groups.INTERLEAVED_ROWS) are measured in cycles: at each level, every
    # row one segment of segment_s in turn, at least min_cycles and at most max_cycles times,
    # stopping early once every target at that level is decided (benchmarks/report.py).
    segment_s: float = 2.0
    min_cycles: int = 1
    max_cycles: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MODES = {
    "smoke": Settings(
        mode="smoke",
        concurrency=(1,),
        seconds=1.0,
        warmup_s=0.3,
        rows=("inprocess", "fastapi", "ours"),
        group_timeout_s=300.0,
        segment_s=1.0,
    ),
    "quick": Settings(
        mode="quick",
        seconds=2.0,
        warmup_s=0.5,
        rows=tuple(r.id for r in ROWS if r.id != "ours_ab_xgb"),
        group_timeout_s=900.0,
        studies=("apps", "scale_out"),
        many_apps=(10,),
        repeat=3,
        segment_s=1.0,
        min_cycles=4,
        max_cycles=6,
    ),
    "full": Settings(
        mode="full",
        seconds=10.0,
        warmup_s=2.0,
        rows=tuple(r.id for r in ROWS),
        deploy_cost=True,
        studies=("apps", "scale_out"),
        scale_out_slices=45,
        group_timeout_s=3600.0,
        repeat=3,
        segment_s=2.0,
        min_cycles=6,
        max_cycles=16,
    ),
}


def settings_for(mode: str, **overrides: Any) -> Settings:
    """A mode's settings with the given fields replaced (None leaves a field as the mode has it)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = [r for r in given.get("rows", ()) if r not in ROWS_BY_ID]
    if unknown:
        raise ValueError(f"rows: {', '.join(unknown)} unknown; rows are {', '.join(ROWS_BY_ID)}")
    if given.get("repeat", 1) < 1:
        raise ValueError(f"repeat: expected a whole number of rounds >= 1, got {given['repeat']}")
    settings = replace(MODES[mode], **given)
    if not 1 <= settings.min_cycles <= settings.max_cycles:
        raise ValueError(
            "cycles (--min-cycles, --max-cycles): expected 1 <= min_cycles <= max_cycles, "
            f"got {settings.min_cycles} and {settings.max_cycles}"
        )
    unknown = [name for name in settings.studies if name not in STUDIES]
    if unknown:
        raise ValueError(f"studies (--studies): {', '.join(unknown)} unknown; studies are {', '.join(STUDIES)}")
    if settings.studies and (not settings.many_apps or min(settings.many_apps) < 1):
        raise ValueError(f"many_apps (--apps): expected app counts >= 1, got {settings.many_apps}")
    if settings.segment_s <= 0:
        raise ValueError(f"segment_s (--segment): expected seconds > 0, got {settings.segment_s:g}")
    return settings


@dataclass(frozen=True)
class Plan:
    """Everything a group process needs, written as JSON into the run's work directory."""

    settings: Settings
    workdir: str
    onnx_path: str
    request_row: list[float]
    model_refs: dict[str, Any] = field(default_factory=dict)
    repo: str = ""
    request_rows: list[list[float]] = field(default_factory=list)
    """Held-out rows, repeated up to the most rows per request any row sends."""

    @property
    def body(self) -> str:
        return json.dumps({"instances": [self.request_row]})

    def rows_for(self, spec: RowSpec) -> list[list[float]]:
        """The rows one request of ``spec`` carries."""
        if spec.rows_per_request == 1:
            return [self.request_row]
        if len(self.request_rows) < spec.rows_per_request:
            raise ValueError(f"the plan holds {len(self.request_rows)} rows; {spec.id} sends {spec.rows_per_request}")
        return self.request_rows[: spec.rows_per_request]

    def body_for(self, spec: RowSpec) -> str:
        return json.dumps({"instances": self.rows_for(spec)})

    def rows_of(self, group: str) -> list[RowSpec]:
        return [ROWS_BY_ID[r] for r in self.settings.rows if ROWS_BY_ID[r].group == group]

    def write(self, path: Path) -> None:
        data = asdict(self)
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def read(cls, path: Path) -> Plan:
        data = json.loads(path.read_text())
        settings = data.pop("settings")
        settings["concurrency"] = tuple(settings["concurrency"])
        for key in ("rows", "studies", "many_apps"):
            settings[key] = tuple(settings[key])
        return cls(settings=Settings(**settings), **data)


ROUND_ENV = "RAY_DEPLOY_BENCH_ROUND"
"""The round (0, 1, ...) a group process measures; interleaved orders turn by it (``groups.interleaved``)."""
