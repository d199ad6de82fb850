"""Prediction capture on real files: what a CaptureWriter writes, how it is laid out, and what it
does when it cannot keep up or cannot write."""

import logging
import math
import os
import random
import re
import time
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from ray_deploy.errors import SpecError
from ray_deploy.serving.capture import (
    CAPTURE_DIR,
    LABEL_COLUMNS,
    PREDICTION_COLUMNS,
    Captured,
    CaptureWriter,
    Labelled,
    capture_root,
    partitioning,
    read_captures,
    read_labels,
)
from ray_deploy.serving.payload import ModelInput

# 13:59:59.5 UTC and half a second past 14:00: two hour partitions.
LATE = datetime(2024, 5, 1, 13, 59, 59, 500000, tzinfo=UTC).timestamp()
EARLY = LATE + 1.0
REPLICA = "SERVE_REPLICA::iris#ModelServer#x1y2"


def captured(request_id, rows, predictions, *, ts=LATE, columns=None, variant="lr", release="v1", shadow=False):
    label = f"{variant}@{release}" if release else variant
    model_version = f"iris/{release[1:]}" if release else None
    return Captured(
        ts=ts,
        request_id=request_id,
        request_key=None if shadow else f"key-{request_id}",
        variant=variant,
        label=label,
        release=release,
        model_version=model_version,
        latency_ms=2.5,
        model_input=ModelInput(rows=rows, columns=columns, body=None),
        predictions=predictions,
        shadow=shadow,
    )


def labelled(request_id, truth, prediction, score, *, ts=LATE):
    return Labelled(ts, request_id, "lr", "lr@v1", "v1", "iris/1", truth, prediction, score)


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


def test_every_column_of_a_captured_request(tmp_path):
    root = str(tmp_path / "captures")
    writer = CaptureWriter(root, "iris", REPLICA, sample=1.0)
    writer.add(captured("named", [[5.1, 3.5], [6.2, float("nan")], [7.0, 3.2]], [0, 1, 2], columns=["a", "b"]))
    writer.add(captured("plain", [[1, 2]], [[0.1, 0.9]], ts=EARLY))  # one row, class probabilities
    writer.add(captured("named", [[5.1, 3.5]], [1], variant="xgb", release="v2", shadow=True))
    writer.add(captured("whole", [[1, 2], [3, 4]], {"scores": [1, 2]}, ts=EARLY))  # not one per row: row 0's
    assert writer.flush() == 4
    assert writer.written == {"lr@v1": 3, "xgb@v2": 1} and writer.dropped == {}

    # One file per (release, hour), Hive-style, named by replica (made a file name), time and sequence.
    files = files_under(root)
    assert len(files) == 3, files
    pattern = r"app=iris/predictions/release=(v1|v2)/hour=2024-05-01T(13|14)/SERVE_REPLICA_iris_ModelServer_x1y2-\d{13}-\d\.parquet"
    assert all(re.fullmatch(pattern, f) for f in files), files
    assert {tuple(f.split("/")[2:4]) for f in files} == {
        ("release=v1", "hour=2024-05-01T13"),
        ("release=v1", "hour=2024-05-01T14"),
        ("release=v2", "hour=2024-05-01T13"),
    }

    frame = read_captures(root, "iris")
    assert list(frame.columns) == list(PREDICTION_COLUMNS)
    assert frame["ts"].dtype == "datetime64[ms, UTC]"
    assert list(frame["request_id"]) == ["named"] * 4 + ["plain", "whole", "whole"]  # sorted by ts, then row

    named = frame[(frame.request_id == "named") & ~frame.shadow].reset_index(drop=True)
    assert list(named["row"]) == [0, 1, 2]
    assert named["input"].tolist() == [{"a": 5.1, "b": 3.5}, {"a": 6.2, "b": None}, {"a": 7.0, "b": 3.2}]  # NaN: null
    assert named["prediction"].tolist() == [0, 1, 2] and named["prediction_value"].tolist() == [0.0, 1.0, 2.0]
    first = named.iloc[0]
    assert first["ts"] == pd.Timestamp(LATE, unit="s", tz="UTC")
    assert (first["request_key"], first["app"], first["variant"], first["label"]) == (
        "key-named",
        "iris",
        "lr",
        "lr@v1",
    )
    assert (first["release"], first["model_version"], first["latency_ms"]) == ("v1", "iris/1", 2.5)

    shadow = frame[frame.shadow].iloc[0]
    assert (shadow["request_id"], shadow["label"], shadow["release"]) == ("named", "xgb@v2", "v2")
    assert pd.isna(shadow["request_key"]) and shadow["input"] == [5.1, 3.5] and shadow["prediction"] == 1

    plain = frame[frame.request_id == "plain"].iloc[0]
    assert plain["input"] == [1, 2] and plain["prediction"] == [0.1, 0.9] and math.isnan(plain["prediction_value"])
    assert plain["ts"].hour == 14

    whole = frame[frame.request_id == "whole"]
    assert whole["input"].tolist() == [[1, 2], [3, 4]]
    assert whole["prediction"].tolist() == [{"scores": [1, 2]}, None]

    # The files are a dataset as pyarrow reads one: app, release and hour from the paths.
    predictions = ds.dataset(os.path.join(root, "app=iris", "predictions"), format="parquet", partitioning="hive")
    assert {"release", "hour"} <= set(predictions.schema.names)
    table = predictions.to_table(filter=(ds.field("hour") == "2024-05-01T14") & (ds.field("release") == "v1"))
    assert sorted(table.column("request_id").to_pylist()) == ["plain", "whole", "whole"]
    everything = ds.dataset(root, format="parquet", partitioning=partitioning()).to_table()
    assert set(everything.column("app").to_pylist()) == {"iris"}
    assert everything.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert everything.schema.field("row").type == pa.int32()


