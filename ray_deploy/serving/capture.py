"""Prediction capture: a sample of served requests, and the labels sent for them later, kept as Parquet.

Monitoring a model after it ships (drift in its inputs, its predictions, its quality once labels
arrive) needs what it was actually asked and what it answered. Replicas sample requests
(``CaptureWriter.wanted``) and hand each sampled one to their ``CaptureWriter`` as a ``Captured``
tuple; a daemon thread writes them in batches, off the request path. Serving never waits for
storage and never fails because of it: what waits is bounded (``max_pending``), what does not fit
or cannot be written is dropped and counted by variant label, and a failing store is logged once a
minute.

Files go under a capture root (a local directory or ``s3://bucket/prefix``) through Metaflow's own
storage classes, so that the S3 settings a flow uses (``METAFLOW_S3_ENDPOINT_URL``, credentials,
roles) apply here too. The layout is Hive-style, so that pyarrow, pandas and Spark read it as a
dataset partitioned by app, release and UTC hour::

    app=<app>/predictions/release=<release>/hour=<YYYY-MM-DDTHH>/<replica>-<epoch_ms>-<seq>.parquet
    app=<app>/labels/hour=<YYYY-MM-DDTHH>/<replica>-<epoch_ms>-<seq>.parquet

A request of n rows is n Parquet rows (``PREDICTION_COLUMNS``); inputs, predictions and labels are
compact JSON strings, which ``read_captures`` and ``read_labels`` decode. Partition values are
URI-encoded as Hive expects, a missing release is Hive's null partition, and ``partitioning()``
declares them as strings (a content-hash release of digits only would otherwise read as an int).
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import math
import numbers
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import cache
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

from ray_deploy.errors import RayDeployError, SpecError

logger = logging.getLogger(__name__)

CAPTURE_DIR = "ray_deploy_captures"
"""The captures' folder under a Metaflow datastore root."""

PREDICTION_COLUMNS = (
    "ts",
    "request_id",
    "request_key",
    "app",
    "variant",
    "label",
    "release",
    "model_version",
    "latency_ms",
    "row",
    "input",
    "prediction",
    "prediction_value",
    "shadow",
)
LABEL_COLUMNS = (
    "ts",
    "request_id",
    "app",
    "variant",
    "label",
    "release",
    "model_version",
    "truth",
    "prediction",
    "score",
)
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
"""The directory name of a null partition value (a variant without a release), as Hive and pyarrow write it."""
HOUR_FORMAT = "%Y-%m-%dT%H"
WARNING_INTERVAL_S = 60.0
"""A failing store is logged at most once per this many seconds per writer."""

_random = random.random


class CaptureError(RayDeployError):
    headline = "Prediction capture problem"


class Captured(NamedTuple):
    """One sampled request, built on the request path (a tuple: cheap). ``model_input`` is read
    only on the writer thread."""

    ts: float  # time.time() when answered
    request_id: str
    request_key: str | None
    variant: str  # variant name
    label: str  # variant label (name@release), unique per loaded release
    release: str | None
    model_version: str | None  # registered model version "name/3", or None
    latency_ms: float
    model_input: Any  # .rows (lists of values) and .columns (list[str] | None)
    predictions: Any  # JSON-able: one entry per row, else stored whole as row 0's
    shadow: bool = False


class Labelled(NamedTuple):
    """One delayed label, joined to the captured request it is for."""

    ts: float
    request_id: str
    variant: str
    label: str  # variant label
    release: str | None
    model_version: str | None
    truth: Any  # the label sent by the caller, JSON-able
    prediction: Any  # what was served for that request, JSON-able
    score: float | None  # per-request quality score (1.0/0.0 for accuracy, abs error for MAE)


def capture_root(datastore_root: str | None, path: str | None, home: str) -> str:
    """Where captures go: ``path`` if given, else ``<datastore_root>/ray_deploy_captures``, else
    ``<home>/captures`` (``home``: a local directory)."""
    if path:
        return path.rstrip("/")
    if datastore_root:
        return f"{datastore_root.rstrip('/')}/{CAPTURE_DIR}"
    return os.path.join(home, "captures")


def root_kind(root: str) -> str:
    """The Metaflow storage type of a capture root: ``s3`` for ``s3://...``, ``local`` for an absolute path.

    Raises:
        SpecError: the root is neither.
    """
    if root.startswith("s3://") and len(root.rstrip("/")) > len("s3://"):
        return "s3"
    if os.path.isabs(root):
        return "local"
    raise SpecError(f"capture root {root!r} must be an absolute local directory ('/data/captures') or an s3:// URL")