def test_a_release_without_name_and_one_of_digits_read_as_strings(tmp_path):
    root = str(tmp_path)
    writer = CaptureWriter(root, "my app", "r", sample=1.0)
    writer.add(captured("a", [[1]], [1], release=None))
    writer.add(captured("b", [[1]], [2], release="01234567"))  # a content hash of digits only
    writer.add(Captured(LATE, "c", None, "lr", "lr", None, None, 1.0, ModelInput([[object()]], None, None), [3]))
    writer.add(Captured(LATE, "d", None, "lr", "lr", None, None, 1.0, None, 7.5))  # no input at all
    assert writer.flush() == 4
    assert {f.split("/")[2] for f in files_under(root)} == {"release=__HIVE_DEFAULT_PARTITION__", "release=01234567"}
    assert files_under(root)[0].startswith("app=my%20app/")
    frame = read_captures(root, "my app")
    rows = {r.request_id: r for r in frame.itertuples()}
    assert rows["b"].release == "01234567" and pd.isna(rows["a"].release)
    assert rows["c"].input is None and rows["c"].prediction == 3  # a row that cannot be serialised: input null
    assert rows["d"].input is None and rows["d"].prediction_value == 7.5
    table = ds.dataset(root, format="parquet", partitioning=partitioning()).to_table()
    assert sorted(v for v in table.column("release").to_pylist() if v) == ["01234567"]
    assert read_captures(root, "my app", release="01234567")["request_id"].tolist() == ["b"]


def test_sampling():
    quarter = CaptureWriter("/nonexistent/captures", "iris", "r", sample=0.25)
    taken = sum(quarter.wanted() for _ in range(4000))
    assert 850 <= taken <= 1150, taken  # 1000 expected, sd 27
    state = random.getstate()
    every = CaptureWriter("/nonexistent/captures", "iris", "r", sample=1.0)
    assert all(every.wanted() for _ in range(1000))
    assert random.getstate() == state, "sample 1.0 must not draw random numbers"
    assert not any(CaptureWriter("/nonexistent/captures", "iris", "r", sample=0.0).wanted() for _ in range(1000))
    with pytest.raises(SpecError, match="sample"):
        CaptureWriter("/x", "iris", "r", sample=1.5)
    with pytest.raises(SpecError, match="absolute"):
        CaptureWriter("captures", "iris", "r", sample=1.0)


def test_memory_is_bounded_and_drops_are_counted_by_label(tmp_path):
    writer = CaptureWriter(str(tmp_path), "iris", "r", sample=1.0, max_pending=10)  # thread not started
    for index in range(25):
        writer.add(captured(str(index), [[1]], [1], variant="lr" if index < 20 else "xgb", release="v1"))
    for index in range(12):
        writer.add_label(labelled(str(index), 1, 1, 1.0))
    assert writer.pending == 20
    assert writer.dropped == {"lr@v1": 10, "xgb@v1": 5} and writer.labels_dropped == 2
    assert writer.flush() == 20
    assert writer.written == {"lr@v1": 10} and writer.labels_written == 10 and writer.pending == 0
    assert read_captures(str(tmp_path), "iris")["request_id"].tolist() == [str(i) for i in range(10)]


def test_a_failing_disk_drops_and_counts_then_recovers(tmp_path, caplog):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the capture root's parent directory must be")
    root = str(blocker / "captures")
    writer = CaptureWriter(root, "iris", "r", sample=1.0)
    writer.add(captured("1", [[1], [2]], [1, 2]))
    writer.add(captured("2", [[1]], [1], release="v2"))
    writer.add_label(labelled("1", 1, 1, 1.0))
    with caplog.at_level(logging.WARNING, logger="ray_deploy.serving.capture"):
        assert writer.flush() == 0
        writer.add(captured("3", [[1]], [1]))
        assert writer.flush() == 0
    assert writer.dropped == {"lr@v1": 2, "lr@v2": 1} and writer.labels_dropped == 1 and writer.written == {}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings  # once a minute
    assert root in warnings[0] and "NotADirectoryError" in warnings[0]

    blocker.unlink()  # the disk is back
    writer.add(captured("4", [[1]], [1]))
    writer.add_label(labelled("4", 0, 1, 0.0))
    assert writer.flush() == 2
    assert writer.written == {"lr@v1": 1} and writer.labels_written == 1
    assert read_captures(root, "iris")["request_id"].tolist() == ["4"]


def test_a_record_without_a_time_is_dropped_alone(tmp_path):
    writer = CaptureWriter(str(tmp_path), "iris", "r", sample=1.0)
    writer.add(captured("good", [[1]], [1]))
    writer.add(captured("bad", [[1]], [1], ts=None)._replace(label="lr@broken"))
    writer.add_label(labelled("bad", 1, 1, 1.0, ts="yesterday"))
    assert writer.flush() == 1
    assert writer.written == {"lr@v1": 1} and writer.dropped == {"lr@broken": 1} and writer.labels_dropped == 1
    assert read_captures(str(tmp_path), "iris")["request_id"].tolist() == ["good"]


def test_the_thread_writes_when_half_full_and_close_flushes_the_rest(tmp_path):
    root = str(tmp_path)
    writer = CaptureWriter(root, "iris", "r", sample=1.0, max_pending=10, flush_s=60)
    writer.start()
    writer.start()  # idempotent
    for index in range(6):  # past half full: the thread wakes long before flush_s
        writer.add(captured(str(index), [[1]], [1]))
    deadline = time.monotonic() + 10
    while writer.written.get("lr@v1", 0) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writer.written == {"lr@v1": 6}
    writer.add(captured("last", [[1]], [1]))
    writer.add_label(labelled("last", 1, 1, 1.0))
    writer.close()
    assert writer.written == {"lr@v1": 7} and writer.labels_written == 1 and writer.pending == 0
    assert len(read_captures(root, "iris")) == 7 and len(read_labels(root, "iris")) == 1

    unstarted = CaptureWriter(str(tmp_path / "other"), "iris", "r", sample=1.0)
    unstarted.add(captured("x", [[1]], [1]))
    unstarted.close()
    assert unstarted.written == {"lr@v1": 1}