def open_storage(root: str) -> Any:
    """Metaflow's storage object for a capture root (``LocalStorage``, ``S3Storage``), built as Metaflow builds its own."""
    kind = root_kind(root)
    from metaflow.plugins import DATASTORES

    storage_classes = {cls.TYPE: cls for cls in DATASTORES}
    if kind not in storage_classes:
        raise CaptureError(
            f"capture root {root}: Metaflow's {kind!r} storage is not available here "
            f"(known: {', '.join(sorted(storage_classes))})"
        )
    return storage_classes[kind](root.rstrip("/") if kind == "s3" else root)


def partitioning() -> Any:
    """The captures' Hive partitioning for ``pyarrow.dataset.dataset(..., partitioning=partitioning())``:
    app, release and hour as strings (inferred, a release of digits only would become an int and
    clash with the files' own ``release`` column)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    return ds.partitioning(
        pa.schema([("app", pa.string()), ("release", pa.string()), ("hour", pa.string())]), flavor="hive"
    )


class CaptureWriter:
    """Takes sampled requests and labels on the event loop, writes them as Parquet on a thread of its own.

    ``add`` and ``add_label`` only append to a bounded deque (no lock, no I/O); ``flush`` writes
    everything pending, one file per (release, hour) and one per hour of labels, and never raises.
    """

    def __init__(
        self,
        root: str,
        app: str,
        replica: str,
        *,
        sample: float,
        max_pending: int = 10_000,
        flush_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        root_kind(root)
        if not app:
            raise SpecError("capture: the app name is empty")
        if not 0.0 <= sample <= 1.0:
            raise SpecError(f"capture sample {sample!r} must be within [0, 1]")
        if max_pending < 1:
            raise SpecError(f"capture max_pending {max_pending!r} must be at least 1")
        if not flush_s > 0:
            raise SpecError(f"capture flush_s {flush_s!r} must be positive")
        self.root = root.rstrip("/") if root.startswith("s3://") else root
        self.app = app
        self.replica = replica
        # File names start with it: pyarrow's datasets skip files starting with "_" or ".".
        self._file_prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", replica).lstrip("._") or "replica"
        self.sample = sample
        self.max_pending = max_pending
        self.flush_s = flush_s
        self.clock = clock
        self.written: dict[str, int] = {}
        self.labels_written = 0
        self._pending: collections.deque[Captured] = collections.deque()
        self._pending_labels: collections.deque[Labelled] = collections.deque()
        self._half = max_pending // 2
        self._wake = threading.Event()
        # Drops are counted apart by the thread that sees them (event loop: queue full; writer:
        # write failed), so that no counter is written by two threads.
        self._full: dict[str, int] = {}
        self._failed: dict[str, int] = {}
        self._labels_full = 0
        self._labels_failed = 0
        self._flushing = threading.Lock()
        self._storage: Any = None
        self._seq = itertools.count()
        self._last_warning = -math.inf
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def dropped(self) -> dict[str, int]:
        """Captured requests dropped, by variant label: the queue was full or their write failed."""
        total = dict(self._full)
        for label, count in list(self._failed.items()):
            total[label] = total.get(label, 0) + count
        return total

    @property
    def labels_dropped(self) -> int:
        return self._labels_full + self._labels_failed

    @property
    def pending(self) -> int:
        """Records (captures and labels) waiting to be written."""
        return len(self._pending) + len(self._pending_labels)

    def wanted(self) -> bool:
        """Whether to capture this request: a ``sample`` share of calls, at random."""
        sample = self.sample
        return sample >= 1.0 or (sample > 0.0 and _random() < sample)

    def add(self, record: Captured) -> None:
        """Queue a captured request for the writer (called on the event loop: no lock, no I/O);
        dropped and counted when ``max_pending`` already wait."""
        pending = self._pending
        if len(pending) >= self.max_pending:
            self._full[record.label] = self._full.get(record.label, 0) + 1
            return
        pending.append(record)
        if len(pending) > self._half and not self._wake.is_set():
            self._wake.set()

    def add_label(self, record: Labelled) -> None:
        """Queue a label for the writer, as ``add`` does a captured request."""
        pending = self._pending_labels
        if len(pending) >= self.max_pending:
            self._labels_full += 1
            return
        pending.append(record)
        if len(pending) > self._half and not self._wake.is_set():
            self._wake.set()

    def start(self) -> None:
        """Start the writer thread (once; a daemon: it never holds up the process's exit)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="ray-deploy-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self._flush_quietly()
        self._flush_quietly()

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception:  # flush counts and logs its own failures; this keeps the thread alive whatever happens
            logger.exception("ray-deploy capture: the writer to %s failed", self.root)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the writer thread and write what is left (waiting at most ``timeout_s`` for the thread)."""
        self._closing = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning(
                    "ray-deploy capture: the writer to %s is still writing after %.0fs; %d records left unwritten",
                    self.root,
                    timeout_s,
                    self.pending,
                )
                return
        self.flush()

    def flush(self) -> int:
        """Write everything pending now; the number of records (captures and labels) written.

        Never raises: a batch that cannot be written is dropped and counted, and the error logged
        (once a minute at most)."""
        with self._flushing:
            captured = _drain(self._pending)
            labelled = _drain(self._pending_labels)
            if not captured and not labelled:
                return 0
            written = 0
            for (release, hour), records in self._partitions(captured, lambda r: (r.release or None, _hour(r.ts))):
                written += self._write_predictions(release, hour, records)
            for (hour,), records in self._partitions(labelled, lambda r: (_hour(r.ts),)):
                written += self._write_labels(hour, records)
            return written

    def _partitions(self, records: list, key: Callable[[Any], tuple]) -> Iterable[tuple[tuple, list]]:
        """Records grouped by partition; one whose partition cannot be told (a bad ts) is dropped and counted."""
        groups: dict[tuple, list] = {}
        for record in records:
            try:
                groups.setdefault(key(record), []).append(record)
            except Exception as exc:
                self._count_failed([record], exc)
        return groups.items()

    def _write_predictions(self, release: str | None, hour: str, records: list[Captured]) -> int:
        path = f"app={_segment(self.app)}/predictions/release={_segment(release)}/hour={hour}"
        try:
            self._save(path, _prediction_table(records, self.app))
        except Exception as exc:
            self._count_failed(records, exc)
            return 0
        for record in records:
            self.written[record.label] = self.written.get(record.label, 0) + 1
        return len(records)

    def _write_labels(self, hour: str, records: list[Labelled]) -> int:
        path = f"app={_segment(self.app)}/labels/hour={hour}"
        try:
            self._save(path, _label_table(records, self.app))
        except Exception as exc:
            self._count_failed(records, exc)
            return 0
        self.labels_written += len(records)
        return len(records)

    def _save(self, directory: str, table: Any) -> None:
        import pyarrow.parquet as pq

        if self._storage is None:
            self._storage = open_storage(self.root)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        buffer.seek(0)
        name = f"{self._file_prefix}-{int(self.clock() * 1000)}-{next(self._seq)}.parquet"
        self._storage.save_bytes(iter([(f"{directory}/{name}", buffer)]), overwrite=True)

    def _count_failed(self, records: list, exc: Exception) -> None:
        """Count records that could not be written as dropped, and say so (once a minute at most)."""
        labels = [record for record in records if isinstance(record, Labelled)]
        self._labels_failed += len(labels)
        for record in records:
            if not isinstance(record, Labelled):
                self._failed[record.label] = self._failed.get(record.label, 0) + 1
        what = "labels" if len(labels) == len(records) else "captured requests"
        try:
            self._warn(len(records), what, exc)
        except Exception:  # a clock or a handler that fails: the records are counted all the same
            pass

    def _warn(self, count: int, what: str, exc: Exception) -> None:
        now = self.clock()
        if now - self._last_warning < WARNING_INTERVAL_S:
            return
        self._last_warning = now
        logger.warning(
            "ray-deploy capture: cannot write %d %s of app %r to %s (%s: %s); dropped them "
            "(this replica dropped %d captured requests and %d labels so far; logged once a minute)",
            count,
            what,
            self.app,
            self.root,
            type(exc).__name__,
            exc,
            sum(self.dropped.values()),
            self.labels_dropped,
        )


def _drain(pending: collections.deque) -> list:
    """What waits in ``pending`` now (popleft is atomic: the event loop may append meanwhile)."""
    taken = []
    for _ in range(len(pending)):
        taken.append(pending.popleft())
    return taken


def _hour(ts: float) -> str:
    return time.strftime(HOUR_FORMAT, time.gmtime(ts))


def _segment(value: str | None) -> str:
    """A Hive partition value as a path segment: URI-encoded, Hive's null partition for None."""
    return quote(value, safe="") if value else NULL_PARTITION


def _plain(value: Any) -> Any:
    """JSON's fallback for NumPy scalars and arrays (``tolist``)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_plain)


def _json(value: Any) -> str:
    """Compact JSON; NaN and infinities become null; ``"null"`` for what cannot be serialised."""
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError):
        pass
    try:
        return _ENCODER.encode(_finite(value))
    except Exception:
        return "null"


def _finite(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _number(value: Any) -> float | None:
    """A prediction as a float: a number, or a list of one number; else None."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _input_rows(model_input: Any) -> list[str]:
    """Each input row as compact JSON (an object when the columns are known), ``["null"]`` without rows."""
    try:
        rows = list(model_input.rows)
    except Exception:
        rows = []
    if not rows:
        return ["null"]
    columns = getattr(model_input, "columns", None)
    columns = list(columns) if columns is not None else None
    texts = []
    for row in rows:
        try:
            values = list(row)
        except TypeError:
            values = row
        if columns and isinstance(values, list) and len(values) == len(columns):
            texts.append(_json(dict(zip(columns, values))))
        else:
            texts.append(_json(values))
    return texts


def _as_list(predictions: Any) -> Any:
    """Predictions as a list when they are a sequence (a tuple, a NumPy array); anything else as it is."""
    if isinstance(predictions, tuple):
        return list(predictions)
    if hasattr(predictions, "tolist") and getattr(predictions, "ndim", 0) > 0:
        try:
            return predictions.tolist()
        except Exception:
            return predictions
    return predictions


def _prediction_table(records: list[Captured], app: str) -> Any:
    import pyarrow as pa

    columns: dict[str, list] = {name: [] for name in PREDICTION_COLUMNS}
    for record in records:
        inputs = _input_rows(record.model_input)
        predictions = _as_list(record.predictions)
        per_row = isinstance(predictions, list) and len(predictions) == len(inputs)
        ts_ms = int(record.ts * 1000)
        for index, text in enumerate(inputs):
            prediction = predictions[index] if per_row else (predictions if index == 0 else None)
            columns["ts"].append(ts_ms)
            columns["request_id"].append(record.request_id)
            columns["request_key"].append(record.request_key)
            columns["app"].append(app)
            columns["variant"].append(record.variant)
            columns["label"].append(record.label)
            columns["release"].append(record.release)
            columns["model_version"].append(record.model_version)
            columns["latency_ms"].append(float(record.latency_ms))
            columns["row"].append(index)
            columns["input"].append(text)
            columns["prediction"].append(_json(prediction))
            columns["prediction_value"].append(_number(prediction))
            columns["shadow"].append(bool(record.shadow))
    return pa.Table.from_pydict(columns, schema=prediction_schema())


def _label_table(records: list[Labelled], app: str) -> Any:
    import pyarrow as pa

    columns = {
        "ts": [int(r.ts * 1000) for r in records],
        "request_id": [r.request_id for r in records],
        "app": [app] * len(records),
        "variant": [r.variant for r in records],
        "label": [r.label for r in records],
        "release": [r.release for r in records],
        "model_version": [r.model_version for r in records],
        "truth": [_json(r.truth) for r in records],
        "prediction": [_json(r.prediction) for r in records],
        "score": [_number(r.score) for r in records],
    }
    return pa.Table.from_pydict(columns, schema=label_schema())


@cache
def prediction_schema() -> Any:
    """The Parquet schema of captured requests (``PREDICTION_COLUMNS``)."""
    import pyarrow as pa

    text = pa.string()
    return pa.schema(
        [
            ("ts", pa.timestamp("ms", tz="UTC")),
            ("request_id", text),
            ("request_key", text),
            ("app", text),
            ("variant", text),
            ("label", text),
            ("release", text),
            ("model_version", text),
            ("latency_ms", pa.float64()),
            ("row", pa.int32()),
            ("input", text),
            ("prediction", text),
            ("prediction_value", pa.float64()),
            ("shadow", pa.bool_()),
        ]
    )


@cache
def label_schema() -> Any:
    """The Parquet schema of labels (``LABEL_COLUMNS``)."""
    import pyarrow as pa

    text = pa.string()
    return pa.schema(
        [
            ("ts", pa.timestamp("ms", tz="UTC")),
            ("request_id", text),
            ("app", text),
            ("variant", text),
            ("label", text),
            ("release", text),
            ("model_version", text),
            ("truth", text),
            ("prediction", text),
            ("score", pa.float64()),
        ]
    )


# Read side: users, flows and `ray-deploy status`.


def read_captures(
    root: str,
    app: str,
    *,
    since: datetime | float | None = None,
    until: datetime | float | None = None,
    variant: str | None = None,
    release: str | None = None,
) -> Any:
    """Every captured row of ``app`` as a pandas DataFrame (``PREDICTION_COLUMNS``), sorted by ts.

    ``since``/``until`` (datetimes, naive ones taken as UTC, or epoch seconds) bound ``ts``, both
    included; hour partitions outside them are not read. ``input`` and ``prediction`` are decoded
    from JSON. An app without captures gives an empty DataFrame with the same columns.

    Raises:
        CaptureError: the root cannot be listed or a file cannot be read.
    """
    start, end = _epoch(since), _epoch(until)
    storage = open_storage(root)
    base = f"app={_segment(app)}/predictions"
    where = f"captures of app {app!r} under {root}"
    if release is not None:
        releases = [f"{base}/release={_segment(release)}"]
    else:
        releases = [path for path, is_file in _list(storage, [base], where) if not is_file and "/release=" in path]
    table = _read_hours(storage, releases, start, end, prediction_schema(), where)
    frame = _frame(table, start, end, ("ts", "request_id", "shadow", "label", "row"), ("input", "prediction"))
    if variant is not None:
        frame = frame[frame["variant"] == variant].reset_index(drop=True)
    return frame


def read_labels(
    root: str, app: str, *, since: datetime | float | None = None, until: datetime | float | None = None
) -> Any:
    """Every label of ``app`` as a pandas DataFrame (``LABEL_COLUMNS``), sorted by ts; ``truth`` and
    ``prediction`` decoded from JSON. ``since``/``until`` as for ``read_captures``."""
    start, end = _epoch(since), _epoch(until)
    storage = open_storage(root)
    table = _read_hours(
        storage, [f"app={_segment(app)}/labels"], start, end, label_schema(), f"labels of app {app!r} under {root}"
    )
    return _frame(table, start, end, ("ts", "request_id"), ("truth", "prediction"))


def _epoch(value: datetime | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return float(value)


def _list(storage: Any, paths: list[str], where: str) -> list[tuple[str, bool]]:
    """One level under each of ``paths`` (a missing path lists nothing): (path, is_file)."""
    if not paths:
        return []
    try:
        return [(entry.path.rstrip("/"), entry.is_file) for entry in storage.list_content(paths)]
    except Exception as exc:
        raise CaptureError(f"{where}: cannot list {', '.join(paths)} ({type(exc).__name__}: {exc})") from exc


def _read_hours(
    storage: Any, parents: list[str], start: float | None, end: float | None, schema: Any, where: str
) -> Any:
    """The Parquet files in the ``hour=`` partitions under ``parents`` that overlap [start, end], as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hours = []
    for path, is_file in _list(storage, parents, where):
        name = path.rsplit("/", 1)[-1]
        if is_file or not name.startswith("hour="):
            continue
        try:
            opens = datetime.strptime(unquote(name[len("hour=") :]), HOUR_FORMAT).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue  # not a partition of ours
        if (start is None or opens + 3600 > start) and (end is None or opens <= end):
            hours.append(path)
    keys = [path for path, is_file in _list(storage, hours, where) if is_file and path.endswith(".parquet")]
    tables = []
    if keys:
        try:
            with storage.load_bytes(keys) as loaded:
                for _, local_path, _ in loaded:
                    if local_path is None:
                        continue  # removed since it was listed
                    with pq.ParquetFile(local_path) as parquet:
                        tables.append(parquet.read())
        except Exception as exc:
            raise CaptureError(f"{where}: cannot read their Parquet files ({type(exc).__name__}: {exc})") from exc
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="default").select(list(schema.names))


def _frame(table: Any, start: float | None, end: float | None, order: Iterable[str], decoded: Iterable[str]) -> Any:
    import pandas as pd

    frame = table.to_pandas()
    if start is not None:
        frame = frame[frame["ts"] >= pd.Timestamp(start, unit="s", tz="UTC")]
    if end is not None:
        frame = frame[frame["ts"] <= pd.Timestamp(end, unit="s", tz="UTC")]
    frame = frame.sort_values(list(order), kind="stable").reset_index(drop=True)
    for name in decoded:
        frame[name] = pd.Series([None if text is None else json.loads(text) for text in frame[name]], dtype=object)
    return frame


def load_quality_function(metric: str, code_dir: str | None = None) -> Callable[[Any, Any], Any]:
    """The user's quality function named ``module:function`` (``capture={"quality": ...}``), imported
    from ``code_dir`` or the installed packages; checked at ``step_init`` and loaded by replicas.

    Raises:
        SpecError: naming ``capture.quality``, when the module or the function is missing.
    """
    from ray_deploy.models.predictors import import_user_module

    module_name, _, name = metric.partition(":")
    try:
        module = import_user_module(module_name, code_dir)
    except ImportError as exc:
        raise SpecError(f"capture.quality: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise SpecError(f"capture.quality: module {module_name!r} has no function {name!r} taking (prediction, label)")
    return function