def test_since_until_variant_and_hours_not_read(tmp_path):
    root = str(tmp_path)
    writer = CaptureWriter(root, "iris", "r", sample=1.0)
    writer.add(captured("late", [[1]], [1]))
    writer.add(captured("early-lr", [[1]], [1], ts=EARLY))
    writer.add(captured("early-xgb", [[1]], [1], ts=EARLY + 60, variant="xgb"))
    writer.flush()
    assert read_captures(root, "iris", since=EARLY)["request_id"].tolist() == ["early-lr", "early-xgb"]
    assert read_captures(root, "iris", since=EARLY, until=EARLY + 1)["request_id"].tolist() == ["early-lr"]
    assert read_captures(root, "iris", until=datetime(2024, 5, 1, 14))["request_id"].tolist() == ["late"]
    naive = datetime(2024, 5, 1, 14, 0, 30)  # naive datetimes are UTC
    assert read_captures(root, "iris", since=naive)["request_id"].tolist() == ["early-xgb"]
    assert read_captures(root, "iris", variant="xgb")["request_id"].tolist() == ["early-xgb"]
    # The 13:00 partition is not read when `since` is past it: a broken file there goes unnoticed.
    (late_file,) = [f for f in files_under(root) if "hour=2024-05-01T13" in f]
    (tmp_path / late_file).write_bytes(b"not parquet")
    assert len(read_captures(root, "iris", since=EARLY)) == 2
    with pytest.raises(Exception, match="Parquet"):
        read_captures(root, "iris")


def test_labels_round_trip(tmp_path):
    root = str(tmp_path)
    writer = CaptureWriter(root, "iris", "r", sample=0.5)
    writer.add_label(labelled("a", 1, 1, 1.0))
    writer.add_label(labelled("b", {"y": [1, 2]}, [0.2, 0.8], None, ts=EARLY))
    writer.add_label(labelled("c", 2.5, 3.0, 0.5, ts=EARLY + 5))
    assert writer.flush() == 3 and writer.labels_written == 3
    assert {f.split("/")[2] for f in files_under(root)} == {"hour=2024-05-01T13", "hour=2024-05-01T14"}
    assert all(f.startswith("app=iris/labels/") for f in files_under(root))
    frame = read_labels(root, "iris")
    assert list(frame.columns) == list(LABEL_COLUMNS)
    assert frame["request_id"].tolist() == ["a", "b", "c"]
    assert frame["truth"].tolist() == [1, {"y": [1, 2]}, 2.5]
    assert frame["prediction"].tolist() == [1, [0.2, 0.8], 3.0]
    assert frame["score"].iloc[0] == 1.0 and math.isnan(frame["score"].iloc[1]) and frame["score"].iloc[2] == 0.5
    first = frame.iloc[0]
    assert (first["app"], first["variant"], first["label"], first["release"], first["model_version"]) == (
        "iris",
        "lr",
        "lr@v1",
        "v1",
        "iris/1",
    )
    assert read_labels(root, "iris", since=EARLY + 1)["request_id"].tolist() == ["c"]
    assert read_captures(root, "iris").empty  # labels only


def test_an_app_without_captures_reads_empty(tmp_path):
    for frame, columns in (
        (read_captures(str(tmp_path / "missing"), "iris"), PREDICTION_COLUMNS),
        (read_labels(str(tmp_path), "iris"), LABEL_COLUMNS),
    ):
        assert frame.empty and list(frame.columns) == list(columns)
    assert not (tmp_path / "missing").exists()  # reading creates nothing


def test_capture_root_rules():
    assert capture_root("s3://bucket/metaflow", "/data/captures", "/home") == "/data/captures"
    assert capture_root("s3://bucket/metaflow/", None, "/home") == f"s3://bucket/metaflow/{CAPTURE_DIR}"
    assert capture_root("/mf/.metaflow", None, "/home") == f"/mf/.metaflow/{CAPTURE_DIR}"
    assert capture_root(None, None, "/home/me/.ray_deploy") == "/home/me/.ray_deploy/captures"
    assert capture_root(None, "s3://b/p/", "/home") == "s3://b/p"


def test_adding_stays_cheap(tmp_path):
    writer = CaptureWriter(str(tmp_path), "iris", "r", sample=1.0, max_pending=200_000)
    record = captured("x", [[1.0, 2.0]], [1])
    calls = 100_000
    started = time.perf_counter()
    for _ in range(calls):
        if writer.wanted():
            writer.add(record)
    took = time.perf_counter() - started
    print(f"\nwanted() + add(): {took / calls * 1e9:.0f} ns per call over {calls} calls")
    assert writer.pending == calls
